"""Shared pieces of the fault-injection tests (tests/test_faults_*.py, marker ``faults``)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_png(path: Path, size: int = 64, seed: int = 0) -> Path:
    import imageio.v3 as iio

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    disc = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (size / 4) ** 2
    image = (disc * 150 + rng.integers(0, 60, (size, size))).astype(np.uint8)
    iio.imwrite(path, image)
    return path


def one_error_line(stderr: str, command: str) -> str:
    """The error line of a CLI run: it starts a line of its own, and no traceback was printed."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith(f"robustmedsam {command}: error: ")]
    assert len(lines) == 1, stderr
    return lines[0]


def dead_pid() -> int:
    """A process id that no process has now."""
    import os

    for pid in range(4_194_000, 4_000_000, -1):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            continue
    raise RuntimeError("no free process id found")
