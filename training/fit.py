"""Fine-tune the robust decoder on your labels: ``python -m training.fit --data DIR``.

Examples::

    # medseg-layout folder (<dataset>/images/*.png + <dataset>/masks/*.png), LiteMedSAM + lite robust decoder
    python -m training.fit --data ../shared/data/medseg --epochs 5 --out runs/ft

    # the documented CPU preset (benchmark settings of docs/training.md)
    python -m training.fit --data ../shared/data/medseg --preset robust-lite --out runs/robust-lite

    # continue an interrupted run exactly
    python -m training.fit --data ../shared/data/medseg --preset robust-lite --out runs/robust-lite --resume

    # data-parallel on 2 processes (gloo on CPU, nccl on CUDA)
    torchrun --nproc_per_node=2 -m training.fit --data ../shared/data/medseg --out runs/ddp

Outputs in --out: last.pth, best.pth (project checkpoints: load them in the annotator or with --model for
``python -m training.evaluate``), train_state.pt (for --resume), log.csv, log.json, training.png.
See docs/training.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from napari_robustmedsam.annotation.click_policy import CLICK_POLICIES
from napari_robustmedsam.errors import UserFacingError
from napari_robustmedsam.io.output_paths import existing_file
from training.finetune import ddp
from training.finetune.config import TrainConfig
from training.finetune.data import TrainingError, describe_items, items_from_folder, items_from_session, split_items
from training.finetune.losses import LossWeights
from training.finetune.options import add_arguments, given_values
from training.finetune.presets import PRESETS, build_config, preset
from training.finetune.prompt_simulation import PromptConfig, policy_settings
from training.finetune.run_io import check_out_dir, check_run_outputs
from training.finetune.trainer import Trainer

SETTING_CLASSES = (TrainConfig, LossWeights, PromptConfig)


def build_parser() -> argparse.ArgumentParser:
    """The options: data and run options here, every training setting from its field (:mod:`training.finetune.
    config`), so its default and help are written once."""
    p = argparse.ArgumentParser(
        prog="python -m training.fit",
        description="Fine-tune a (lite) robust mask decoder on clean/degraded pairs with iterative prompts "
        "(encoders frozen; Dice + focal + RobustSAM consistency losses).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("Outputs", 1)[0].split("Examples::", 1)[1] if "Examples::" in __doc__ else None,
    )
    src = p.add_argument_group("data")
    src.add_argument("--data", action="append", default=None,
                     help="folder with <dataset>/images + <dataset>/masks (medseg layout) and/or <volume>/image + "
                     "labels volumes (TIFF, NIfTI, NRRD, MHA, NPY; the image may be a DICOM series folder); repeatable")
    src.add_argument("--session", action="append", default=None,
                     help="annotation session saved by the annotator (labels file or .prompts.json); repeatable")
    src.add_argument("--session-image", action="append", default=None,
                     help="image file of each --session (default: the image recorded in the session)")
    src.add_argument("--datasets", default=None, help="comma-separated dataset names to use from --data")
    src.add_argument("--modality", default=None, help="modality for the degradations (default: from MANIFEST.json)")
    src.add_argument("--val-fraction", type=float, default=None,
                     help=f"share of images held out (default {preset(None).val_fraction}, or the preset's)")
    src.add_argument("--min-object-px", type=int, default=20, help="ignore objects smaller than this (default 20)")

    m = p.add_argument_group("model and run")
    m.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="a documented recipe: " + " ".join(f"{k}: {v.use}" for k, v in sorted(PRESETS.items())))
    m.add_argument("--out", default="runs/finetune", help="output folder (default runs/finetune)")
    m.add_argument("--resume", action="store_true", help="continue the run saved in --out exactly")
    m.add_argument("--overwrite", action="store_true",
                   help="start a new run in an --out folder that holds an earlier run's files, replacing them")
    lo = p.add_argument_group("loss (RobustSAM / RobustMedSAM weights by default)")
    lo.add_argument("--no-consistency", action="store_true",
                    help="plain decoder fine-tuning (feature and token weights 0): the papers' ablation")
    pr = p.add_argument_group("prompts and degradations")
    pr.add_argument("--policy", choices=sorted(CLICK_POLICIES), default=None,
                    help="simulate a named click policy's click path (annotation/click_policy.py: 'annotator' = "
                         "what the annotator does by default); the single click-path options below override it")
    add_arguments(p, SETTING_CLASSES, {g.title: g for g in (m, lo, pr)})
    return p


def config_from_args(args) -> tuple[TrainConfig, float]:
    """The run's settings: each field's default, then the preset's, then the options given; and the validation
    share of the images."""
    chosen = preset(args.preset)
    policy = policy_settings(args.policy) if args.policy else {}
    settings = {**chosen.settings, **policy, **given_values(args, SETTING_CLASSES)}
    if args.no_consistency:
        settings.update(feature=0.0, token=0.0)
    val_fraction = args.val_fraction if args.val_fraction is not None else chosen.val_fraction
    return build_config(settings), val_fraction


def load_items(args, notices: list[str]):
    items = []
    if not args.data and not args.session:
        raise TrainingError("give training data: --data FOLDER and/or --session FILE")
    datasets = [d.strip() for d in args.datasets.split(",")] if args.datasets else None
    for folder in args.data or []:
        items.extend(items_from_folder(folder, modality=args.modality, datasets=datasets,
                                       min_object_px=args.min_object_px, notices=notices))
    images = list(args.session_image or [])
    for k, session in enumerate(args.session or []):
        image = images[k] if k < len(images) else None
        items.extend(items_from_session(session, image, modality=args.modality or "generic", notices=notices))
    keys = [it.key for it in items]
    if len(set(keys)) != len(keys):
        raise TrainingError("two training images have the same name; give each --data / --session once")
    return items


def _remove_if_left_empty(out: str, existed: bool) -> None:
    """A run that stopped before writing anything leaves no empty --out folder behind (only one it created)."""
    if existed:
        return
    try:
        Path(out).expanduser().rmdir()  # fails, and keeps the folder, when anything is in it
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    ctx = ddp.DistContext()
    out_existed = Path(args.out).expanduser().exists()
    try:
        notices: list[str] = []
        cfg, val_fraction = config_from_args(args)
        if ctx.is_main:
            check_out_dir(args.out, create=False)  # fail before any work if the folder cannot be written
        items = load_items(args, notices)
        shown = len(notices)
        if ctx.is_main:
            for n in notices:  # now: a skipped file is named even when the run stops before it starts
                print(f"note: {n}", file=sys.stderr)
            inputs = [existing_file(cfg.model), *(args.session or []), *(args.session_image or []),
                      *(it.source for it in items if it.source)]
            check_run_outputs(args.out, inputs=inputs, resume=args.resume, overwrite=args.overwrite)
        train, val = split_items(items, val_fraction, seed=cfg.seed, notices=notices)
        ctx = ddp.init(cfg.device)
        description = {
            "sources": [str(Path(d).resolve()) for d in (args.data or [])] + [str(s) for s in (args.session or [])],
            "split": {"val_fraction": val_fraction, "seed": cfg.seed},
            "train": describe_items(train),
            "validation": describe_items(val),
            "train_keys": [it.key for it in train],
            "validation_keys": [it.key for it in val],
        }
        if ctx.is_main:
            for n in notices[shown:]:
                print(f"note: {n}", file=sys.stderr)
            print(f"training on {len(train)} images ({sum(len(i.object_ids) for i in train)} objects), validating on "
                  f"{len(val)}; model {cfg.model}; out {args.out}" + (f"; {ctx.world_size} processes ({ctx.backend})"
                                                                      if ctx.active else ""), file=sys.stderr)
        t0 = time.perf_counter()

        def progress(done, total, message):
            if ctx.is_main and message.startswith("features") and (done == total or done % 20 == 0):
                print(f"  {message} [{done}/{total}]", file=sys.stderr)

        trainer = Trainer(cfg, args.out, train, val, data_description=description, progress=progress, ctx=ctx,
                          notices=notices)
        result = trainer.run(resume=args.resume)
        if ctx.is_main:
            last = result.history[-1] if result.history else {}
            summary = {k: round(v, 4) for k, v in last.items() if isinstance(v, float) and k.startswith("val_")}
            print(json.dumps({"stopped": result.stopped, "last": str(result.last), "best": str(result.best),
                              "best_epoch": trainer.best.get("epoch"), "metrics": summary,
                              "wall_s": round(time.perf_counter() - t0, 1)}, indent=1))
            if result.message:
                print(result.message, file=sys.stderr)
        code = {"completed": 0, "time budget": 0, "nan": 3, "interrupted": 130, "cancelled": 130}.get(result.stopped, 1)
        return code
    except UserFacingError as err:
        if ctx.is_main:
            _remove_if_left_empty(args.out, out_existed)
            print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if ctx.is_main:
            _remove_if_left_empty(args.out, out_existed)
            print("interrupted before training started; nothing to resume", file=sys.stderr)
        return 130
    finally:
        ddp.cleanup(ctx)


if __name__ == "__main__":
    sys.exit(main())
