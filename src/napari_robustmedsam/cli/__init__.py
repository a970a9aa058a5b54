"""`robustmedsam` command line: one sub-command per module in this package.

Each sub-command module exposes ``add_parser(subparsers)`` which registers its parser and sets
``func`` (called with the parsed namespace, returns an exit code). Keeping them apart keeps the
heavy imports (torch, napari) out of commands that do not need them.
"""

from __future__ import annotations

import argparse
import importlib
import sys

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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserFacingError as err:
        print(f"robustmedsam {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"robustmedsam {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
