"""Checkpoint layouts: recognise how a file stores its weights and normalise them to SAM key names.

Supported layouts (see ``docs/checkpoints.md``):

========================  =======================================================================
``sam``                   plain SAM state dict: ``image_encoder.*``, ``prompt_encoder.*``, ``mask_decoder.*``
``litemedsam``            the same three parts with LiteMedSAM's TinyViT image encoder
``robustsam``             SAM keys plus RobustSAM's extra mask-decoder keys
``lite_robust``           TinyViT encoder with a (lite) robust decoder
``medsam_training``       MedSAM training checkpoint ``{"model": sd, "optimizer": ..., "epoch": ...}``
``ddp``                   a DDP-wrapped model's state dict: every key prefixed ``module.``
``robustmedsam_release``  ``ddp`` with RobustSAM decoder keys (the RobustMedSAM seed release)
``micro_sam``             micro_sam / torch_em ``{"model_state": {"sam.<key>": ...}, ...}``
``training_state_dict``   a generic ``{"state_dict": sd, ...}`` training checkpoint
``project``               this package's own format (weights + metadata), see :mod:`.project_format`
========================  =======================================================================

Besides the layout, detection infers the architecture from tensor shapes (ViT width and depth from
``image_encoder.patch_embed.proj.weight`` and the block count; TinyViT from its ``patch_embed.seq`` /
``layers`` keys) and the decoder kind (``robust`` when RobustSAM's extra decoder keys are present).
Nothing is dropped silently: unknown keys make the layout unknown, and the error lists them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from ..models.robust_decoder import ROBUST_KEY_PREFIXES  # the submodules RobustSAM adds to SAM's mask decoder
from . import project_format
from .safe_load import load_untrusted, notice

PARTS = ("image_encoder", "prompt_encoder", "mask_decoder")
# Wrappers whose name prefixes every key: DDP ("module."), micro_sam's TrainableSAM ("sam."),
# Lightning-style modules ("model."), torch.compile ("_orig_mod.").
WRAPPER_PREFIXES = ("module", "sam", "model", "_orig_mod")
ARCH_IMAGE_SIZE = {"vit_b": 1024, "vit_l": 1024, "vit_h": 1024, "tiny_vit": 256}

LAYOUT_DESCRIPTIONS = {
    "project": "napari-robustmedsam checkpoint (weights + metadata)",
    "sam": "plain SAM state dict (image_encoder.*, prompt_encoder.*, mask_decoder.*)",
    "litemedsam": "LiteMedSAM state dict (TinyViT image encoder, SAM prompt encoder and mask decoder)",
    "robustsam": "RobustSAM state dict (SAM keys plus the robust mask-decoder keys)",
    "lite_robust": "TinyViT image encoder with a lite robust mask decoder",
    "medsam_training": "MedSAM training checkpoint {'model': state_dict, 'optimizer': ..., 'epoch': ...}",
    "ddp": "state dict of a DDP-wrapped model (every key prefixed 'module.')",
    "robustmedsam_release": "RobustMedSAM release: DDP state dict ('module.' prefix) with RobustSAM decoder keys",
    "micro_sam": "micro_sam / torch_em training checkpoint {'model_state': {'sam.<key>': ...}}",
    "training_state_dict": "training checkpoint {'state_dict': state_dict, ...}",
    "partial": "state dict holding only some of image_encoder / prompt_encoder / mask_decoder",
}


@dataclass(frozen=True)
class Layout:
    """What a checkpoint object looks like and how to turn it into a canonical SAM-key state dict."""

    name: str
    description: str
    architecture: str | None  # "vit_b", "vit_l", "vit_h", "tiny_vit"; None when there is no image encoder
    decoder: str | None  # "sam" or "robust"; None when there is no mask decoder
    container_key: str | None = None  # "model", "model_state", "state_dict" or None (top level)
    stripped_prefix: str = ""  # e.g. "module." or "sam." removed from every key
    parts: tuple[str, ...] = PARTS  # which of image_encoder / prompt_encoder / mask_decoder are present
    ignored: tuple[str, ...] = ()  # top-level entries that are not weights (optimizer, epoch, ...)
    metadata: dict = field(default_factory=dict, compare=False)  # project-format metadata
    notices: tuple[str, ...] = ()

    @property
    def complete(self) -> bool:
        return all(part in self.parts for part in PARTS)


@dataclass
class Checkpoint:
    """A checkpoint read from a file (or given in memory), normalised to SAM key names."""

    state_dict: dict
    layout: Layout
    path: Path | None = None

    @property
    def architecture(self) -> str | None:
        return self.layout.architecture

    @property
    def decoder(self) -> str | None:
        return self.layout.decoder

    @property
    def metadata(self) -> dict:
        return self.layout.metadata

    @property
    def notices(self) -> tuple[str, ...]:
        return self.layout.notices

    def part(self, name: str) -> dict:
        prefix = name + "."
        return {key: value for key, value in self.state_dict.items() if key.startswith(prefix)}

    def has_part(self, name: str) -> bool:
        return name in self.layout.parts


# --------------------------------------------------------------------------------------------------
# shape-based inference
# --------------------------------------------------------------------------------------------------
def _shape(value: Any) -> tuple[int, ...]:
    return tuple(int(s) for s in getattr(value, "shape", ()))


def is_robust_key(key: str) -> bool:
    parts = key.split(".", 2)
    return len(parts) >= 2 and parts[0] == "mask_decoder" and parts[1] in ROBUST_KEY_PREFIXES


def infer_decoder(state_dict: Mapping) -> str | None:
    has_decoder = any(key.startswith("mask_decoder.") for key in state_dict)
    if not has_decoder:
        return None
    return "robust" if any(is_robust_key(key) for key in state_dict) else "sam"


def vit_geometry(state_dict: Mapping) -> dict | None:
    """Width, depth and embedding grid of a ViT image encoder, or None if there is none."""
    weight = state_dict.get("image_encoder.patch_embed.proj.weight")
    if weight is None:
        return None
    blocks = {
        int(match.group(1))
        for key in state_dict
        if (match := re.match(r"image_encoder\.blocks\.(\d+)\.", key))
    }
    pos = state_dict.get("image_encoder.pos_embed")
    grid = _shape(pos)[1:3] if pos is not None and len(_shape(pos)) == 4 else None
    shape = _shape(weight)
    return {
        "width": shape[0],
        "depth": (max(blocks) + 1) if blocks else 0,
        "patch": shape[-1] if len(shape) == 4 else None,
        "grid": grid,
    }


def infer_architecture(state_dict: Mapping, where: str = "checkpoint") -> str | None:
    """Architecture name from tensor shapes; None if the state dict has no image encoder."""
    if not any(key.startswith("image_encoder.") for key in state_dict):
        return None
    geometry = vit_geometry(state_dict)
    if geometry is not None:
        from ..models.build import VIT_CONFIGS

        for name, cfg in VIT_CONFIGS.items():
            if cfg["embed_dim"] == geometry["width"] and cfg["depth"] == geometry["depth"]:
                return name
        supported = ", ".join(f"{n} (width {c['embed_dim']}, {c['depth']} blocks)" for n, c in VIT_CONFIGS.items())
        raise CheckpointError(
            f"{where} has a ViT image encoder of width {geometry['width']} with {geometry['depth']} blocks, "
            f"which is none of the supported SAM encoders: {supported}"
        )
    if "image_encoder.patch_embed.seq.0.c.weight" in state_dict and any(
        key.startswith("image_encoder.layers.") for key in state_dict
    ):
        return "tiny_vit"
    raise _layout_error(
        state_dict,
        where,
        "its image encoder is neither a SAM ViT (image_encoder.patch_embed.proj.weight) nor LiteMedSAM's TinyViT "
        "(image_encoder.patch_embed.seq.*, image_encoder.layers.*)",
    )


def embedding_grid(state_dict: Mapping, architecture: str | None) -> int | None:
    """Side of the image-embedding grid the encoder produces (64 for every supported encoder)."""
    if architecture == "tiny_vit":
        return 64  # 256 px input, total stride 4 x 2 x 2 ... -> 64 x 64 (fixed by the architecture)
    geometry = vit_geometry(state_dict)
    if geometry and geometry["grid"]:
        return int(geometry["grid"][0])
    return None


def neck_channels(state_dict: Mapping) -> int | None:
    neck = state_dict.get("image_encoder.neck.0.weight")
    return _shape(neck)[0] if neck is not None else None


def prompt_embed_dim(state_dict: Mapping) -> int | None:
    emb = state_dict.get("prompt_encoder.point_embeddings.0.weight")
    if emb is None:
        emb = state_dict.get("prompt_encoder.no_mask_embed.weight")
    return _shape(emb)[-1] if emb is not None else None


def decoder_transformer_dim(state_dict: Mapping) -> int | None:
    token = state_dict.get("mask_decoder.iou_token.weight")
    return _shape(token)[-1] if token is not None else None


_FIRST_LAYER = "mask_decoder.fourier_first_layer_features."


def early_feature_width(state_dict: Mapping) -> int | None:
    """Channels of the early encoder features a robust decoder reads (768 for RobustSAM ViT-B)."""
    upsample = state_dict.get(_FIRST_LAYER + "upsample_layer.0.weight")  # ConvTranspose2d: (in, out, k, k)
    if upsample is not None and len(_shape(upsample)) == 4:
        return _shape(upsample)[0]
    conv1 = state_dict.get(_FIRST_LAYER + "dnc_block_combined.SEMBlock.maxpool_conv.0.conv1.weight")
    if conv1 is not None and len(_shape(conv1)) == 4:
        return _shape(conv1)[1]
    for key, value in state_dict.items():
        if key.startswith(_FIRST_LAYER) and key.endswith(".weight") and len(_shape(value)) == 4:
            return _shape(value)[1]
    return None


# --------------------------------------------------------------------------------------------------
# expected keys / shapes of the models this package builds
# --------------------------------------------------------------------------------------------------
_EXPECTED_CACHE: dict[tuple[str, str], dict[str, tuple[int, ...]]] = {}


def shapes_of(model) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def expected_shapes(architecture: str, decoder: str, allow_build: bool = True) -> dict[str, tuple[int, ...]] | None:
    """Key -> shape of the state dict of ``build_segmenter(architecture, decoder)``.

    The model is built on the meta device (no memory, milliseconds). Architectures that cannot be built
    there (TinyViT) are built on the CPU if ``allow_build``, else None is returned. Results are cached.
    """
    key = (architecture, decoder)
    if key in _EXPECTED_CACHE:
        return dict(_EXPECTED_CACHE[key])
    import torch

    from ..models.build import build_segmenter

    try:
        with torch.device("meta"):
            model = build_segmenter(architecture, decoder)
    except (RuntimeError, NotImplementedError, TypeError):
        if not allow_build:
            return None
        model = build_segmenter(architecture, decoder)
    _EXPECTED_CACHE[key] = shapes_of(model)
    return dict(_EXPECTED_CACHE[key])


def key_problems(actual: Mapping, expected: Mapping) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, shape mismatches as "key: file (a, b) vs model (c, d)")."""
    missing = [key for key in expected if key not in actual]
    unexpected = [key for key in actual if key not in expected]
    mismatched = []
    for key, value in actual.items():
        if key in expected:
            have, want = _shape(value) if not isinstance(value, tuple) else value, tuple(expected[key])
            if tuple(have) != want:
                mismatched.append(f"{key}: checkpoint {tuple(have)} vs model {want}")
    return missing, unexpected, mismatched


def _listing(title: str, items: list[str], limit: int = 10) -> str:
    if not items:
        return ""
    shown = "\n".join(f"    {item}" for item in items[:limit])
    more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"\n  {title} ({len(items)}):\n{shown}{more}"


def format_key_problems(missing: list[str], unexpected: list[str], mismatched: list[str] = ()) -> str:
    return (
        _listing("missing keys", missing)
        + _listing("unexpected keys", unexpected)
        + _listing("shape mismatches", list(mismatched))
    )


def _layout_error(state_dict: Mapping, where: str, reason: str, architecture: str | None = None) -> CheckpointError:
    decoder = infer_decoder(state_dict) or "sam"
    arch = architecture or "vit_b"
    try:
        expected = expected_shapes(arch, decoder)
        reference = f"a {arch} model with a {decoder} decoder"
    except Exception:  # robust decoder module unavailable: compare with SAM keys
        expected = expected_shapes(arch, "sam")
        reference = f"a {arch} SAM model"
    missing, unexpected, _ = key_problems({k: None for k in state_dict}, {k: () for k in expected})
    return CheckpointError(
        f"unknown checkpoint layout in {where}: {reason}. Supported: "
        + "; ".join(f"{name} ({desc})" for name, desc in LAYOUT_DESCRIPTIONS.items() if name != "partial")
        + f".\nCompared with the keys of {reference}:"
        + format_key_problems(missing, unexpected)
    )


# --------------------------------------------------------------------------------------------------
# detection and normalisation
# --------------------------------------------------------------------------------------------------
def _strip_wrappers(keys: list[str]) -> str:
    """The prefix (possibly several wrappers, e.g. 'module.sam.') that every key carries."""
    prefix = ""
    current = keys
    for _ in range(3):
        if not current or all(key.split(".", 1)[0] in PARTS for key in current):
            break
        heads = {key.split(".", 1)[0] for key in current}
        if len(heads) != 1:
            break
        head = heads.pop()
        if head not in WRAPPER_PREFIXES or not all("." in key for key in current):
            break
        prefix += head + "."
        current = [key.split(".", 1)[1] for key in current]
    return prefix


def _container(obj: Mapping) -> tuple[str | None, Mapping]:
    """(container key, the mapping that holds the weights)."""
    for key in ("model_state", "model", "state_dict"):
        value = obj.get(key)
        if isinstance(value, Mapping):
            return key, value
    return None, obj


def _check_tensors(state: Mapping, where: str) -> None:
    import torch

    bad = [(key, type(value).__name__) for key, value in state.items() if not isinstance(value, torch.Tensor)]
    if bad:
        listed = ", ".join(f"{key!r} ({kind})" for key, kind in bad[:10])
        more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise CheckpointError(
            f"{where} is not a dict of tensors: {len(bad)} entr{'y is' if len(bad) == 1 else 'ies are'} not tensors: "
            f"{listed}{more}"
        )


def _layout_name(has_metadata: bool, container: str | None, prefix: str, architecture: str, decoder: str,
                 parts: tuple[str, ...]) -> str:
    """Which of LAYOUT_DESCRIPTIONS a checkpoint is, from what :func:`_analyse` found in it."""
    if has_metadata:
        return "project"
    if container == "model_state":
        return "micro_sam"
    if container == "model":
        return "medsam_training"
    if container == "state_dict":
        return "training_state_dict"
    if prefix.startswith("module."):
        return "robustmedsam_release" if decoder == "robust" else "ddp"
    if len(parts) < len(PARTS):
        return "partial"
    if architecture == "tiny_vit":
        return "lite_robust" if decoder == "robust" else "litemedsam"
    if decoder == "robust":
        return "robustsam"
    return "sam"


def _analyse(obj: Any, where: str) -> tuple[Layout, dict]:
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{where} is not a dict of tensors: it holds a {type(obj).__name__}")
    notices: list[str] = []
    metadata: dict = {}
    if project_format.is_project_checkpoint(obj):
        raw, metadata = project_format.unpack_project_checkpoint(obj, where)
        container, ignored = "state_dict", ()
    else:
        container, raw = _container(obj)
        ignored = tuple(str(k) for k in obj if k != container) if container else ()
        if container is None and not raw:
            raise CheckpointError(f"{where} is an empty dict: it holds no weights")
    _check_tensors(raw, where if container is None else f"{where} ['{container}']")
    keys = [str(k) for k in raw]
    prefix = _strip_wrappers(keys)
    state = {key[len(prefix):]: value for key, value in raw.items()} if prefix else dict(raw)
    head = metadata.get("head") if isinstance(metadata.get("head"), Mapping) else {}
    allowed = PARTS + (("feature_enhancer",) if head.get("kind") == "pge" else ())
    stray = [key for key in state if key.split(".", 1)[0] not in allowed]
    if stray and all(key.startswith("feature_enhancer.") for key in stray):
        raise CheckpointError(
            f"{where} holds {len(stray)} feature_enhancer.* tensors (a PGE-SAM head) but no metadata saying how to "
            "build that head; only project checkpoints written by training.fit (metadata 'head') carry one"
        )
    if stray:
        raise _layout_error(
            state,
            where,
            f"{len(stray)} of its {len(state)} tensors are outside image_encoder / prompt_encoder / mask_decoder",
        )
    parts = tuple(part for part in PARTS if any(key.startswith(part + ".") for key in state))
    architecture = infer_architecture(state, where)
    decoder = infer_decoder(state)

    if container == "model_state" and "decoder_state" in obj:
        dec = obj["decoder_state"]
        count = len(dec) if isinstance(dec, Mapping) else "some"
        notices.append(
            notice(
                f"{where} also holds a 'decoder_state' ({count} tensors): micro_sam's instance-segmentation "
                "(automatic segmentation) decoder. This product does not use it; it is ignored."
            )
        )

    name = _layout_name(bool(metadata), container, prefix, architecture, decoder, parts)
    if metadata:
        for key in ("architecture", "decoder"):
            recorded = metadata.get(key)
            found = architecture if key == "architecture" else decoder
            if recorded and found and recorded != found:
                raise CheckpointError(
                    f"{where}: its metadata says {key} {recorded!r} but its tensors are those of {found!r}; "
                    "the file is inconsistent (edited or damaged)"
                )
    layout = Layout(
        name=name,
        description=LAYOUT_DESCRIPTIONS[name],
        architecture=architecture,
        decoder=decoder,
        container_key=container,
        stripped_prefix=prefix,
        parts=parts,
        ignored=ignored,
        metadata=dict(metadata),
        notices=tuple(notices),
    )
    return layout, state


def detect_layout(obj: Any, where: str = "checkpoint") -> Layout:
    """Recognise the layout of a loaded checkpoint object (see the module docstring for the list)."""
    return _analyse(obj, where)[0]


def normalize(obj: Any, where: str = "checkpoint") -> tuple[dict, Layout]:
    """(canonical SAM-key state dict, layout) of a loaded checkpoint object."""
    layout, state = _analyse(obj, where)
    return state, layout


def read_checkpoint(source: str | os.PathLike | Mapping, *, source_hint: str | None = None) -> Checkpoint:
    """Read a checkpoint file safely (``weights_only=True``), detect its layout and normalise its keys.

    ``source`` may also be an already loaded mapping (then ``path`` is None).
    """
    if isinstance(source, Mapping):
        state, layout = normalize(source, "in-memory checkpoint")
        return Checkpoint(state_dict=state, layout=layout, path=None)
    path = Path(source).expanduser()
    obj = load_untrusted(path, source_hint=source_hint)
    state, layout = normalize(obj, str(path))
    return Checkpoint(state_dict=state, layout=layout, path=path)
