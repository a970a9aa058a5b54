"""Where a checkpoint comes from and what it says about itself: a registry name, a file or an in-memory dict
resolved to a :class:`Source` (its tensors, registry entry, path and sha256), a head-delta file rebuilt onto its
base model, and the preprocessing and box-primary choice it implies. :mod:`.loading` builds models from these
and :mod:`.fusion` combines them; both import this module, which imports neither.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError, UserFacingError
from ..models.registry import MODELS, ModelSpec, get_model_spec
from .download import fetch_weights
from .head_delta import compose, delta_base, is_delta
from .layouts import Checkpoint, format_key_problems, key_problems, normalize, read_checkpoint
from .project_format import PREPROCESSING_CHOICES
from .safe_load import file_sha256, load_untrusted

_PATH_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin", ".tar", ".pkl")
BOX_PRIMARY_PREPROCESSING = ("medsam", "litemedsam")  # MedSAM and LiteMedSAM were trained with boxes only


@dataclass
class Source:
    """A resolved checkpoint and what is known about where it came from."""

    label: str  # what the user gave (name or path)
    checkpoint: Checkpoint
    spec: ModelSpec | None = None  # registry entry, when given by name (or recognised)
    spec_match: str = ""  # how the registry entry was found: "name", "sha256", "file name"
    path: Path | None = None
    sha256: str | None = None
    size_bytes: int | None = None

    def provenance(self) -> dict:
        return {
            "given": self.label,
            "registry_name": self.spec.name if self.spec else None,
            "registry_match": self.spec_match or None,
            "path": str(self.path) if self.path else None,
            "filename": self.path.name if self.path else None,
            "sha256": self.sha256,
            "size_bytes": self.size_bytes,
            "layout": self.checkpoint.layout.name,
            "architecture": self.checkpoint.architecture,
            "decoder": self.checkpoint.decoder,
        }


def looks_like_path(value: str | os.PathLike) -> bool:
    text = os.fspath(value)
    return (
        isinstance(value, os.PathLike)
        or "/" in text
        or os.sep in text
        or text.lower().endswith(_PATH_SUFFIXES)
        or text.startswith("~")
    )


def base_state(base: str, *, cache_dir=None, progress: bool = True) -> tuple[dict, str]:
    """(the full state dict registry model ``base`` loads with, the sha256 of its weights file)."""
    source = resolve_source(base, cache_dir=cache_dir, progress=progress)
    state = dict(source.checkpoint.state_dict)
    if source.spec is not None and source.spec.robust_init and source.checkpoint.decoder == "sam":
        state = with_identity_robust_decoder(state, f"registry model '{base}'")
    return state, source.sha256 or ""


def read_model_file(path: str | os.PathLike, *, source_hint: str | None = None, cache_dir=None,
                    progress: bool = True) -> Checkpoint:
    """Read a checkpoint file safely and normalise it; a head delta (:mod:`.head_delta`) is rebuilt onto its base."""
    path = Path(path).expanduser()
    obj = load_untrusted(path, source_hint=source_hint)
    if is_delta(obj):
        base, _ = delta_base(obj, str(path))
        try:
            reference, sha = base_state(base, cache_dir=cache_dir, progress=progress)
        except CheckpointError as err:
            raise CheckpointError(f"{path} stores only what differs from model '{base}', which cannot be loaded: "
                                  f"{err}") from None
        obj = compose(obj, str(path), reference, sha)
    state, layout = normalize(obj, str(path))
    return Checkpoint(state_dict=state, layout=layout, path=path)


def _registry_match(path: Path, sha256: str) -> tuple[ModelSpec | None, str]:
    for spec in MODELS.values():
        if spec.known_hash and spec.known_hash.lower() == f"sha256:{sha256}":
            return spec, "sha256"
    for spec in MODELS.values():
        if path.name == spec.filename:
            return spec, "file name"
    return None, ""


def resolve_source(
    source: str | os.PathLike | Checkpoint | Mapping | Source,
    *,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> Source:
    """Read a checkpoint given as a registry name, a file path, a :class:`Checkpoint` or a loaded dict."""
    if isinstance(source, Source):
        return source
    if isinstance(source, Checkpoint):
        path = source.path
        sha = file_sha256(path) if path and path.is_file() else None
        return Source(label=str(path or "in-memory checkpoint"), checkpoint=source, path=path, sha256=sha,
                      size_bytes=path.stat().st_size if sha else None)
    if isinstance(source, Mapping):
        return Source(label="in-memory checkpoint", checkpoint=read_checkpoint(source))
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.exists() or looks_like_path(source):
        checkpoint = read_model_file(path, cache_dir=cache_dir, progress=progress)
        sha = file_sha256(path)
        spec, how = _registry_match(path, sha)
        return Source(label=text, checkpoint=checkpoint, spec=spec, spec_match=how, path=path, sha256=sha,
                      size_bytes=path.stat().st_size)
    try:
        spec = get_model_spec(text)
    except UserFacingError as err:
        raise CheckpointError(f"{err} (no file named {text!r} exists either)") from None
    weights = fetch_weights(spec, cache_dir=cache_dir, progress=progress)
    checkpoint = read_model_file(weights, source_hint=spec.url or spec.manual_download or spec.source,
                                 cache_dir=cache_dir, progress=progress)
    where = f"registry model '{spec.name}' ({weights})"
    file_decoder = "sam" if spec.robust_init else spec.decoder  # robust_init builds the robust parts itself
    if checkpoint.architecture != spec.architecture or checkpoint.decoder != file_decoder:
        raise CheckpointError(
            f"{where}: the file holds a {checkpoint.architecture} model with a {checkpoint.decoder} decoder, "
            f"but the registry expects {spec.architecture} with a {file_decoder} decoder; the file at that path is "
            "not the right one: remove it so it can be fetched again"
        )
    return Source(label=text, checkpoint=checkpoint, spec=spec, spec_match="name", path=weights,
                  sha256=file_sha256(weights), size_bytes=weights.stat().st_size)


def infer_preprocessing(source: Source) -> tuple[str, str, bool]:
    """(preprocessing, why, guessed) for the weights of ``source``."""
    ckpt = source.checkpoint
    if source.spec is not None and source.spec_match in ("name", "sha256"):
        how = "registry model" if source.spec_match == "name" else "sha256 matches registry model"
        return source.spec.preprocessing, f"{how} '{source.spec.name}'", False
    recorded = ckpt.metadata.get("preprocessing")
    if recorded in PREPROCESSING_CHOICES:
        reason = ckpt.metadata.get("preprocessing_reason") or ""
        return recorded, "recorded in the checkpoint's metadata" + (f"; {reason}" if reason else ""), False
    if source.spec is not None:
        return (
            source.spec.preprocessing,
            f"guessed from the file name, which is that of registry model '{source.spec.name}'",
            True,
        )
    if ckpt.architecture == "tiny_vit":
        return "litemedsam", "guessed from the layout: a TinyViT encoder is LiteMedSAM's", True
    if ckpt.layout.name == "medsam_training":
        return "medsam", "guessed from the layout: MedSAM's training checkpoint {'model': ...}", True
    return "sam", f"guessed: a {ckpt.layout.name} layout checkpoint without metadata is taken to use SAM's", True


def infer_box_primary(source: Source, preprocessing: str) -> bool:
    recorded = source.checkpoint.metadata.get("box_primary")
    if isinstance(recorded, bool):
        return recorded
    if source.spec is not None:
        return source.spec.box_primary
    return preprocessing in BOX_PRIMARY_PREPROCESSING


def check_state_dict_fits(state_dict: Mapping, expected: Mapping, where: str, what: str) -> None:
    """Raise a CheckpointError naming every missing, unexpected or mis-shaped tensor."""
    missing, unexpected, mismatched = key_problems(state_dict, expected)
    if missing or unexpected or mismatched:
        raise CheckpointError(f"{where} does not fit {what}:" + format_key_problems(missing, unexpected, mismatched))


def with_identity_robust_decoder(state: Mapping, where: str) -> dict:
    """Replace a TinyViT checkpoint's plain decoder by the lite robust decoder built from it.

    The SAM parts keep their tensors; the robust parts are initialised so that they change nothing
    (see :mod:`napari_robustmedsam.models.lite_robust_decoder`) until the decoder is fine-tuned.
    """
    from ..models.lite_robust_decoder import build_lite_robust_decoder

    try:
        decoder = build_lite_robust_decoder(state)
    except ValueError as err:
        raise CheckpointError(f"cannot build a lite robust decoder from {where}: {err}") from None
    out = {key: value for key, value in state.items() if not key.startswith("mask_decoder.")}
    out.update({f"mask_decoder.{key}": value for key, value in decoder.state_dict().items()})
    return out
