"""Status lines of the CLI on stderr (stdout stays clean for results).

A slow step prints ``loading model X ...`` and completes the line with its duration. Anything else printed
meanwhile (a warning, a notice, the error of a failed step) first ends that line, so every message starts on
a line of its own.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager

_open_line: str | None = None  # the text of the status line waiting for its " done", if any


def end_open_line(ending: str = "") -> None:
    """End a status line left open (before an error, a warning or a notice is printed)."""
    global _open_line
    if _open_line is not None:
        print(ending, file=sys.stderr, flush=True)
        _open_line = None


@contextmanager
def stage(text: str):
    """Print ``text ...`` for a slow step, then `` done (N s)``; an exception ends the line before it propagates."""
    global _open_line
    print(f"{text} ...", end="", file=sys.stderr, flush=True)
    _open_line = text
    start = time.perf_counter()
    try:
        yield
    except BaseException:
        end_open_line(" failed")
        raise
    elapsed = time.perf_counter() - start
    if _open_line is None:  # something was printed meanwhile: say which step finished
        print(f"{text}: done ({elapsed:.1f} s)", file=sys.stderr, flush=True)
    else:
        _open_line = None
        print(f" done ({elapsed:.1f} s)", file=sys.stderr, flush=True)


def message(text: str) -> None:
    """A line on stderr that starts on a line of its own."""
    end_open_line()
    print(text, file=sys.stderr, flush=True)
