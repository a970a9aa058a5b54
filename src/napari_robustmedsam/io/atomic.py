"""Atomic file writes: a crash or a full disk never leaves a half-written file under the final name.

The data goes to a hidden temporary file next to the target, named ``.<stem>.<pid>.<random>.tmp<suffix>``,
which replaces the target in one rename once it is complete. A process killed mid-write (SIGKILL, power
loss) cannot remove its temporary file; the next atomic write into the same folder removes every such file
whose writing process no longer runs (once per folder and process), so stale temporary files do not pile up.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import threading
import time
from pathlib import Path

# ".<stem>.<pid>.<8 random chars>.tmp<suffix>" (this module) or ".<stem>.<8 random chars>.tmp<suffix>" (older
# versions, which did not record the writer's process id).
_TMP_NAME = re.compile(r"^\..+?\.(?:(?P<pid>\d+)\.)?[a-z0-9_]{8}\.tmp(?:\.[^/]*)?$")
# A temporary file without a process id is only taken for stale after this long (a write never lasts this long).
_UNOWNED_TMP_AGE_S = 3600.0
# Folders already cleaned by this process: a folder is scanned once, not at each of the many files written into it.
_cleaned_folders: set[str] = set()
_cleaned_lock = threading.Lock()


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # it exists but belongs to someone else
    return True


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files killed atomic writes left in ``folder``; return what was removed."""
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        match = _TMP_NAME.match(entry.name)
        if match is None:
            continue
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            pid = match.group("pid")
            if pid is not None:
                stale = not _process_alive(int(pid))
            else:
                stale = now - entry.stat(follow_symlinks=False).st_mtime > _UNOWNED_TMP_AGE_S
            if stale:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            continue  # another process removed or renamed it meanwhile
    return removed


def _fsync_directory(directory: Path) -> None:
    """Make a rename inside ``directory`` durable (POSIX); silently skipped where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write_path(path: str | os.PathLike, suffix: str | None = None):
    """Yield a temporary path in the target's directory; on success it replaces ``path`` atomically.

    The temporary file keeps the target's suffix (writers such as imageio choose the format from it).
    On any exception the temporary file is removed and the target is left untouched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    folder = os.path.abspath(target.parent)
    with _cleaned_lock:
        first_write_here = folder not in _cleaned_folders
        _cleaned_folders.add(folder)
    if first_write_here:
        remove_stale_temporaries(folder)
    suffix = suffix if suffix is not None else "".join(target.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}.{os.getpid()}.", suffix=f".tmp{suffix}", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; a written file gets the usual permissions
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, target)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    _fsync_directory(target.parent)
