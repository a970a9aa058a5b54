"""Which start should the Fine-tune tab recommend for images of a new kind: the leave-out protocol's verdict.

    python benchmarks/leave_out_verdict.py runs/leaveout-*/user_loop.csv \
        docs/results/user-loop/run-10min-judge-degraded.csv.gz --out runs/leave-out-verdict.md

Reads user-loop rows (``user_loop.csv`` of any runs, ``.csv.gz`` too) holding cells from both starts, and compares
the model each start leaves loaded (the *kept* rows) at N = 10 and a 10-minute fine-tune, on every dataset the
leave-out start was not trained on. The rule is docs/results/user-loop/rule-leave-out-start.md, fixed before its
first cell:

- **recommend the leave-out start** when every one of those datasets is measured, its kept model beats the baseline
  start's by at least 0.02 in the mean over them of LQ-3 box Dice and of LQ-3 Dice after 5 clicks (each), and it is
  worse by no more than 0.01 in no metric of any dataset, clean and LQ-3 (NoC@85 relative);
- otherwise keep the baseline start (LiteMedSAM) as the recommendation.

A dataset worse by more than 0.01 settles the verdict before the other datasets are measured, since no later cell
can undo it; the report says so. Nothing here trains or measures: it reads the rows the runs wrote.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

from user_loop import LEVEL, SEEN_MARK, STARTS, TARGET_BUDGET, TARGET_N, falls

#: the mean gain over the leave-out datasets, LQ-3 box Dice and LQ-3 Dice after 5 clicks each (the protocol's)
ADOPT_MEAN_GAIN = 0.02
CONDITIONS = ("clean", LEVEL)
METRICS = ("box_dice", "dice_5", "noc_85")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python benchmarks/leave_out_verdict.py", description=__doc__.split("\n\n")[0])
    p.add_argument("csv", nargs="+", type=Path, help="user-loop rows (user_loop.csv, .csv.gz)")
    p.add_argument("--start", default="robust-lite-permissive", help="the leave-out start (default %(default)s)")
    p.add_argument("--baseline", default="litemedsam", help="the start it is compared with (default %(default)s)")
    p.add_argument("--out", type=Path, default=None, help="write the report here as well as printing it")
    return p


def kept_rows(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """The kept model's rows of the protocol's cells (N = 10, 10 minutes), one per start, dataset and condition."""
    df = pd.concat(frames, ignore_index=True)
    sel = df[(df["model"] == "kept") & (df["n_labelled"] == TARGET_N) & (df["budget_min"] == TARGET_BUDGET)]
    dup = sel.duplicated(["start", "dataset", "condition"], keep=False)
    if dup.any():
        first = sel[dup].iloc[0]
        raise SystemExit(f"error: the cell {first['start']}/{first['dataset']} (N = {TARGET_N}) is in two of the "
                         "given files; pass each run once")
    return sel.set_index(["start", "dataset", "condition"])[list(METRICS)]


def trained_on(start: str) -> frozenset[str]:
    """The development datasets a start learned from (from the heads' manifest; none for LiteMedSAM)."""
    return STARTS[start].trained_on if start in STARTS else frozenset()


def leave_out_datasets(kept: pd.DataFrame, baseline: str, seen: frozenset[str]) -> list[str]:
    """The datasets the baseline start was measured on that the leave-out start never learned from (``seen``)."""
    measured = set(kept.xs(baseline, level="start").index.get_level_values("dataset"))
    return sorted(measured - seen)


def compare(kept: pd.DataFrame, start: str, baseline: str, datasets: list[str]) -> pd.DataFrame:
    """One row per measured dataset and condition: each metric for both starts and the difference (start - baseline)."""
    rows = []
    for ds in datasets:
        for cond in CONDITIONS:
            if (start, ds, cond) not in kept.index:
                continue
            a, b = kept.loc[(baseline, ds, cond)], kept.loc[(start, ds, cond)]
            row = {"dataset": ds, "condition": cond, "fall": ", ".join(falls(a, b))}
            for m in METRICS:
                row |= {f"{m}_baseline": float(a[m]), f"{m}_start": float(b[m]), f"{m}_diff": float(b[m] - a[m])}
            rows.append(row)
    return pd.DataFrame(rows)


def level_means(table: pd.DataFrame) -> tuple[float, float]:
    """Mean over datasets at LQ-3 of the box Dice and after-5-clicks differences, rounded as reported (3 decimals),
    so a reader can check the verdict from the printed figures."""
    lq = table[table["condition"] == LEVEL]
    return round(lq["box_dice_diff"].mean(), 3), round(lq["dice_5_diff"].mean(), 3)


def decide(table: pd.DataFrame, datasets: list[str], start: str, baseline: str) -> str:
    """The protocol's verdict, in one line."""
    measured = sorted(set(table["dataset"])) if len(table) else []
    missing = [d for d in datasets if d not in measured]
    worse = [f"{r.dataset} {r.condition} {r.fall}" for r in table.itertuples() if r.fall]
    if worse:
        left = f"; {len(missing)} dataset(s) not measured cannot change it" if missing else ""
        return (f"**Keep {baseline} as the recommended start (settled{left}):** the {start} start ends worse by more "
                f"than 0.01 on {'; '.join(worse)}.")
    if missing:
        return f"**Undecided:** {len(measured)} of {len(datasets)} datasets measured (missing: {', '.join(missing)})."
    box, clicks = level_means(table)
    if box >= ADOPT_MEAN_GAIN and clicks >= ADOPT_MEAN_GAIN:
        return (f"**Recommend {start} as the start for images of a new kind:** mean {LEVEL} box Dice {box:+.3f}, after "
                f"5 clicks {clicks:+.3f}, and no dataset worse by more than 0.01.")
    return (f"**Keep {baseline} as the recommended start:** mean {LEVEL} box Dice {box:+.3f}, after 5 clicks "
            f"{clicks:+.3f} (both must reach +{ADOPT_MEAN_GAIN}).")


def report(table: pd.DataFrame, datasets: list[str], start: str, baseline: str, seen: frozenset[str]) -> str:
    """The comparison table (kept model of each start), the mean at LQ-3 and the verdict, as markdown."""
    lines = [f"# Leave-out start: {start} against {baseline} (N = {TARGET_N}, {TARGET_BUDGET:g}-minute fine-tune)", "",
             (f"The model each start leaves loaded, on the remaining images; {baseline} -> {start} (difference). "
              f"Leave-out datasets: {', '.join(datasets)}."), "",
             "| dataset | condition | box Dice | Dice after 5 clicks | NoC@85 | worse by more than 0.01 |",
             "|---|---|---|---|---|---|"]
    for r in table.to_dict("records"):
        cells = [f"{r[f'{m}_baseline']:.{d}f} -> {r[f'{m}_start']:.{d}f} ({r[f'{m}_diff']:+.{d}f})"
                 for m, d in zip(METRICS, (3, 3, 2))]
        lines.append(f"| {r['dataset']} | {r['condition']} | " + " | ".join(cells) + f" | {r['fall'] or '-'} |")
    if len(table):
        box, clicks = level_means(table)
        measured = int((table["condition"] == LEVEL).sum())
        lines += ["", (f"Mean of {measured} dataset(s) at {LEVEL}, {start} - {baseline}: box Dice {box:+.3f}, after "
                       f"5 clicks {clicks:+.3f} (the rule asks +{ADOPT_MEAN_GAIN} each, over all {len(datasets)}).")]
    if seen:
        lines += ["", f"{SEEN_MARK} not compared: {start} was trained on {', '.join(sorted(seen))}."]
    return "\n".join(lines + ["", decide(table, datasets, start, baseline), ""])


def main(argv=None) -> str:
    args = build_parser().parse_args(argv)
    for path in args.csv:
        if not path.is_file():
            raise SystemExit(f"error: {path} does not exist; pass the user_loop.csv of finished runs")
    kept = kept_rows([pd.read_csv(p) for p in args.csv])
    for name in (args.start, args.baseline):
        if name not in kept.index.get_level_values("start"):
            raise SystemExit(f"error: no N = {TARGET_N}, {TARGET_BUDGET:g}-minute cell of the start {name!r} in the "
                             "given files; add the run that has it")
    seen = trained_on(args.start)
    datasets = leave_out_datasets(kept, args.baseline, seen)
    text = report(compare(kept, args.start, args.baseline, datasets), datasets, args.start, args.baseline, seen)
    if args.out:
        from napari_robustmedsam.io.atomic import atomic_write_path

        with atomic_write_path(args.out) as tmp:
            tmp.write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
