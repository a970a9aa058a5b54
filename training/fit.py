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

PRESETS: dict[str, dict] = {
    # CPU preset of the benchmark (benchmarks/train_lite.py): LiteMedSAM encoder, lite robust decoder.
    "robust-lite": dict(model="litemedsam_robust", epochs=6, batch_size=2, objects_per_image=2, lr=2e-4,
                        n_steps=3, p_box=0.5, points="1,3", p_mask=0.5, variants=2, p_identity=0.2,
                        val_fraction=0.1, time_budget=40.0, train_amfg=False, consistency_steps="first"),
    # CPU preset of the PGE-SAM head (issue 8): LiteMedSAM + a lite enhancer (1 EBlock per stage), the same data
    # split and budget as robust-lite; 5 supervised interactions per sample (first prompt + 4 corrections).
    "pge-lite": dict(model="litemedsam", head="pge", enhancer_blocks=1, epochs=6, batch_size=2, objects_per_image=1,
                     lr=2e-4, n_steps=4, p_box=0.5, points="1,3", p_mask=1.0, variants=2, p_identity=0.2,
                     val_fraction=0.1, time_budget=40.0),
    # The same head on a coarser, narrower working grid (32 x 32, 96 channels, 1.05 M parameters): a click with
    # it fits the 80 ms of issue 8 on this CPU, the 64 x 64 lite head takes about 180 ms (docs/benchmarks.md 5b).
    "pge-lite-fast": dict(model="litemedsam", head="pge", enhancer_blocks=1, enhancer_work_stride=2,
                          enhancer_width=96, enhancer_gate_channels=32, epochs=6, batch_size=2, objects_per_image=1,
                          lr=2e-4, n_steps=4, p_box=0.5, points="1,3", p_mask=1.0, variants=2, p_identity=0.2,
                          val_fraction=0.1, time_budget=40.0),
}


def build_parser() -> argparse.ArgumentParser:
    from napari_robustmedsam.annotation.interactive import LOCAL_CORRECTION_WORDS

    p = argparse.ArgumentParser(
        prog="python -m training.fit",
        description="Fine-tune a (lite) robust mask decoder on clean/degraded pairs with iterative prompts "
        "(encoders frozen; Dice + focal + RobustSAM consistency losses).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("Outputs", 1)[0].split("Examples::", 1)[1] if "Examples::" in __doc__ else None,
    )
    src = p.add_argument_group("data")
    src.add_argument("--data", action="append", default=None,
                     help="folder with <dataset>/images + <dataset>/masks (medseg layout) and/or <volume>/image.tif + "
                     "labels.tif; repeatable")
    src.add_argument("--session", action="append", default=None,
                     help="annotation session saved by the annotator (labels file or .prompts.json); repeatable")
    src.add_argument("--session-image", action="append", default=None,
                     help="image file of each --session (default: the image recorded in the session)")
    src.add_argument("--datasets", default=None, help="comma-separated dataset names to use from --data")
    src.add_argument("--modality", default=None, help="modality for the degradations (default: from MANIFEST.json)")
    src.add_argument("--val-fraction", type=float, default=None, help="share of images held out (default 0.2)")
    src.add_argument("--min-object-px", type=int, default=20, help="ignore objects smaller than this (default 20)")

    m = p.add_argument_group("model and run")
    m.add_argument("--model", default=None, help="registry name or checkpoint to start from (default litemedsam_robust)")
    m.add_argument("--preset", choices=sorted(PRESETS), default=None, help="a documented set of defaults")
    m.add_argument("--epochs", type=int, default=None)
    m.add_argument("--steps", type=int, default=None, help="iterations per epoch (default: one pass over the data)")
    m.add_argument("--batch-size", type=int, default=None, help="images per iteration and process (default 2)")
    m.add_argument("--objects", type=int, default=None, help="objects per image per iteration (default 2)")
    m.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default 1e-4)")
    m.add_argument("--lr-decay", type=float, default=0.9, help="learning-rate factor per epoch (default 0.9)")
    m.add_argument("--weight-decay", type=float, default=0.01)
    m.add_argument("--trainable", choices=("decoder", "robust"), default="decoder",
                   help="train the whole mask decoder (default) or only RobustSAM's added modules")
    m.add_argument("--train-amfg", action="store_true", default=None,
                   help="also train the three AMFG blocks (RobustSAM's full recipe; seconds per prompt on a CPU)")
    m.add_argument("--frozen-amfg", dest="train_amfg", action="store_false",
                   help="keep the AMFG blocks frozen (identity-initialised ones are then skipped: fast on a CPU)")
    m.add_argument("--consistency-steps", choices=("all", "first"), default=None,
                   help="consistency losses on every prediction of an iteration (default) or only the first")
    m.add_argument("--svd-neck", action="store_true", help="also train the singular values of the encoder neck "
                   "(RobustMedSAM Sec. 3.4)")
    m.add_argument("--head", choices=("robust", "pge"), default=None,
                   help="robust: RobustSAM robust decoder (default); pge: PGE-SAM prompt-guided feature enhancer "
                   "trained jointly with the mask decoder (runs per click)")
    m.add_argument("--enhancer-blocks", type=int, default=None,
                   help="EBlocks per stage of a new PGE enhancer (1 = lite, default; 5 = full)")
    m.add_argument("--enhancer-work-stride", type=int, default=None, choices=(1, 2, 4),
                   help="a new PGE enhancer works on the embedding grid / this (default 1; 2 = about 4x less work "
                   "per click, its residual upsampled back)")
    m.add_argument("--enhancer-width", type=int, default=None,
                   help="working channels of a new PGE enhancer (default 0 = the embedding's 256)")
    m.add_argument("--enhancer-gate-channels", type=int, default=None,
                   help="attention-gate channels of a new PGE enhancer (default 64)")
    m.add_argument("--device", default="cpu")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--time-budget", type=float, default=None, help="stop training after this many minutes")
    m.add_argument("--save-every", type=int, default=0, help="also save a resumable state every N iterations")
    m.add_argument("--out", default="runs/finetune", help="output folder (default runs/finetune)")
    m.add_argument("--resume", action="store_true", help="continue the run saved in --out exactly")
    m.add_argument("--overwrite", action="store_true",
                   help="start a new run in an --out folder that holds an earlier run's files, replacing them")
    m.add_argument("--cache", default=None, help="feature cache folder (default: the user cache, training-features/)")
    m.add_argument("--no-cache", action="store_true", help="keep features in memory only")
    m.add_argument("--memory-gb", type=float, default=2.0, help="features kept in RAM (the rest is read from the cache)")
    m.add_argument("--threads", type=int, default=None, help="torch threads")
    m.add_argument("--no-progress", action="store_true")

    lo = p.add_argument_group("loss (RobustSAM / RobustMedSAM weights by default)")
    lo.add_argument("--w-dice", type=float, default=1.0)
    lo.add_argument("--w-focal", type=float, default=20.0)
    lo.add_argument("--w-feature", type=float, default=100.0, help="MSE of clean vs degraded mask features")
    lo.add_argument("--w-token", type=float, default=2.0, help="MSE of clean vs degraded output tokens")
    lo.add_argument("--w-iou", type=float, default=1.0, help="IoU-prediction regression (micro_sam)")
    lo.add_argument("--w-fr", type=float, default=5.0, help="PGE head: foreground reconstruction loss weight")
    lo.add_argument("--w-fall", type=float, default=0.0,
                    help="penalty on a simulated corrective click that lowers the object's soft Dice below the mask "
                    "shown before it (hinge; default 0 = off)")
    lo.add_argument("--no-consistency", action="store_true",
                    help="plain decoder fine-tuning (feature and token weights 0): the papers' ablation")

    pr = p.add_argument_group("prompts and degradations")
    pr.add_argument("--n-steps", type=int, default=None, help="corrective clicks per iteration (default 3)")
    pr.add_argument("--p-box", type=float, default=None, help="probability of a box start (default 0.5)")
    pr.add_argument("--points", default=None, help="K of the K-point starts, comma-separated (default 1,3)")
    pr.add_argument("--p-mask", type=float, default=None, help="probability of feeding back the previous logits (0.5)")
    pr.add_argument("--clicks", choices=("largest", "micro_sam"), default="largest",
                    help="corrective click sampler (default: largest error region, as the evaluation)")
    pr.add_argument("--local-corrections", choices=LOCAL_CORRECTION_WORDS, default=None,
                    help="simulate the annotator's 'Corrections stay local': the next click is sampled from, and the "
                    "previous logits fed back are, the prediction merged around the last click (default off)")
    pr.add_argument("--click-guard", choices=LOCAL_CORRECTION_WORDS, default=None,
                    help="simulate the annotator's 'Clicks only add / remove' after the local merge: a click's change "
                    "is kept only in its direction and nearer to it than to earlier clicks of the other label "
                    "(default off; the annotator's default is 'always')")
    pr.add_argument("--variants", type=int, default=None, help="cached degraded variants per image (default 3)")
    pr.add_argument("--levels", default="LQ-1,LQ-2,LQ-3,LQ-3+", help="levels the variants are drawn from")
    pr.add_argument("--p-identity", type=float, default=None, help="probability of a clean 'degraded' branch (0.2)")
    pr.add_argument("--val-level", default="LQ-3", help="degradation level of the validation images")
    return p


def _pick(args, name: str, preset: dict, default):
    value = getattr(args, name, None)
    if value is not None:
        return value
    return preset.get(name, default)


def config_from_args(args):
    from napari_robustmedsam.annotation.interactive import local_corrections_mode
    from training.finetune import LossWeights, PromptConfig, TrainConfig, TrainingError

    preset = PRESETS.get(args.preset, {}) if args.preset else {}
    points = _pick(args, "points", preset, "1,3")
    try:
        point_counts = tuple(int(v) for v in str(points).split(",") if v.strip())
    except ValueError:
        raise TrainingError(f"--points must be comma-separated integers, got {points!r}") from None
    feature, token = (0.0, 0.0) if args.no_consistency else (args.w_feature, args.w_token)
    if _pick(args, "head", preset, "robust") == "pge":
        feature, token = 0.0, 0.0  # the PGE head's feature term is the FR loss (--w-fr)
    try:
        prompts = PromptConfig(p_box=_pick(args, "p_box", preset, 0.5), point_counts=point_counts,
                               n_steps=_pick(args, "n_steps", preset, 3), p_mask=_pick(args, "p_mask", preset, 0.5),
                               click_mode=args.clicks,
                               local_corrections=local_corrections_mode(_pick(args, "local_corrections", preset, "off")),
                               click_guard=local_corrections_mode(_pick(args, "click_guard", preset, "off")))
    except ValueError as err:
        raise TrainingError(str(err)) from None
    budget = args.time_budget if args.time_budget is not None else preset.get("time_budget")
    from napari_robustmedsam.degradations.levels import normalize_level

    try:
        levels = tuple(normalize_level(v) for v in args.levels.split(",") if v.strip())
        val_level = normalize_level(args.val_level)
    except Exception as err:  # noqa: BLE001
        raise TrainingError(str(err)) from None
    head = _pick(args, "head", preset, "robust")
    return TrainConfig(
        head=head,
        enhancer_blocks=_pick(args, "enhancer_blocks", preset, 1),
        enhancer_work_stride=_pick(args, "enhancer_work_stride", preset, 1),
        enhancer_width=_pick(args, "enhancer_width", preset, 0),
        enhancer_gate_channels=_pick(args, "enhancer_gate_channels", preset, 64),
        fr_weight=args.w_fr,
        model=args.model or preset.get("model", "litemedsam" if head == "pge" else "litemedsam_robust"),
        device=args.device,
        epochs=_pick(args, "epochs", preset, 10),
        steps_per_epoch=args.steps,
        batch_size=_pick(args, "batch_size", preset, 2),
        objects_per_image=args.objects if args.objects is not None else preset.get("objects_per_image", 2),
        lr=_pick(args, "lr", preset, 1e-4),
        weight_decay=args.weight_decay,
        lr_decay=args.lr_decay,
        trainable=args.trainable,
        train_amfg=_pick(args, "train_amfg", preset, True),
        consistency_steps=_pick(args, "consistency_steps", preset, "all"),
        weights=LossWeights(dice=args.w_dice, focal=args.w_focal, feature=feature, token=token, iou=args.w_iou,
                            fall=args.w_fall),
        prompts=prompts,
        variants=_pick(args, "variants", preset, 3),
        levels=levels,
        p_identity=_pick(args, "p_identity", preset, 0.2),
        val_level=val_level,
        seed=args.seed,
        svd_neck=args.svd_neck,
        time_budget_s=None if budget is None else float(budget) * 60.0,
        save_every_steps=args.save_every,
        cache_dir=args.cache,
        use_cache=not args.no_cache,
        memory_gb=args.memory_gb,
        threads=args.threads,
        progress_bar=not args.no_progress,
    ), _pick(args, "val_fraction", preset, 0.2)


def load_items(args, notices: list[str]):
    from training.finetune import TrainingError, items_from_folder, items_from_session

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
    from napari_robustmedsam.errors import UserFacingError
    from training.finetune import Trainer, split_items
    from training.finetune import ddp
    from training.finetune.data import describe_items
    from training.finetune.trainer import check_out_dir, check_run_outputs

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
            from napari_robustmedsam.io.output_paths import existing_file

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
