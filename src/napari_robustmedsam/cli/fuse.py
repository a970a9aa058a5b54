"""`robustmedsam fuse`: image encoder (+ prompt encoder) from one checkpoint, mask decoder from another."""

from __future__ import annotations

import argparse

from ..io.output_paths import add_overwrite_argument


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "fuse",
        help="combine the image encoder of one checkpoint with the mask decoder of another",
        description=(
            "Fuse checkpoints module-wise (as RobustMedSAM does: MedSAM encoder + RobustSAM decoder). "
            "A and B are registry model names or checkpoint files in any supported layout. The parts are "
            "checked to fit before anything is written; the output records its preprocessing and provenance."
        ),
    )
    parser.add_argument("--encoder", required=True, metavar="A", help="source of the image encoder")
    parser.add_argument("--decoder", required=True, metavar="B", help="source of the mask decoder")
    parser.add_argument(
        "--prompt-encoder",
        choices=("encoder", "decoder"),
        default="encoder",
        help="take the prompt encoder from the encoder's source (default) or the decoder's",
    )
    parser.add_argument(
        "--preprocessing",
        choices=("sam", "medsam", "litemedsam"),
        default=None,
        help="preprocessing to record (default: that of the encoder's source)",
    )
    parser.add_argument("-o", "--output", required=True, metavar="OUT", help="output checkpoint file")
    add_overwrite_argument(parser)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..checkpoints import describe_checkpoint, fuse_checkpoints, render_description

    fuse_checkpoints(
        args.encoder,
        args.decoder,
        prompt_encoder_from=args.prompt_encoder,
        out=args.output,
        preprocessing=args.preprocessing,
        overwrite=args.overwrite,
    )
    print(f"wrote {args.output}")
    print(render_description(describe_checkpoint(args.output)))
    return 0
