"""How sure is a user-loop cell's NoC@85 change? A paired bootstrap over the measured objects.

    python benchmarks/user_loop_noc_ci.py runs/user-loop [runs/other-run ...] [--boot 5000] [--markdown out.md]

For every cell of each ``benchmarks/user_loop.py --out`` folder that kept its measurements (``before/<start>/
<dataset>/measurements.csv`` and ``cells/<start>/<dataset>/<cell>/candidate/measurements.csv``), and each condition:
NoC@85 of the start model and of the candidate (the same objects, paired), the relative change of the mean, and its
95 % percentile interval from resampling the objects. Why: issue 28 counts a dataset as worse when its NoC@85 rises
by more than 1 %, and NoC@85 (an object that never reaches 0.85 counts 20) moves in steps of whole objects; the
interval says whether such a rise is more than the objects one happens to measure.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.evaluation.interaction import object_metrics  # noqa: E402
from training.evaluation.store import load_measurements  # noqa: E402

NOC_KEY = "noc@85"
OBJECT = ["sample", "object_id", "condition"]


def paired_noc(before: pd.DataFrame, candidate: pd.DataFrame) -> pd.DataFrame:
    """One row per object and condition of the box-start clicks: NoC@85 before (``b``) and with the candidate (``c``)."""
    def noc(df):
        obj = object_metrics(df)
        return obj[obj["prompt"] == "iter_box"].set_index(OBJECT)[NOC_KEY]

    return pd.concat({"b": noc(before), "c": noc(candidate)}, axis=1).dropna().reset_index()


def relative_change_interval(b: np.ndarray, c: np.ndarray, boot: int, seed: int = 0) -> tuple[float, float, float]:
    """(mean(c) / mean(b) - 1, its 2.5th and 97.5th bootstrap percentiles), resampling objects in pairs; NaN when
    the start model's mean is 0 (no relative change exists; resamples whose mean is 0 are left out likewise)."""
    if not b.mean() > 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(b), (boot, len(b)))
    mb, mc = b[idx].mean(1), c[idx].mean(1)
    ratio = mc[mb > 0] / mb[mb > 0] - 1
    lo, hi = np.percentile(ratio, [2.5, 97.5])
    return float(c.mean() / b.mean() - 1), float(lo), float(hi)


def _pct(x: float) -> str:
    return "n/a (from 0)" if np.isnan(x) else f"{x:+.1%}"


def cells_of(run: Path):
    for candidate in sorted(run.glob("cells/*/*/*/candidate/measurements.csv")):
        cell_dir = candidate.parent.parent
        start, dataset = cell_dir.parent.parent.name, cell_dir.parent.name
        before = run / "before" / start / dataset / "measurements.csv"
        if before.is_file():
            yield start, dataset, cell_dir.name, before.parent, candidate.parent


def report(runs: list[Path], boot: int) -> str:
    lines = ["| start | dataset | cell | condition | objects | NoC@85 before -> candidate | change | 95 % interval |",
             "|---|---|---|---|---|---|---|---|"]
    for run in runs:
        for start, dataset, cell, before, candidate in cells_of(run):
            pairs = paired_noc(load_measurements(before), load_measurements(candidate))
            for cond, g in pairs.groupby("condition"):
                b, c = g["b"].to_numpy(float), g["c"].to_numpy(float)
                change, lo, hi = relative_change_interval(b, c, boot)
                lines.append(f"| {start} | {dataset} | {cell} | {cond} | {len(g)} | {b.mean():.2f} -> {c.mean():.2f} | "
                             f"{_pct(change)} | " + ("-" if np.isnan(lo) else f"[{lo:+.1%}, {hi:+.1%}]") + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="benchmarks/user_loop.py --out folders")
    p.add_argument("--boot", type=int, default=5000, help="bootstrap resamples (default 5000)")
    p.add_argument("--markdown", type=Path, help="also write the table here")
    args = p.parse_args(argv)
    missing = [str(r) for r in args.runs if not r.is_dir()]
    if missing:
        print(f"error: not a folder: {', '.join(missing)}; pass benchmarks/user_loop.py --out folders", file=sys.stderr)
        return 2
    text = report(args.runs, args.boot)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
