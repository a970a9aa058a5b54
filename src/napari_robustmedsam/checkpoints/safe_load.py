"""Reading checkpoint files safely: the ONLY place in the project that calls ``torch.load``.

A checkpoint is untrusted input. Python's pickle can run arbitrary code while loading, so every file is
read with ``weights_only=True``: tensors, numbers, strings, lists and dicts load; anything that needs code
(a pickled class, a function call) is refused before it runs. Every failure becomes a
:class:`~napari_robustmedsam.errors.CheckpointError` naming the file, the cause and what to do.

This module also holds the file hash (sha256) with a cache keyed by (path, size, mtime), so reloading a
large checkpoint does not hash it again, and the notice channel the checkpoint package reports through.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import re
import threading
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import CheckpointError

logger = logging.getLogger("napari_robustmedsam.checkpoints")

_TRUNCATION_MARKERS = (
    "failed finding central directory",
    "pytorchstreamreader",
    "unexpected eof",
    "file might be corrupted",
    "invalid header",
    "zip archive",
    "truncated",
    "corrupt",
)


def notice(message: str) -> str:
    """Report something the user should know but that is not an error (a guess, an ignored part).

    Notices go to the ``napari_robustmedsam.checkpoints`` logger at WARNING level (printed to stderr when
    the application configured no logging) and are returned so callers can collect them.
    """
    logger.warning(message)
    return message


def human_size(num_bytes: int | None) -> str:
    if num_bytes is None:
        return "size unknown"
    value = float(num_bytes)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{num_bytes} B"  # pragma: no cover


# --------------------------------------------------------------------------------------------------
# file hashes
# --------------------------------------------------------------------------------------------------
_HASH_CACHE: dict[tuple[str, int, int], str] = {}
_HASH_LOCK = threading.Lock()


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 (hex) of a file, cached per (resolved path, size, mtime) for the life of the process."""
    path = Path(path)
    try:
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    except OSError as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {err.strerror or err}") from err
    with _HASH_LOCK:
        cached = _HASH_CACHE.get(key)
    if cached is not None:
        return cached
    digest = hashlib.sha256()
    try:
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(4 * 1024 * 1024), b""):
                digest.update(block)
    except OSError as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {err.strerror or err}") from err
    value = digest.hexdigest()
    with _HASH_LOCK:
        _HASH_CACHE[key] = value
    return value


# --------------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------------
def _conversion_hint(path: Path) -> str:
    out = path.with_name(path.stem + "_weights.pth")
    return (
        "If (and only if) you trust where this file comes from, convert it once to a plain dict of tensors "
        "in a separate Python session, e.g.\n"
        f"    python -c \"import torch; c = torch.load(r'{path}', map_location='cpu', weights_only=False); "
        "sd = c.state_dict() if hasattr(c, 'state_dict') else c.get('model_state', c.get('model', c)); "
        f"torch.save({{k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}}, r'{out}')\"\n"
        "and load the converted file instead."
    )


def _is_code_refusal(message: str) -> bool:
    lowered = message.lower()
    if "weights only load failed" not in lowered:
        return False
    # torch names the refused global ("Unsupported global: GLOBAL posix.system ..." or
    # "Trying to load unsupported GLOBAL x.y"); a random byte stream gives "Unsupported operand N".
    return bool(
        re.search(r"GLOBAL\s", message)
        or re.search(r"unsupported global|unsupported class|not an allowed global", message, re.IGNORECASE)
    )


def _refused_global(message: str) -> str | None:
    match = re.search(r"GLOBAL\s+([\w.]+)", message)
    return match.group(1) if match else None


_BENIGN_GLOBAL_MODULES = ("torch", "collections", "_codecs", "builtins")
_CODE_OPCODES = {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "REDUCE", "BUILD"}
_SCAN_LIMIT = 64 * 1024 * 1024


def _pickle_bytes(path: Path) -> bytes | None:
    """The pickle stream of a checkpoint (``data.pkl`` inside a torch zip file, or the file itself)."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                names = [n for n in archive.namelist() if n.endswith("data.pkl")]
                return archive.read(names[0])[:_SCAN_LIMIT] if names else None
        with path.open("rb") as handle:
            return handle.read(_SCAN_LIMIT)
    except (OSError, zipfile.BadZipFile, KeyError):
        return None


def foreign_globals(path: Path) -> list[str] | None:
    """Globals (``module.name``) a pickle would import, outside torch's own rebuild helpers.

    Static disassembly with :mod:`pickletools` (nothing is executed). None if the stream cannot be
    disassembled at all.
    """
    import pickletools

    data = _pickle_bytes(path)
    if not data:
        return None
    found: list[str] = []
    strings: list[str] = []
    saw_code = False
    try:
        for opcode, arg, _pos in pickletools.genops(data):
            if isinstance(arg, str):
                strings.append(arg)
            if opcode.name == "GLOBAL" or opcode.name == "INST":
                module, _, name = str(arg).replace(" ", ".", 1).partition(".")
                found.append(f"{module}.{name}")
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
            if opcode.name in _CODE_OPCODES:
                saw_code = True
    except Exception:  # noqa: BLE001 - truncated or not a pickle: keep what was seen
        if not found and not saw_code:
            return None
    return [g for g in found if g.split(".", 1)[0] not in _BENIGN_GLOBAL_MODULES]


def _detail(message: str) -> str:
    """A short cause from torch's message, without its advice to load with ``weights_only=False``."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    kept = [line for line in lines if "weights_only" not in line and "weights only" not in line.lower()
            and not line.lower().startswith(("check the documentation", "(1)", "(2)", "please file an issue"))]
    return (kept[-1] if kept else "unpickling failed")[:200]


def load_untrusted(path: str | os.PathLike, *, source_hint: str | None = None, what: str = "checkpoint",
                   fix: str | None = None) -> Any:
    """Load a checkpoint file without ever executing code from it.

    ``source_hint`` says where the file can be obtained again (a URL or project page); it is used in the
    "truncated or corrupt, re-download it from ..." message. ``what`` names the kind of file in the messages
    (e.g. "training state") and ``fix`` replaces the advice given when the file holds pickled code (for a
    model checkpoint: how to convert a trusted file to plain tensors). Returns the loaded object, which is
    always a mapping (anything else is refused with a :class:`CheckpointError`).

    Every message is the project's own: torch's text (which suggests ``weights_only=False``) is never shown.
    """
    path = Path(path).expanduser()
    where = source_hint or "where you got it"
    if not path.exists():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"checkpoint path is a directory, not a file: {path}")
    try:
        size = path.stat().st_size
    except OSError as err:
        raise CheckpointError(f"cannot read {what} {path}: {err.strerror or err}") from err
    if size == 0:
        raise CheckpointError(f"{what} {path} is empty (0 bytes): truncated or corrupt, re-download it from {where}")

    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        message = str(err)
        foreign = None if _is_code_refusal(message) else foreign_globals(path)
        if _is_code_refusal(message) or foreign:
            name = _refused_global(message) or (foreign[0] if foreign else None)
            calls = f" (it asks to import and call `{name}`)" if name else ""
            advice = fix if fix is not None else f"Checkpoints must be plain dicts of tensors.\n{_conversion_hint(path)}"
            raise CheckpointError(
                f"{what} {path} contains executable pickled objects{calls} and is refused for safety: "
                f"loading it could run arbitrary code on this computer. {advice}"
            ) from None
        raise CheckpointError(
            f"{what} {path} ({human_size(size)}) is not a readable PyTorch checkpoint: truncated or corrupt, "
            f"re-download it from {where} (detail: {_detail(message)})"
        ) from None
    except (EOFError, zipfile.BadZipFile) as err:
        raise CheckpointError(
            f"{what} {path} ({human_size(size)}) is truncated or corrupt, re-download it from {where} "
            f"(detail: {type(err).__name__}: {err or 'file ends early'})"
        ) from None
    except RuntimeError as err:
        message = str(err)
        lowered = message.lower()
        if any(marker in lowered for marker in _TRUNCATION_MARKERS):
            first = message.splitlines()[0][:200] if message else ""
            raise CheckpointError(
                f"{what} {path} ({human_size(size)}) is truncated or corrupt, re-download it from {where} "
                f"(detail: {first})"
            ) from None
        raise CheckpointError(f"cannot load {what} {path}: {_detail(message)}") from None
    except OSError as err:
        raise CheckpointError(f"cannot read {what} {path}: {err.strerror or err}") from None
    except Exception as err:  # noqa: BLE001 - any other failure of the unpickler means a damaged file
        raise CheckpointError(
            f"{what} {path} ({human_size(size)}) cannot be read as a PyTorch checkpoint: truncated or corrupt, "
            f"re-download it from {where} (detail: {type(err).__name__}: {str(err)[:200]})"
        ) from None
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{what} {path} is not a dict of tensors: it holds a {type(obj).__name__}. Expected a state dict "
            "(name -> tensor) or a training checkpoint that contains one (e.g. {'model': state_dict})."
        )
    return obj
