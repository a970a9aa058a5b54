"""Evaluate checkpoints under the seed papers' robustness protocol: one command, tables and plots.

Example (the reference run of docs/evaluation.md)::

    python -m training.evaluate --data ../shared/data/medseg --model litemedsam \\
        --levels LQ-1,LQ-2,LQ-3,LQ-3+ --prompts box,points3,iterative --steps 5 --out runs/eval-litemedsam

For every image, every object (label value, or connected component with ``--objects components``) and every
condition (clean plus each degradation/level), each model is prompted with the requested prompt modes;
Dice, IoU, NSD (2 px) and HD95 are recorded per object and per interaction step. Prompts and degraded images
are seeded from ``--seed`` and the image/object names, so every model sees exactly the same ones.

Outputs under ``--out``: ``measurements.csv`` (long format, one row per model x image x condition x prompt x
object x step), ``summary.md`` (mean ± std tables), ``plots/*.png``, ``runs.jsonl`` (one record per
invocation: command, settings, timings). Interrupt at any time and run the same command again: finished work
is skipped. See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import sys
import time
import uuid
from pathlib import Path

from napari_robustmedsam.annotation.prompt_decoding import LOCAL_CORRECTION_WORDS, local_corrections_mode
from napari_robustmedsam.engine.click_guard import REACH_SCOPES
from napari_robustmedsam.engine.click_refinement import REFINEMENT_METHODS
from napari_robustmedsam.errors import UserFacingError
from training.evaluation.dataset import discover, select_samples
from training.evaluation.parallel import dist_info, exit_marker, run_in_workers, shard, wait_for_ranks
from training.evaluation.report import write_report
from training.evaluation.runner import (
    PROMPT_HELP,
    Embedder,
    EvalConfig,
    RunStats,
    evaluate_samples,
    load_model_handle,
    parse_box_check,
    parse_conditions,
    parse_prompts,
    set_threads,
    unit_keys,
)
from training.evaluation.store import ResultStore, load_measurements
from training.evaluation.volume_modes import evaluate_volumes


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} must be greater than 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    """Long on purpose: every flag of the command in one place, in the order --help shows them."""
    p = argparse.ArgumentParser(
        prog="python -m training.evaluate",
        description="Evaluate promptable segmentation checkpoints on clean and degraded images "
        "(box / points / iterative prompts; Dice, IoU, NSD, HD95); resumable.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", action="append", required=True,
                   help="data folder (repeatable): <dataset>/images + <dataset>/masks folders (found recursively) "
                   "and/or <volume>/image + labels volumes (TIFF, NIfTI, NRRD, MHA, NPY; the image may be a DICOM "
                   "series folder; one sample per labelled slice)")
    p.add_argument("--model", action="append", default=None,
                   help="registry name, checkpoint path (fused or fine-tuned) or LABEL=name-or-path; repeat to "
                   "compare models side by side (default: litemedsam)")
    p.add_argument("--levels", default=None,
                   help="comma-separated levels LQ-1,LQ-2,LQ-3,LQ-3+ (default: all four); 'none' for clean only")
    p.add_argument("--degradations", default="random",
                   help="'random' (PGE-SAM composition of the image's modality, default) and/or degradation type "
                   "names, comma-separated; each is evaluated at every level")
    p.add_argument("--no-clean", action="store_true", help="skip the clean images")
    p.add_argument("--prompts", default="box,points3,iterative", help=PROMPT_HELP + " (default: box,points3,iterative)")
    p.add_argument("--steps", type=int, default=5, help="corrective clicks of the iterative modes (default 5)")
    p.add_argument("--click-strategy", choices=("center", "random", "micro_sam"), default="center",
                   help="corrective click: center of the largest error region (default), a random pixel of it, "
                   "or micro_sam's one positive + one negative sampled click per step")
    p.add_argument("--no-feed-logits", action="store_true",
                   help="do not feed the previous low-res logits back as a mask prompt in iterative modes")
    p.add_argument("--policy", default="papers", choices=("annotator", "papers"),
                   help="the click path's settings as a whole (annotation/click_policy.py): 'papers' (default) the "
                   "model's whole mask at every click, the seed papers' protocol; 'annotator' the annotator's "
                   "defaults (local corrections, guard and reach, click refinement); the four flags below override "
                   "single settings")
    p.add_argument("--local-corrections", nargs="?", const="always", default=None,
                   choices=LOCAL_CORRECTION_WORDS,
                   help="iterative modes: keep only the changes connected to each step's new clicks, the rest of the "
                   "previous mask stays (the annotator's 'Corrections stay local'); 'with-a-box': from box starts "
                   "only, the annotator's default; alone: always; default: the policy's")
    p.add_argument("--click-guard", nargs="?", const="always", default=None, choices=LOCAL_CORRECTION_WORDS,
                   help="iterative modes: keep each click's change only in its direction (a positive click adds, a "
                   "negative click removes) and nearer to it than to earlier clicks of the other label; "
                   "'with-a-box': from box starts only; alone: always; default: the policy's")
    p.add_argument("--click-guard-reach", type=_positive_float, default=None,
                   help="with --click-guard: a click also reaches no further than this many times its distance to "
                   "the previous mask's edge (default: the policy's; the annotator's bounds every click while a click "
                   "refinement is on, else only a negative click before any positive click)")
    p.add_argument("--click-guard-reach-scope", choices=REACH_SCOPES, default=None,
                   help="with --click-guard-reach: the clicks it bounds, every click (default) or only a negative "
                   "click made before any positive click on that object (default: the policy's, else all)")
    p.add_argument("--click-refinement", choices=REFINEMENT_METHODS, default=None,
                   help="iterative modes: after the model, honour every click and re-decide a disk around it at full "
                   "resolution (random-walker, graph-cut or the learned refiner, engine/click_refinement.py); default: the "
                   "policy's")
    p.add_argument("--focus-crop", choices=("on", "off"), default=None,
                   help="box starts (box, box_jitter, iter_box and its clicks, propagate_3d modes): decode a small "
                   "object in an enlarged crop of its box's surroundings (engine/focus_crop.py, "
                   "docs/results/focus-crop); default: the policy's (annotator: the annotator's 'Zoom on small "
                   "objects' default, on; papers: off)")
    p.add_argument("--focus-points", choices=("on", "off"), default="off",
                   help="with the focus crop on, point starts too (points<K>, iter_point): the points' first mask "
                   "sizes the crop and the points are decoded again in it (docs/results/focus-crop/rule-points.md); "
                   "default off")
    p.add_argument("--point-second-pass", choices=("on", "off"), default="off",
                   help="point starts (points<K>, iter_point): decode again with the first decode's logits as the "
                   "mask prompt (docs/results/focus-crop/rule-point-second-pass.md); default off")
    p.add_argument("--box-from-mask", choices=("on", "off"), default=None,
                   help="iter_point with a box-trained model (LiteMedSAM, MedSAM): decode the point start again with "
                   "the box of its first mask and send the clicks with that box, as the annotator does; default: the "
                   "policy's (annotator: on; papers: off)")
    p.add_argument("--box-check", default="own", metavar="own|off|higher|higher+MARGIN",
                   help="heads that carry a base model: for a box alone, show the base model's mask where its predicted "
                   "IoU is higher than the head's (by more than MARGIN); default: each model's own setting "
                   "(docs/results/shipped-heads/rule-box-check.md)")
    p.add_argument("--jitter", type=float, default=0.1, help="box_jitter: max side shift as a fraction of the box side")
    p.add_argument("--objects", choices=("label", "components"), default="label",
                   help="an object is a label value (default) or each connected component of a label value")
    p.add_argument("--min-object-px", type=int, default=20, help="skip objects smaller than this (default 20)")
    p.add_argument("--max-objects", type=int, default=3, help="at most this many objects per image, seeded choice "
                   "(default 3; 0 = all)")
    p.add_argument("--images-per-dataset", type=int, default=None,
                   help="evaluate a seeded subset of this many images per dataset")
    p.add_argument("--datasets", default=None, help="comma-separated dataset names to include")
    p.add_argument("--modality", default=None,
                   help="modality for the degradations of every dataset (default: from MANIFEST.json)")
    p.add_argument("--tolerance", type=float, default=2.0, help="NSD tolerance in pixels (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/evaluation", help="output folder (default runs/evaluation)")
    p.add_argument("--cache", default=None,
                   help="embedding cache folder (default <out>/cache; used when the embedding engine is available)")
    p.add_argument("--no-cache", action="store_true", help="do not use the disk embedding cache")
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", type=int, default=1, help="worker processes over images (default 1)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per process (default: min(2, CPUs) with 1 worker, 1 with several)")
    p.add_argument("--max-units", type=int, default=None,
                   help="stop after computing this many (model, image, condition) groups (chunked runs)")
    p.add_argument("--report-only", action="store_true", help="only rebuild summary.md and plots from measurements.csv")
    p.add_argument("--no-plots", action="store_true", help="tables only")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _config(args) -> EvalConfig:
    if args.steps < 0:
        raise ValueError("--steps must be >= 0")
    policy = click_policy_from_args(args)
    reach = policy.guard_reach
    return EvalConfig(
        prompts=parse_prompts(args.prompts),
        steps=args.steps,
        seed=args.seed,
        objects=args.objects,
        min_object_px=args.min_object_px,
        max_objects=None if args.max_objects in (None, 0) else args.max_objects,
        tolerance_px=args.tolerance,
        click_strategy=args.click_strategy,
        jitter=args.jitter,
        feed_logits=not args.no_feed_logits,
        local_corrections=policy.local_corrections,
        click_guard=policy.click_guard,
        click_guard_reach=None if reach is None else reach.factor,
        click_guard_reach_scope="all" if reach is None else reach.scope,
        click_refinement=policy.click_refinement,
        focus_crop=focus_crop_from_args(args),
        focus_crop_per_model=args.focus_crop is None,
        focus_points=args.focus_points == "on",
        point_second_pass=args.point_second_pass == "on",
        box_from_mask=(args.policy == "annotator") if args.box_from_mask is None else args.box_from_mask == "on",
        box_check=parse_box_check(args.box_check),
    )


def focus_crop_from_args(args) -> bool:
    """``--focus-crop``, or the policy's: the annotator's default under ``--policy annotator``, else off. Under the
    policy's default each model then follows its own (``EvalConfig.for_model``), as the annotator does."""
    from napari_robustmedsam.annotation.prompt_decoding import DEFAULT_ZOOM_SMALL_OBJECTS

    if args.focus_crop is not None:
        return args.focus_crop == "on"
    return args.policy == "annotator" and DEFAULT_ZOOM_SMALL_OBJECTS


def click_policy_from_args(args):
    """``--policy`` with the single flags that were given laid over it."""
    from napari_robustmedsam.annotation.click_policy import click_policy
    from napari_robustmedsam.engine.click_guard import EdgeReach

    policy = click_policy(args.policy).with_overrides(
        local_corrections=None if args.local_corrections is None else local_corrections_mode(args.local_corrections),
        click_guard=None if args.click_guard is None else local_corrections_mode(args.click_guard),
        click_refinement=args.click_refinement,
    )
    # the reach flags choose the reach outright; without them the policy's reach follows its refinement
    if args.click_guard_reach is not None:
        return policy.with_guard_reach(EdgeReach(args.click_guard_reach, args.click_guard_reach_scope or "all"))
    if args.click_guard_reach_scope is not None:
        if policy.guard_reach is None:
            raise ValueError("--click-guard-reach-scope needs --click-guard-reach (the factor it applies)")
        return policy.with_guard_reach(EdgeReach(policy.guard_reach.factor, args.click_guard_reach_scope))
    return policy


def _runs(out: Path) -> list[dict]:
    path = out / "runs.jsonl"
    if not path.exists():
        return []
    runs = []
    for line in path.read_text().splitlines():
        try:
            runs.append(json.loads(line))
        except ValueError:
            pass
    return runs


def _report_header(out: Path, command: str) -> str:
    """Command, recorded invocations and wall time, and ``<out>/NOTES.md`` (hand-written notes) if present."""
    runs = _runs(out)
    wall = sum(float(r.get("wall_s", 0)) for r in runs)
    enc = sum(int(r.get("stats", {}).get("encoder_calls", 0)) for r in runs)
    enc_s = sum(float(r.get("stats", {}).get("encoder_seconds", 0)) for r in runs)
    lines = [f"Command: `{command}`", ""]
    if runs:
        last = runs[-1]
        lines.append(
            f"Recorded wall time: {wall / 60:.1f} min over {len(runs)} recorded invocation(s) on "
            f"{last.get('machine', {}).get('cpus', '?')} "
            f"CPU(s), torch {last.get('machine', {}).get('torch', '?')}, {last.get('threads', '?')} thread(s); "
            f"{enc} encoder runs" + (f", {enc_s / max(enc, 1):.2f} s each on average." if enc else ".")
        )
        if any(r.get("interrupted") for r in runs):
            lines.append("Some invocations were interrupted; their finished work was kept and resumed.")
    notes = out / "NOTES.md"
    if notes.is_file():
        lines += ["", notes.read_text().strip()]
    return "\n".join(lines)


def _run_record(run_id, command, t_start, info, workers, threads, cfg, conditions, models, samples, volumes, stats,
                interrupted: bool = False) -> dict:
    import torch

    return {
        "run_id": run_id,
        "command": command,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t_start)),
        "wall_s": round(time.time() - t_start, 1),
        "interrupted": interrupted,
        "rank": info.rank,
        "world_size": info.world_size,
        "workers": workers,
        "threads": threads,
        "config": {**cfg.__dict__, "prompts": list(cfg.prompts)},
        "click_policy": cfg.click_policy.key,
        "conditions": [c.name for c in conditions],
        "models": [{**m.describe(), "focus_crop": cfg.for_model(m).focus_crop} for m in models],
        "images": len(samples),
        "volumes": len(volumes),
        "stats": stats.to_dict(),
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
                    "platform": platform.platform()},
    }


def _write_run_record(out: Path, record: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "runs.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")


# The files an evaluation writes at the top of its --out folder.
EVALUATION_FILES = ("measurements.csv", "measurements.parquet", "summary.md", "runs.jsonl")


def main(argv: list[str] | None = None) -> dict:
    """Run ``python -m training.evaluate`` with ``argv``; the measurements, the report's files and the run's
    statistics. Long on purpose: the command's steps in their order (inputs, models, what an earlier run already
    did, the run with its record even when interrupted, the report), each one or two calls; split up, they would
    pass a dozen values between them."""
    args = build_parser().parse_args(argv)
    argv_list = sys.argv[1:] if argv is None else list(argv)
    command = "python -m training.evaluate " + " ".join(shlex.quote(a) for a in argv_list)
    out = Path(args.out)
    if args.report_only:
        df = load_measurements(out)
        written = write_report(df, out, _report_header(out, command), plots=not args.no_plots)
        print(f"report written: {written['summary']}")
        return {"measurements": df, "written": written}

    # A second run into the same --out resumes the first, so its files are meant to be added to; only an input (a
    # model file) in their place, or an --out that is a file, is refused - before any work.
    from napari_robustmedsam.io.output_paths import check_output_folder, existing_file

    check_output_folder(out, EVALUATION_FILES, overwrite=True,
                        inputs=[existing_file(spec.split("=", 1)[-1]) for spec in (args.model or [])])
    t_start = time.time()
    cfg = _config(args)
    levels = args.levels
    if levels is not None and levels.strip().lower() in ("none", "clean", ""):
        conditions = parse_conditions([], None, clean=True)
    else:
        conditions = parse_conditions(levels, args.degradations, clean=not args.no_clean)
    datasets = []
    for d in args.data:
        datasets.extend(discover(d, args.modality))
    names = [s.strip() for s in args.datasets.split(",")] if args.datasets else None
    samples = select_samples(datasets, args.images_per_dataset, args.seed, names) if cfg.prompts_2d else []
    volumes = []
    if cfg.prompts_3d:
        volumes = [d for d in datasets if d.kind == "3d" and (not names or d.name in names)]
    if cfg.prompts_3d and not volumes:
        print("note: propagate_3d needs 3D volumes (<volume>/image + labels); none found", file=sys.stderr)

    info = dist_info()
    workers = max(1, args.workers)
    threads = args.threads or (1 if workers > 1 else min(2, os.cpu_count() or 1))
    set_threads(threads)
    model_args = args.model or ["litemedsam"]
    models = [load_model_handle(a, args.device, cfg.box_check) for a in model_args]
    labels = [m.label for m in models]
    if len(set(labels)) != len(labels):
        raise ValueError(f"two models share a label {labels}; name them with LABEL=name-or-path")

    run_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    writer = f"{run_id}-rank{info.rank}" if info.active else run_id
    store = ResultStore(out, writer)
    cache_dir = None if args.no_cache else (Path(args.cache) if args.cache else out / "cache")
    plan = unit_keys(models, samples, conditions, cfg, volumes)
    done = store.done_keys()
    my_samples = shard(samples, info)
    my_volumes = volumes if info.rank == 0 else []
    groups_total = (len(my_samples) + len(my_volumes) * len(cfg.prompts_3d)) * len(models) * len(conditions)
    protocols = {m.key: {p: cfg.for_model(m).protocol(p) for p in cfg.prompts} for m in models}
    groups_done = sum(
        1 for s in my_samples for m in models for c in conditions
        if all((m.key, s.key, c.name, p, protocols[m.key][p]) in done for p in cfg.prompts_2d)
    ) + sum(
        1 for v in my_volumes for m in models for c in conditions for p in cfg.prompts_3d
        if (m.key, f"{v.name}/3d", c.name, p, protocols[m.key][p]) in done
    )
    print(
        f"evaluate: {len(models)} model(s) x {len(my_samples)} image(s)"
        + (f" + {len(my_volumes)} volume(s)" if my_volumes else "")
        + f" x {len(conditions)} condition(s) "
        f"[{', '.join(c.name for c in conditions)}] x prompts [{', '.join(cfg.prompts)}]"
        + (f" (rank {info.rank}/{info.world_size})" if info.active else "")
        + f"; {groups_done}/{groups_total} (model, image, condition) groups already done",
        flush=True,
    )

    progress = None
    if not args.no_progress:
        from tqdm import tqdm

        progress = tqdm(total=groups_total, initial=groups_done, unit="img·cond·model", dynamic_ncols=True,
                        desc="evaluate", smoothing=0.05)

    def on_unit(n: int, computed: bool = True) -> None:
        if progress is not None and computed:
            progress.update(n)

    stats = RunStats()
    interrupted = False
    try:
        if workers > 1 and not info.active:
            stats = run_in_workers(model_args, args.device, my_samples, conditions, cfg, out, run_id,
                                   str(cache_dir) if cache_dir else None, workers, done, progress, threads)
        else:
            embedder = Embedder(cache_dir)
            stats = evaluate_samples(models, my_samples, conditions, cfg, store, run_id, embedder, done,
                                     on_unit=on_unit, max_units=args.max_units)
        if my_volumes and not stats.stopped_early:
            stats.add(evaluate_volumes(models, my_volumes, conditions, cfg, store, run_id, Embedder(cache_dir), done,
                                       on_unit=on_unit))
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        if progress is not None:
            progress.close()
        if info.active and info.rank != 0:
            exit_marker(out, info, info.rank).parent.mkdir(parents=True, exist_ok=True)
            exit_marker(out, info, info.rank).write_text(run_id)
        if interrupted:
            _write_run_record(out, _run_record(run_id, command, t_start, info, workers, threads, cfg, conditions,
                                               models, my_samples, my_volumes, stats, interrupted=True))

    record = _run_record(run_id, command, t_start, info, workers, threads, cfg, conditions, models, my_samples,
                         my_volumes, stats)
    _write_run_record(out, record)
    wall = record["wall_s"]
    for f in stats.failures:
        print(f"warning: {f}", file=sys.stderr)
    print(
        f"computed {stats.units_done} unit(s), skipped {stats.units_skipped} already done; {stats.encoder_calls} "
        f"encoder run(s) ({stats.encoder_seconds:.1f} s), {stats.cache_hits} cache hit(s); wall {wall:.1f} s"
        + (" - stopped early (--max-units): run the same command again to continue" if stats.stopped_early else ""),
        flush=True,
    )

    result = {"stats": stats, "run_id": run_id, "out": out}
    if info.active and info.rank != 0:
        return result
    if info.active and not wait_for_ranks(store, info, plan):
        print("warning: some ranks did not finish; merging what is done", file=sys.stderr)
    df = store.merge(plan)
    written = write_report(df, out, _report_header(out, command), plots=not args.no_plots)
    print(f"{len(df)} measurements -> {out / 'measurements.csv'}; summary -> {written['summary']}", flush=True)
    result.update(measurements=df, written=written)
    return result


def cli(argv: list[str] | None = None) -> int:
    def _terminate(signum, frame):  # a killed job (SIGTERM) stops like Ctrl-C: finished work is recorded
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not in the main thread
        pass
    try:
        main(argv)
    except KeyboardInterrupt:
        print("\ninterrupted: finished work is saved; run the same command again to resume", file=sys.stderr)
        return 130
    except (UserFacingError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
