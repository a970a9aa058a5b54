"""Where a command may write: never over one of its own inputs, and over another existing file only when asked.

Every writer of the project (the ``robustmedsam`` sub-commands, ``python -m training.fit``, the annotation
export and the Python writers such as :func:`~napari_robustmedsam.io.write_mask`) checks its output paths
here BEFORE any work is done::

    check_outputs([args.output], inputs=[args.image], overwrite=args.overwrite)

- An output that is one of the inputs is always refused, ``--overwrite`` or not: the same path after
  resolving symbolic links, or the same file under another name (a hard link: same device and inode).
- An output that already exists (a file, or a symbolic link, even a dangling one) is refused unless
  ``overwrite`` is true (``--overwrite`` on the command line), the convention of the field's tools.
- Two outputs of one command that are the same file are refused (one would silently replace the other).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from ..errors import UserFacingError

OVERWRITE_HINT = "pass --overwrite to replace it (overwrite=True from Python), or choose another name"


class OutputPathError(UserFacingError):
    """An output path would destroy an input or, without ``--overwrite``, an existing file."""


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when ``a`` and ``b`` name one file: equal after resolving links, or the same inode (hard link)."""
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    try:
        if pa.resolve() == pb.resolve():
            return True
    except (OSError, RuntimeError):  # a symlink loop: compare what can be compared below
        pass
    try:
        sa, sb = pa.stat(), pb.stat()
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _paths(values: Iterable[str | os.PathLike | None] | str | os.PathLike | None) -> list[Path]:
    if values is None:
        return []
    if isinstance(values, (str, os.PathLike)):
        values = [values]
    return [Path(v).expanduser() for v in values if v is not None and str(v) != ""]


def check_output(path: str | os.PathLike, *, inputs=(), overwrite: bool = False) -> Path:
    """Check one output file path (see the module docstring); return it as a :class:`Path`."""
    return check_outputs([path], inputs=inputs, overwrite=overwrite)[0]


def check_outputs(paths, *, inputs=(), overwrite: bool = False) -> list[Path]:
    """Check every output file of a command against its inputs, existing files and each other."""
    outputs = _paths(paths)
    sources = _paths(inputs)
    for k, out in enumerate(outputs):
        for source in sources:
            if same_file(out, source):
                shown = "" if out == source else f" ({source})"
                raise OutputPathError(
                    f"refusing to write {out}: it is an input of this command{shown} and would be destroyed; "
                    "choose another output name"
                )
        for other in outputs[:k]:
            if same_file(out, other):
                raise OutputPathError(f"two outputs of this command are the same file ({other} and {out}); give each its own name")
        if out.is_dir():
            raise OutputPathError(f"cannot write {out}: it is a folder; give a file name")
        if (out.exists() or out.is_symlink()) and not overwrite:
            raise OutputPathError(f"{out} already exists: {OVERWRITE_HINT}")
    return outputs


def check_output_folder(folder: str | os.PathLike, names: Iterable[str], *, inputs=(), overwrite: bool = False) -> Path:
    """Check the files ``names`` (relative paths) a command will write under ``folder``, as :func:`check_outputs`.

    The folder itself may exist; it must not be a file or one of the inputs.
    """
    out = Path(folder).expanduser()
    if out.exists() and not out.is_dir():
        raise OutputPathError(f"cannot write into {out}: it is a file, not a folder; choose another output folder")
    for source in _paths(inputs):
        if source.is_dir() and same_file(out, source):
            raise OutputPathError(f"the output folder {out} is an input folder of this command; choose another one")
    check_outputs([out / name for name in names], inputs=inputs, overwrite=overwrite)
    return out


def existing_file(value: str | os.PathLike | None) -> Path | None:
    """``value`` as a path when it names an existing file (e.g. ``--model``: a checkpoint file, not a registry name)."""
    if value is None:
        return None
    path = Path(value).expanduser()
    return path if path.is_file() else None


def add_overwrite_argument(parser) -> None:
    """The ``--overwrite`` flag every writing sub-command has (one wording everywhere)."""
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace output files that already exist (an input of the command is never written over)",
    )
