"""Benchmark: the two robust heads side by side in the iterative setting (issue 8).

Runs ``python -m training.evaluate`` (resumable) on the held-out split of ``benchmarks/train_lite.py`` for
LiteMedSAM, the robust-lite decoder and the PGE-lite head, with interaction curves from a point start and from a
box start (steps 0..N), clean and LQ-1..LQ-3+, then checks the issue's targets from the measurements:

- the PGE-lite head's Dice never falls from one step to the next (mean over datasets, per start and condition);
- after 5 steps on degraded images it beats the robust-lite decoder;
- its click p50 (``benchmarks/click_latency.py``, measured in the same run) is <= 80 ms;

and prints parameter counts. Checkpoints come from earlier training runs::

    python -m training.fit --data runs/bench-train-lite-45/split/train --preset pge-lite --out runs/bench-pge-lite/pge \\
        --cache runs/bench-pge-lite/cache --time-budget 45 --threads 1 --variants 2
    python -m training.fit --data runs/bench-train-lite-45/split/train --preset pge-lite-fast \\
        --out runs/s6-pge-fast/pge --cache runs/bench-pge-lite/cache --threads 2 --variants 2
    python benchmarks/compare_heads.py --split runs/bench-train-lite-45/split/heldout \\
        --robust runs/s5-robust-2t/best.pth --pge pge-lite=runs/bench-pge-lite/pge/best.pth \\
        --pge pge-lite-fast=runs/s6-pge-fast/pge/best.pth --out runs/s6-compare-heads --images-per-dataset 2 --workers 2

Every ``--pge LABEL=PATH`` head is checked against the targets and timed with its trained weights.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def pge_heads(args) -> dict[str, str]:
    """``--pge [LABEL=]PATH`` entries as label -> path (default label ``pge-lite``)."""
    from training.evaluation.runner import split_model_arg

    heads = {}
    for spec in args.pge:
        label, path = split_model_arg(spec)
        label = label or "pge-lite"
        if label in heads:
            raise SystemExit(f"two PGE heads labelled {label!r}: name them LABEL=PATH")
        heads[label] = path
    return heads


def evaluate(args, out: Path) -> float:
    cmd = [sys.executable, "-m", "training.evaluate", "--data", str(args.split), "--model", "litemedsam",
           "--model", f"robust-lite={args.robust}"]
    for label, path in pge_heads(args).items():
        cmd += ["--model", f"{label}={path}"]
    cmd += ["--levels", args.levels, "--prompts", "iterative,box,points3", "--steps", str(args.steps),
            "--out", str(out), "--no-progress"]
    if args.images_per_dataset:
        cmd += ["--images-per-dataset", str(args.images_per_dataset)]
    if args.workers > 1:
        cmd += ["--workers", str(args.workers)]
    if args.cache:
        cmd += ["--cache", str(args.cache)]
    if args.local_corrections != "off":
        cmd += ["--local-corrections", args.local_corrections]
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True)
    return time.perf_counter() - t0


def curves(out: Path):
    import pandas as pd

    from training.evaluation.report import step_means

    df = pd.read_csv(out / "measurements.csv")
    return step_means(df[df["prompt"].isin(["iter_point", "iter_box"])], "dice")


def check_targets(agg, steps: int, heads=("pge-lite",)) -> list[str]:
    lines = []
    for head in heads:
        lines += check_head(agg, steps, head)
    return lines


def check_head(agg, steps: int, head: str) -> list[str]:
    lines = []
    conditions = sorted({c for (_, _, c, _) in agg.index})
    degraded = [c for c in conditions if c != "clean"]
    for start in ("iter_point", "iter_box"):
        for cond in conditions:
            try:
                pge = [float(agg[(head, start, cond, s)]) for s in range(steps + 1)]
            except KeyError:
                continue
            falls = [s for s in range(1, steps + 1) if pge[s] < pge[s - 1]]
            lines.append(f"- {head}, {start} start, {cond}: Dice by step " + " / ".join(f"{v:.3f}" for v in pge)
                         + (f"; never falls: yes" if not falls else f"; never falls: NO (falls at step(s) {falls})"))
    for start in ("iter_point", "iter_box"):
        for cond in degraded:
            try:
                p5, r5 = float(agg[(head, start, cond, 5)]), float(agg[("robust-lite", start, cond, 5)])
            except KeyError:
                continue
            lines.append(f"- after 5 steps, {start} start, {cond}: {head} {p5:.3f} vs robust-lite {r5:.3f}: "
                         + ("beats" if p5 > r5 else "does NOT beat"))
    return lines


def latency(clicks: int, heads: dict[str, str]) -> str:
    cmd = [sys.executable, "benchmarks/click_latency.py", "--skip-vit", "--clicks", str(clicks)]
    for label, path in heads.items():
        cmd += ["--pge-checkpoint", f"{label}={path}"]
    res = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
    return res.stdout


def parameter_counts(paths: dict[str, str]) -> dict[str, dict]:
    from napari_robustmedsam.checkpoints.inspect import describe_checkpoint

    out = {}
    for name, path in paths.items():
        info = describe_checkpoint(path)
        out[name] = info["parameters"]
    return out


def main(argv=None) -> int:
    from napari_robustmedsam.annotation.prompt_decoding import LOCAL_CORRECTION_WORDS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--split", required=True, help="held-out folder (medseg layout)")
    p.add_argument("--robust", required=True, help="robust-lite checkpoint (training.fit --preset robust-lite)")
    p.add_argument("--pge", required=True, action="append", metavar="[LABEL=]PATH",
                   help="PGE-head checkpoint (training.fit --preset pge-lite / pge-lite-fast); repeatable, "
                   "default label pge-lite")
    p.add_argument("--out", default="runs/compare-heads")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--levels", default="LQ-1,LQ-2,LQ-3,LQ-3+")
    p.add_argument("--images-per-dataset", type=int, default=None)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--clicks", type=int, default=30, help="clicks of the latency measurement")
    p.add_argument("--cache", default=None, help="embedding cache of the evaluation (default: the user cache)")
    p.add_argument("--local-corrections", nargs="?", const="always", default="off",
                   choices=LOCAL_CORRECTION_WORDS,
                   help="corrective clicks change only the region connected to the click (the annotator's option; "
                   "with-a-box: from box starts only, its default)")
    p.add_argument("--skip-eval", action="store_true", help="only analyse an existing --out")
    args = p.parse_args(argv)
    out = Path(args.out)
    wall = None if args.skip_eval else evaluate(args, out)
    agg = curves(out)
    lines = [f"# Robust heads compared ({time.strftime('%Y-%m-%d %H:%M')})", ""]
    if wall is not None:
        lines.append(f"Evaluation wall time: {wall / 60:.1f} min. Summary tables and plots: `{out}/summary.md`.")
    lines.append("Corrective clicks: " + {
        "off": "the whole new prediction is taken.",
        "always": "local (only the changes connected to each click are kept).",
        "with-a-box": "local from a box start (only the changes connected to each click are kept), the whole new "
                      "prediction from a point start (the annotator's default).",
    }[args.local_corrections])
    heads = pge_heads(args)
    targets = check_targets(agg, args.steps, tuple(heads))
    lines += ["", "## Targets (issue 8)", ""] + targets
    lat = latency(args.clicks, heads)
    lines += ["", "## Click latency (same machine, same run)", "", "```", lat.strip(), "```", ""]
    counts = parameter_counts({"litemedsam": "litemedsam", "robust-lite": args.robust, **heads})
    lines += ["## Parameters (M)", "", "| model | image encoder | prompt encoder | mask decoder | of which robust | "
              "feature enhancer | total |", "|---|---|---|---|---|---|---|"]
    for name, c in counts.items():
        lines.append(f"| {name} | " + " | ".join(f"{c.get(k, 0) / 1e6:.2f}" for k in (
            "image_encoder", "prompt_encoder", "mask_decoder", "mask_decoder_robust", "feature_enhancer", "total"))
            + " |")
    text = "\n".join(lines) + "\n"
    (out / "heads.md").write_text(text)
    (out / "heads.json").write_text(json.dumps({"targets": targets, "parameters": counts, "latency": lat}, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
