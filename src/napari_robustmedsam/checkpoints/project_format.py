"""The project's own checkpoint format: weights plus everything needed to use them correctly.

On disk (``torch.save``, loadable with ``weights_only=True``)::

    {
        "format": "napari-robustmedsam",
        "format_version": 1,
        "metadata": {...},        # only str / int / float / bool / list / dict / None
        "state_dict": {...},      # SAM key names: image_encoder.*, prompt_encoder.*, mask_decoder.*
    }

``metadata`` carries the architecture, the decoder kind, the preprocessing and why it was chosen, whether
the model is box-primary, the provenance (source files with sha256 and size, which tensor prefixes came
from where), the creation time (UTC, ISO 8601), the package version and a free-form ``extra`` dict (the
training code adds hyper-parameters and metrics there).

Files are written atomically: a temporary file in the destination directory, fsync, then ``os.replace``;
the final name never holds a half-written file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..models.input_conventions import PREPROCESSINGS
from ..errors import CheckpointError

FORMAT_NAME = "napari-robustmedsam"
FORMAT_VERSION = 1
PREPROCESSING_CHOICES = PREPROCESSINGS
DECODER_CHOICES = ("sam", "robust")
REQUIRED_METADATA = ("architecture", "decoder", "preprocessing")


def package_version() -> str:
    try:
        from .. import __version__

        return str(__version__)
    except Exception:  # pragma: no cover - the package always defines it
        return "unknown"


def utc_now_iso() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def make_metadata(
    *,
    architecture: str,
    decoder: str,
    preprocessing: str,
    preprocessing_reason: str = "",
    box_primary: bool = False,
    provenance: Mapping | None = None,
    extra: Mapping | None = None,
    **more: Any,
) -> dict:
    """Metadata dict with the fields every project checkpoint carries (extra keyword fields are kept)."""
    metadata = {
        "architecture": architecture,
        "decoder": decoder,
        "preprocessing": preprocessing,
        "preprocessing_reason": preprocessing_reason,
        "box_primary": bool(box_primary),
        "provenance": dict(provenance or {}),
        "created_utc": utc_now_iso(),
        "package_version": package_version(),
        "extra": dict(extra or {}),
    }
    metadata.update(more)
    return metadata


def check_metadata_value(value: Any, where: str = "metadata") -> Any:
    """Return a copy made only of str/int/float/bool/list/dict/None (tuples become lists).

    Anything else (a tensor, a numpy scalar, a Path, a custom object) is refused with an error naming the
    entry: such values would either need code to unpickle or would not load with ``weights_only=True``.
    """
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, (list, tuple)):
        return [check_metadata_value(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise CheckpointError(f"{where} has a non-string key {key!r}; metadata keys must be strings")
            out[key] = check_metadata_value(item, f"{where}.{key}")
        return out
    hint = ""
    if type(value).__module__.startswith("numpy"):
        hint = " (convert numpy values with .item() or .tolist())"
    elif type(value).__name__ == "Tensor":
        hint = " (convert tensors with .item() or .tolist(); weights belong in the state dict)"
    elif isinstance(value, os.PathLike):
        hint = " (store paths as str)"
    raise CheckpointError(
        f"{where} is a {type(value).__module__}.{type(value).__name__}; checkpoint metadata may only hold "
        f"str, int, float, bool, list, dict and None{hint}"
    )


def check_state_dict(state_dict: Mapping, where: str = "state dict") -> dict:
    import torch

    if not isinstance(state_dict, Mapping):
        raise CheckpointError(f"{where} must be a dict of tensors, got a {type(state_dict).__name__}")
    out = {}
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{where} has a non-string key {key!r}")
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{where} entry {key!r} is a {type(value).__name__}, not a tensor")
        out[key] = value
    return out


def _compact(tensor):
    """A tensor whose storage holds exactly its elements (torch.save writes whole storages)."""
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    if not tensor.is_contiguous() or tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        tensor = tensor.contiguous().clone()
    return tensor


def build_project_checkpoint(state_dict: Mapping, metadata: Mapping) -> dict:
    """The dict written to disk; validates the state dict and metadata first."""
    state = check_state_dict(state_dict)
    meta = check_metadata_value(dict(metadata))
    missing = [key for key in REQUIRED_METADATA if not meta.get(key)]
    if missing:
        raise CheckpointError(f"checkpoint metadata lacks {', '.join(missing)}; use make_metadata(...) to build it")
    if meta["decoder"] not in DECODER_CHOICES:
        raise CheckpointError(f"metadata decoder {meta['decoder']!r} is not one of {', '.join(DECODER_CHOICES)}")
    if meta["preprocessing"] not in PREPROCESSING_CHOICES:
        raise CheckpointError(
            f"metadata preprocessing {meta['preprocessing']!r} is not one of {', '.join(PREPROCESSING_CHOICES)}"
        )
    meta.setdefault("created_utc", utc_now_iso())
    meta.setdefault("package_version", package_version())
    meta.setdefault("extra", {})
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "metadata": meta,
        "state_dict": {key: _compact(value) for key, value in state.items()},
    }


def check_destination(path: str | os.PathLike) -> Path:
    """Cheap checks that ``path`` can be written (before any work is done to produce its content)."""
    path = Path(path).expanduser()
    directory = path.parent
    if path.is_dir():
        raise CheckpointError(
            f"cannot write checkpoint {path}: it is a directory; give a file name such as {path / 'model.pth'}"
        )
    if not directory.exists():
        if any(parent.exists() and not parent.is_dir() for parent in directory.parents):
            raise CheckpointError(f"cannot write checkpoint {path}: a parent of it is a file, not a directory")
        raise CheckpointError(f"cannot write checkpoint {path}: the directory {directory} does not exist")
    if not directory.is_dir():
        raise CheckpointError(f"cannot write checkpoint {path}: {directory} is not a directory")
    if not os.access(directory, os.W_OK):
        raise CheckpointError(f"cannot write checkpoint {path}: no permission to write in {directory}")
    return path


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to ``path`` atomically (the project's atomic write: temp file in the same directory,
    fsync, os.replace; a temp file a killed save left behind is removed by the next save)."""
    import torch

    from ..io.atomic import atomic_write_path

    path = check_destination(path)
    try:
        with atomic_write_path(path) as tmp:
            with open(tmp, "wb") as handle:
                torch.save(obj, handle)
    except CheckpointError:
        raise
    except (OSError, RuntimeError) as err:
        text = str(err)
        detail = getattr(err, "strerror", None) or (text.splitlines()[0] if text else type(err).__name__)
        raise CheckpointError(f"cannot write checkpoint {path}: {detail}; nothing was written under that name") from err
    return path


def save_checkpoint(path: str | os.PathLike, state_dict: Mapping, metadata: Mapping) -> Path:
    """Write ``state_dict`` + ``metadata`` in the project format, atomically. Returns the path written."""
    check_destination(path)
    return atomic_torch_save(build_project_checkpoint(state_dict, metadata), path)


def is_project_checkpoint(obj: Any) -> bool:
    return isinstance(obj, Mapping) and obj.get("format") == FORMAT_NAME


def unpack_project_checkpoint(obj: Mapping, where: str = "checkpoint") -> tuple[dict, dict]:
    """(state_dict, metadata) of a project-format dict, with clear errors for damaged or newer files."""
    version = obj.get("format_version")
    if not isinstance(version, int):
        raise CheckpointError(f"{where} says it is a {FORMAT_NAME} checkpoint but has no valid format_version")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{where} is a {FORMAT_NAME} checkpoint of format version {version}, written by a newer version of "
            f"this package (this one reads up to version {FORMAT_VERSION}); upgrade napari-robustmedsam"
        )
    state = obj.get("state_dict")
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{where} is a {FORMAT_NAME} checkpoint without a 'state_dict' dict")
    metadata = obj.get("metadata") or {}
    if not isinstance(metadata, Mapping):
        raise CheckpointError(f"{where} is a {FORMAT_NAME} checkpoint whose 'metadata' is not a dict")
    return check_state_dict(state, f"{where} state_dict"), dict(metadata)
