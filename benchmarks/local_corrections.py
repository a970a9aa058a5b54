"""Benchmark: corrective clicks that change the whole object vs. only the region at the click.

Runs ``python -m training.evaluate`` (resumable) twice on the same images, prompts and degradations, once taking
the decoder's whole new prediction at every corrective click and once with ``--local-corrections`` (only the
changes connected to the new click are kept, the annotator's "Corrections stay local" option), then prints per
model, start and condition: Dice by step (mean over datasets, as ``compare_heads.py``), the steps where that mean
falls, the share of objects whose Dice falls by more than 0.01 at some step, and the share of corrective clicks
the next mask honours. Example (the run of docs/results/local-corrections/)::

    python benchmarks/local_corrections.py --data runs/bench-train-lite-45/split/heldout \\
        --model robust-lite=runs/s5-robust-2t/best.pth --model pge-lite-fast=runs/s6-pge-fast/pge/best.pth \\
        --levels LQ-3,LQ-3+ --steps 8 --out runs/local-corrections --workers 2
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = {"whole": [], "local": ["--local-corrections"]}


def evaluate(args, out: Path, extra: list[str]) -> float:
    cmd = [sys.executable, "-m", "training.evaluate", "--data", str(args.data)]
    for m in args.model:
        cmd += ["--model", m]
    cmd += ["--levels", args.levels, "--prompts", "iterative", "--steps", str(args.steps), "--out", str(out),
            "--no-progress", "--no-plots"] + extra
    if args.images_per_dataset:
        cmd += ["--images-per-dataset", str(args.images_per_dataset)]
    if args.workers > 1:
        cmd += ["--workers", str(args.workers)]
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True)
    return time.perf_counter() - t0


def table(outs: dict[str, Path], steps: int) -> list[str]:
    import numpy as np
    import pandas as pd

    from training.evaluation.report import step_means

    frames = []
    for mode, out in outs.items():
        df = pd.read_csv(out / "measurements.csv")
        frames.append(df[df["prompt"].isin(["iter_point", "iter_box"])].assign(mode=mode))
    df = pd.concat(frames)
    keys = ["model", "prompt", "condition"]
    lines = ["| model | start | condition | corrections | Dice by step 0.." + str(steps)
             + " (mean over datasets) | mean falls at steps | objects with a fall > 0.01 | clicks honoured |",
             "|---|---|---|---|---|---|---|---|"]
    for (model, prompt, cond), g in df.groupby(keys):
        for mode in outs:
            gm = g[g["mode"] == mode]
            if gm.empty:
                continue
            by_step = step_means(gm, "dice")[(model, prompt, cond)]
            curve = [float(by_step.get(s, np.nan)) for s in range(steps + 1)]
            falls = [s for s in range(1, steps + 1) if curve[s] < curve[s - 1]]
            per_obj = gm.pivot_table(index=["sample", "object_id"], columns="step", values="dice")
            fell = (per_obj.diff(axis=1) < -0.01).any(axis=1).mean()
            honoured = pd.to_numeric(gm["click_honoured"], errors="coerce").mean()
            lines.append(f"| {model} | {prompt.removeprefix('iter_')} | {cond} | {mode} | "
                         + " / ".join(f"{v:.3f}" for v in curve) + f" | {falls or 'none'} | {fell:.2f} | "
                         + f"{honoured:.2f} |")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="image folder (medseg layout), e.g. a held-out split")
    p.add_argument("--model", action="append", required=True, metavar="[LABEL=]NAME|PATH")
    p.add_argument("--levels", default="LQ-3,LQ-3+")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--images-per-dataset", type=int, default=None)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--out", default="runs/local-corrections")
    p.add_argument("--skip-eval", action="store_true", help="only analyse an existing --out")
    args = p.parse_args(argv)
    out = Path(args.out)
    outs = {mode: out / mode for mode in MODES}
    walls = {}
    if not args.skip_eval:
        for mode, extra in MODES.items():
            walls[mode] = evaluate(args, outs[mode], extra)
    lines = [f"# Corrective clicks: whole prediction vs. local ({time.strftime('%Y-%m-%d %H:%M')})", "",
             f"Data: `{args.data}`; conditions: clean, {args.levels}; steps: {args.steps}."]
    if walls:
        lines.append("Evaluation wall time: " + ", ".join(f"{m} {w / 60:.1f} min" for m, w in walls.items()) + ".")
    lines += [""] + table(outs, args.steps)
    text = "\n".join(lines) + "\n"
    (out / "local_corrections.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
