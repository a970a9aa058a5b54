"""The click-refinement rule's figures (docs/results/click-refinement/rule.md) from evaluation runs' measurements.

    python benchmarks/click_refinement_verdict.py off=runs/val-off random-walker=runs/val-rw graph-cut=runs/val-gc
    python benchmarks/click_refinement_verdict.py shipped=runs/a k8=runs/b --min-mean-gain 0.01 --falls-over-baseline 0.005

Per setting and cell (start x condition): clicks honoured (pooled over steps 1..N), Dice after 5 clicks (mean of
datasets), share of object-steps whose Dice falls by more than 0.01 (pooled over the cells), and the checks of the
rule against the first setting (the baseline). The defaults are the first rule's thresholds; later rules name their
own with ``--min-mean-gain`` and ``--falls-over-baseline``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.evaluation.interaction import object_metrics  # noqa: E402
from training.evaluation.report import step_means  # noqa: E402
from training.evaluation.store import load_measurements  # noqa: E402


def figures(df: pd.DataFrame) -> dict:
    it = df[df["prompt"].str.startswith("iter_")].copy()
    it["click_honoured"] = pd.to_numeric(it["click_honoured"], errors="coerce")
    honoured = it.dropna(subset=["click_honoured"]).groupby(["prompt", "condition"])["click_honoured"].mean()
    means = step_means(it, "dice")
    five = min(5, int(means.index.get_level_values(3).max()))  # fewer steps run: the last one
    dice5 = {(p, c): means[(m, p, c, five)] for (m, p, c, s) in means.index if s == five}
    dice8 = {(p, c): means[(m, p, c, s)] for (m, p, c, s) in means.index if s == means.index.get_level_values(3).max()}
    dice0 = {(p, c): means[(m, p, c, 0)] for (m, p, c, s) in means.index if s == 0}
    obj = object_metrics(it)
    fall_share = obj["falls"].sum() / obj["object_steps"].sum()
    return dict(honoured=honoured.to_dict(), dice0=dice0, dice5=dice5, dice8=dice8, fall_share=fall_share,
                objects=len(obj) // max(it.groupby(["prompt", "condition"]).ngroups, 1))


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("settings", nargs="+", metavar="NAME=DIR",
                   help="evaluation runs (folder or measurements table); the first one is the baseline")
    p.add_argument("--min-mean-gain", type=float, default=0.02,
                   help="how much the mean Dice after 5 clicks must rise over the baseline's")
    p.add_argument("--falls-over-baseline", type=float, default=None,
                   help="falls allowed: the baseline's share plus this (default: max(0.05, the baseline's))")
    args = p.parse_args(argv)
    settings = [a.split("=", 1) for a in args.settings]
    if any(len(s) != 2 for s in settings):
        p.error("every setting is NAME=DIR, for example off=runs/val-off")
    figs = {name: figures(load_measurements(Path(path))) for name, path in settings}
    base_name = settings[0][0]
    base = figs[base_name]
    cells = sorted(base["dice5"])
    print("| setting | " + " | ".join(f"{p} {c}" for p, c in cells) + " | mean | object-steps falling > 0.01 |")
    print("|---|" + "---|" * (len(cells) + 2))
    for name, f in figs.items():
        print(f"| {name}, clicks honoured | " + " | ".join(f"{f['honoured'].get(c, float('nan')):.3f}" for c in cells)
              + " | | |")
        mean5 = sum(f["dice5"][c] for c in cells) / len(cells)
        print(f"| {name}, Dice start / 5 / 8 clicks | " + " | ".join(
            f"{f['dice0'][c]:.3f} / {f['dice5'][c]:.3f} / {f['dice8'][c]:.3f}" for c in cells)
            + f" | {mean5:.3f} (5 clicks) | {f['fall_share']:.3f} |")
    print()
    base_mean = sum(base["dice5"][c] for c in cells) / len(cells)
    for name, f in figs.items():
        if name == base_name:
            continue
        mean5 = sum(f["dice5"][c] for c in cells) / len(cells)
        c1 = all(f["honoured"][c] >= 0.95 for c in cells)
        c2 = all(f["dice5"][c] >= base["dice5"][c] - 0.01 for c in cells) and mean5 >= base_mean + args.min_mean_gain
        if args.falls_over_baseline is None:
            allowed, how = max(0.05, base["fall_share"]), f"max(0.05, {base['fall_share']:.3f})"
        else:
            allowed = base["fall_share"] + args.falls_over_baseline
            how = f"{base['fall_share']:.3f} + {args.falls_over_baseline:.3f}"
        c3 = f["fall_share"] <= allowed
        print(f"{name}: (1) honoured >= 0.95 in every cell: {c1}; (2) Dice after 5 >= baseline - 0.01 per cell and "
              f"mean {mean5 - base_mean:+.3f} >= +{args.min_mean_gain:.3f}: {c2}; (3) falls {f['fall_share']:.3f} <= "
              f"{how}: {c3}")


if __name__ == "__main__":
    main(sys.argv[1:])
