"""`robustmedsam info`: layout, architecture, parameter counts and provenance of a checkpoint."""

from __future__ import annotations

import argparse
import json


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "info",
        help="describe a checkpoint file or registry model",
        description=(
            "Print the layout, architecture, decoder, preprocessing, parameter counts per module and provenance "
            "of a checkpoint file or registry model (a registry model is fetched first if needed)."
        ),
    )
    parser.add_argument("checkpoint", metavar="CKPT|NAME", help="checkpoint file or registry model name")
    parser.add_argument("--json", action="store_true", help="print the description as JSON")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..checkpoints import describe_checkpoint, render_description

    from ..errors import CheckpointError

    info = describe_checkpoint(args.checkpoint)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        print(render_description(info))
    if info.get("load_problem"):
        raise CheckpointError(f"this checkpoint will not load as a model: {info['load_problem']}")
    return 0
