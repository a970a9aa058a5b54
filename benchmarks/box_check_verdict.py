"""The verdict of docs/results/shipped-heads/rule-box-check.md from the validation runs' measurements.

    python benchmarks/box_check_verdict.py --run off=runs/box-check-val-off --run higher=runs/box-check-val-higher \
        --run higher+0.05=runs/box-check-val-higher+0.05 [--markdown out.md]

Each run is a ``training.evaluate`` output folder (``--prompts iter_box --steps 5``) or its ``measurements.csv``,
gzipped or not; LiteMedSAM's rows may be in any of them. Prints, per head and candidate, the 4 cells (box Dice and Dice after 5 clicks, clean and LQ-3; mean over
datasets of the per-dataset mean), the shortfall W (the lowest per-dataset box-Dice difference head minus
LiteMedSAM), how many boxes showed the base model's mask, and the rule's decision.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.evaluation.store import load_measurements  # noqa: E402

BASE = "litemedsam"
CONDITIONS = ("clean", "LQ-3")
CELL_TOLERANCE = 0.005  # rule point 1
SHORTFALL_GAIN = 0.005  # rule point 2
TIE = 0.001


def cells(rows: pd.DataFrame) -> dict[tuple[str, int], float]:
    """(condition, step) -> mean over datasets of the per-dataset mean Dice, for steps 0 (box) and 5."""
    out = {}
    for cond in CONDITIONS:
        for step in (0, 5):
            sel = rows[(rows.condition == cond) & (rows.step == step)]
            out[(cond, step)] = float(sel.groupby("dataset").dice.mean().mean())
    return out


def per_dataset_box(rows: pd.DataFrame) -> pd.Series:
    sel = rows[rows.step == 0]
    return sel.groupby(["condition", "dataset"]).dice.mean()


def swapped_boxes(rows: pd.DataFrame, off: pd.DataFrame | None, head: str) -> str:
    """How many box masks differ from the same head's with the check off (only a swap changes a box's mask)."""
    if off is None:
        return "?"
    keys = ["condition", "sample", "object_id"]
    mine = rows[rows.step == 0][keys + ["pred_px", "dice"]]
    theirs = off[(off.model == head) & (off.step == 0)][keys + ["pred_px", "dice"]]
    both = mine.merge(theirs, on=keys, suffixes=("", "_off"))
    changed = (both.pred_px != both.pred_px_off) | ((both.dice - both.dice_off).abs() > 1e-9)
    return f"{int(changed.sum())} / {len(both)}"


def verdict(runs: dict[str, pd.DataFrame]) -> str:
    everything = pd.concat(runs.values())
    base_box = per_dataset_box(everything[everything.model == BASE].drop_duplicates(
        ["condition", "sample", "object_id", "step"]))
    heads = sorted(m for m in everything.model.unique() if m != BASE)
    lines = []
    for head in heads:
        lines += [f"## {head}", "",
                  "| candidate | clean box | clean after 5 | LQ-3 box | LQ-3 after 5 | mean | W (worst dataset, head - LiteMedSAM) | boxes with the base's mask | qualifies |",
                  "|---|---|---|---|---|---|---|---|---|"]
        table = {}
        for name, rows in runs.items():
            mine = rows[rows.model == head]
            if mine.empty:
                continue
            c = cells(mine)
            diff = (per_dataset_box(mine) - base_box).dropna()
            worst = diff.idxmin()
            table[name] = dict(cells=c, mean=sum(c.values()) / 4, W=float(diff.min()), worst=worst,
                               swapped=swapped_boxes(mine, runs.get("off"), head))
        off = table.get("off")
        best, best_mean = "off", None
        for name, t in table.items():
            c = t["cells"]
            ok = ""
            if name != "off" and off is not None:
                p1 = all(c[k] >= off["cells"][k] - CELL_TOLERANCE for k in c)
                p2 = t["W"] >= off["W"] + SHORTFALL_GAIN
                ok = "yes" if p1 and p2 else f"no ({'cells' if not p1 else ''}{' and ' if not p1 and not p2 else ''}{'W' if not p2 else ''})"
                if p1 and p2:
                    better = best_mean is None or t["mean"] > best_mean + TIE or (
                        abs(t["mean"] - best_mean) <= TIE and name.startswith("higher+"))
                    if better:
                        best, best_mean = name, t["mean"]
            lines.append(f"| {name} | {c[('clean', 0)]:.3f} | {c[('clean', 5)]:.3f} | {c[('LQ-3', 0)]:.3f} | "
                         f"{c[('LQ-3', 5)]:.3f} | {t['mean']:.3f} | {t['W']:+.3f} ({t['worst'][1]}, {t['worst'][0]}) | "
                         f"{t['swapped']} | {ok} |")
        lines += ["", f"**Decision for {head}: `{best}`.**", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", action="append", required=True, metavar="NAME=DIR")
    p.add_argument("--markdown", type=Path)
    args = p.parse_args(argv)
    runs = {}
    for item in args.run:
        name, folder = item.split("=", 1)
        runs[name] = load_measurements(folder)
    text = verdict(runs)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
