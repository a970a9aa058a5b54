"""`robustmedsam` command line: one sub-command per module in this package.

Each sub-command module exposes ``add_parser(subparsers)`` which registers its parser and sets
``func`` (called with the parsed namespace, returns an exit code). Keeping them apart keeps the
heavy imports (torch, napari) out of commands that do not need them.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import sys
import warnings

from . import progress
from .errors import UserFacingError

# Order is the order shown in `robustmedsam --help`.
_COMMAND_MODULES = (
    "demo",
    "segment",
    "embed",
    "fuse",
    "info",
    "degrade",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="robustmedsam",
        description="Robust interactive segmentation of medical images (SAM family).",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as err:
            # A sub-command whose module is not written yet is simply absent.
            if err.name == f"{__name__}.{name}":
                continue
            raise
        module.add_parser(subparsers)
    return parser


class _NoticeHandler(logging.Handler):
    """The project's notices (a guessed setting, an ignored part) as ``note:`` lines of their own."""

    def emit(self, record: logging.LogRecord) -> None:
        progress.message(f"note: {record.getMessage()}")


@contextlib.contextmanager
def _one_line_messages(command: str):
    """Warnings and notices of the package print as one line each, never in the middle of a status line."""
    logger = logging.getLogger("napari_robustmedsam")
    handler = _NoticeHandler(logging.WARNING)
    logger.addHandler(handler)
    saved_show = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if category.__module__.startswith("napari_robustmedsam"):
            progress.message(f"robustmedsam {command}: warning: {message}")
        else:
            progress.end_open_line()
            saved_show(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = saved_show
        logger.removeHandler(handler)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    with _one_line_messages(args.command):
        try:
            return int(args.func(args) or 0)
        except UserFacingError as err:
            progress.end_open_line(" failed")
            print(f"robustmedsam {args.command}: error: {err}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            progress.end_open_line(" interrupted")
            print(f"robustmedsam {args.command}: interrupted", file=sys.stderr)
            return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
