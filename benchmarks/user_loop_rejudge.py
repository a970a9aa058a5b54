"""Judge the kept candidates of finished user-loop cells again by another never-worse rule, without training again.

    python benchmarks/user_loop_rejudge.py runs/user-loop runs/nsweep-ph2_dermoscopy --data ../shared/data/medseg \
        --level LQ-3 --out runs/rejudge-degraded

For every cell folder under the given run folders (``cells/<start>/<dataset>/n<N>-<budget>min``) whose candidate
checkpoint was kept, the held-back planes recorded in its ``decision.json`` are judged again with the start model and
the candidate: as labelled, and as degraded copies at ``--level`` (``training.finetune.never_worse.score_items``, the
Fine-tune tab's own judge). The clean scores are checked against the recorded ones. Each cell is then decided by the
clean-only rule (``margin``) and the clean-and-degraded rule (``degraded``), and the model each rule keeps is read
from the cell's own measurements on the remaining images (``user_loop.csv``: box Dice, Dice after 5 clicks and
NoC@85, clean and LQ-3). The rule and its adoption test: docs/results/user-loop/rule-judge-degraded.md.

Outputs under ``--out``: ``rejudged.csv`` (one row per cell), ``rejudged.md`` (the table and the adoption test), and
``user_loop.csv``: the cells' own rows as the ``degraded`` rule decides them (``swapped``, the judge's numbers and the
*kept* rows), for ``python benchmarks/user_loop.py --merge`` to make the usual tables and verdicts.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

#: the recorded clean judge scores must be reproduced within this (otherwise the cell is left out of the test)
REPRODUCE_TOL = 0.002
#: the adoption test's allowance on the mean LQ-3 gain after 5 clicks (rule-judge-degraded.md)
CLICKS_ALLOWANCE = 0.005


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python benchmarks/user_loop_rejudge.py", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="user-loop output folders (each with user_loop.csv and cells/)")
    p.add_argument("--data", action="append", default=None, help="data folder(s) the cells were run on")
    p.add_argument("--level", default="LQ-3", help="the degraded condition of the judge (default LQ-3)")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    return p


def find_cells(runs: list[Path]) -> list[tuple[Path, Path]]:
    """(run folder, cell folder) of every cell with a decision and its candidate checkpoint."""
    found = []
    for run in runs:
        for decision in sorted(run.glob("cells/*/*/*/run/decision.json")):
            cell = decision.parent.parent
            candidate = json.loads(decision.read_text()).get("candidate")
            if candidate and Path(candidate).is_file():
                found.append((run, cell))
            else:
                print(f"skipped {cell}: its candidate checkpoint was not kept", file=sys.stderr)
    return found


def held_back_items(cell: Path, samples_by_key: dict, modality_of: dict, decision: dict):
    from training.finetune import items_from_arrays

    keys = decision["held_back"]
    missing = [k for k in keys if k not in samples_by_key]
    if missing:
        raise ValueError(f"{cell}: held-back plane(s) {missing} not found in the data folders")
    pairs = [samples_by_key[k].load() for k in keys]
    return items_from_arrays([p[0] for p in pairs], [p[1] for p in pairs], names=keys,
                             modality=modality_of[keys[0]], notices=[])


def judge(source: str, items, level: str, seed: int) -> tuple[dict, float, float]:
    """The scores of model ``source`` clean and at ``level``, and the seconds of judging clean only and with the
    degraded copies (model loading not counted)."""
    from napari_robustmedsam.annotation.prompt_decoding import zoom_default
    from napari_robustmedsam.checkpoints import load_model
    from napari_robustmedsam.engine.predictor import Predictor
    from training.finetune.never_worse import score_items

    predictor = Predictor.from_loaded(load_model(str(source), device="cpu", progress=False))
    zoom = zoom_default(str(source))
    t0 = time.perf_counter()
    score_items(predictor, items, zoom=zoom)
    t1 = time.perf_counter()
    scores = score_items(predictor, items, zoom=zoom, level=level, seed=seed)
    return scores, t1 - t0, time.perf_counter() - t1


def rejudge_cell(run: Path, cell: Path, samples_by_key, modality_of, level: str) -> dict:
    import pandas as pd

    from training.finetune.never_worse import CLEAN, decide

    decision = json.loads((cell / "run" / "decision.json").read_text())
    settings = json.loads((cell / "finetune.json").read_text())["settings"]
    items = held_back_items(cell, samples_by_key, modality_of, decision)
    current, clean_s, both_s = judge(decision["current_model"], items, level, settings["seed"])
    candidate, clean_s2, both_s2 = judge(decision["candidate"], items, level, settings["seed"])

    def only(scores, condition):
        return {k: v for k, v in scores.items() if v.condition == condition}

    kwargs = dict(mode=decision["mode"], current_model=decision["current_model"], candidate_path=decision["candidate"])
    margin = decide(only(current, CLEAN), only(candidate, CLEAN), **kwargs)
    degraded = decide(current, candidate, **kwargs)
    start, dataset, name = cell.relative_to(run / "cells").parts
    rows = pd.read_csv(run / "user_loop.csv")
    n, budget = int(name.split("-")[0][1:]), float(name.split("-")[1].removesuffix("min"))
    sel = rows[(rows["start"] == start) & (rows["dataset"] == dataset) & (rows["n_labelled"] == n)
               & (rows["budget_min"] == budget)]
    outcome = {f"{model}_{cond}_{metric}": float(sel[(sel["model"] == model) & (sel["condition"] == cond)][metric].iloc[0])
               for model in ("before", "candidate") for cond in ("clean", "LQ-3")
               for metric in ("box_dice", "dice_5", "noc_85")}
    scores = degraded.condition_scores
    return {"run": str(run), "start": start, "dataset": dataset, "n_labelled": n, "budget_min": budget,
            "held_back": len(items), "objects": margin.objects,
            "recorded_current": decision["current_score"], "recorded_candidate": decision["candidate_score"],
            "clean_current": scores[CLEAN][0], "clean_candidate": scores[CLEAN][1],
            "degraded_current": scores[level][0], "degraded_candidate": scores[level][1],
            "margin_swaps": margin.swapped, "degraded_swaps": degraded.swapped,
            "degraded_delta": degraded.delta, "degraded_bound": degraded.lower_bound,
            "degraded_objects": degraded.objects, "degraded_mean_rule": degraded.mean_rule_swapped,
            "degraded_summary": degraded.summary(), "judge_clean_s": round(clean_s + clean_s2, 1),
            "judge_s": round(both_s + both_s2, 1), **outcome}


def harm_and_gain(row: dict, swapped: bool) -> tuple[list[str], float, float]:
    """The falls of the kept model against the start model (issue 28's test), and its LQ-3 box and 5-click gains."""
    from user_loop import falls

    kept = "candidate" if swapped else "before"
    harm = []
    for cond in ("clean", "LQ-3"):
        before = {m: row[f"before_{cond}_{m}"] for m in ("box_dice", "dice_5", "noc_85")}
        after = {m: row[f"{kept}_{cond}_{m}"] for m in ("box_dice", "dice_5", "noc_85")}
        harm += [f"{cond} {f}" for f in falls(before, after)]
    return (harm, row[f"{kept}_LQ-3_box_dice"] - row["before_LQ-3_box_dice"],
            row[f"{kept}_LQ-3_dice_5"] - row["before_LQ-3_dice_5"])


def report(rows: list[dict], level: str) -> str:
    lines = ["| dataset | N | held back (objects) | recorded clean judge | re-judged clean | "
             f"{level} judge | clean gain | {level} gain | margin | degraded | kept model's LQ-3 box gain "
             "(margin / degraded) | judge s: clean / both |", "|---" * 12 + "|"]
    tally = {"margin": [0, [], []], "degraded": [0, [], []]}
    left_out = []
    for r in rows:
        reproduced = abs(r["clean_current"] - r["recorded_current"]) <= REPRODUCE_TOL and \
            abs(r["clean_candidate"] - r["recorded_candidate"]) <= REPRODUCE_TOL
        gains = {}
        for rule in ("margin", "degraded"):
            harm, box_gain, click_gain = harm_and_gain(r, r[f"{rule}_swaps"])
            gains[rule] = box_gain
            if reproduced:
                tally[rule][0] += bool(harm)
                tally[rule][1].append(box_gain)
                tally[rule][2].append(click_gain)
            r[f"{rule}_harm"] = "; ".join(harm)
        if not reproduced:
            left_out.append(f"{r['dataset']} N = {r['n_labelled']}")
        lines.append(
            f"| {r['dataset']} | {r['n_labelled']} | {r['held_back']} ({r['objects']}) | "
            f"{r['recorded_current']:.3f} -> {r['recorded_candidate']:.3f} | "
            f"{r['clean_current']:.3f} -> {r['clean_candidate']:.3f} | "
            f"{r['degraded_current']:.3f} -> {r['degraded_candidate']:.3f} | "
            f"{r['clean_candidate'] - r['clean_current']:+.3f} | {r['degraded_candidate'] - r['degraded_current']:+.3f} | "
            f"{'swap' if r['margin_swaps'] else 'keep'} | {'swap' if r['degraded_swaps'] else 'keep'} | "
            f"{gains['margin']:+.3f} / {gains['degraded']:+.3f} | {r['judge_clean_s']:.0f} / {r['judge_s']:.0f} |")
    lines += ["", "Cells where the kept model is worse than the start model by more than 0.01 (issue 28's test):", ""]
    for rule in ("margin", "degraded"):
        harmed = [f"{r['dataset']} N = {r['n_labelled']} ({r[f'{rule}_harm']})" for r in rows if r[f"{rule}_harm"]]
        lines.append(f"- {rule}: {len(harmed)}" + (f": {'; '.join(harmed)}" if harmed else ""))
    if left_out:
        lines += ["", f"Left out of the test (clean judge not reproduced within {REPRODUCE_TOL}): {', '.join(left_out)}"]
    m, d = tally["margin"], tally["degraded"]
    box_m, box_d = float(np.mean(m[1])) if m[1] else math.nan, float(np.mean(d[1])) if d[1] else math.nan
    clk_m, clk_d = float(np.mean(m[2])) if m[2] else math.nan, float(np.mean(d[2])) if d[2] else math.nan
    no_more_harm = d[0] <= m[0]
    more_gain = box_d >= box_m and clk_d >= clk_m - CLICKS_ALLOWANCE
    lines += ["", f"Adoption test over {len(m[1])} cell(s) (rule-judge-degraded.md):", "",
              f"1. harmed cells: margin {m[0]}, degraded {d[0]}: **{'met' if no_more_harm else 'not met'}**",
              f"2. mean LQ-3 box Dice gain of the kept model: margin {box_m:+.4f}, degraded {box_d:+.4f}; mean LQ-3 "
              f"gain after 5 clicks: margin {clk_m:+.4f}, degraded {clk_d:+.4f} (allowance {CLICKS_ALLOWANCE}): "
              f"**{'met' if more_gain else 'not met'}**",
              "", f"Verdict: **{'adopt degraded' if no_more_harm and more_gain else 'keep margin'}**"]
    return "\n".join(lines)


def redecided_rows(rows: list[dict]):
    """The cells' ``user_loop.csv`` rows with the ``degraded`` rule's judge numbers, decided by
    ``user_loop.redecide`` (which also takes the *kept* rows from the candidate's or the start model's rows)."""
    import pandas as pd
    from user_loop import redecide

    cells = []
    for r in rows:
        cell = pd.read_csv(Path(r["run"]) / "user_loop.csv")
        cell = cell[(cell["start"] == r["start"]) & (cell["dataset"] == r["dataset"])
                    & (cell["n_labelled"] == r["n_labelled"]) & (cell["budget_min"] == r["budget_min"])].copy()
        cell["judge_current"] = (r["clean_current"] + r["degraded_current"]) / 2
        cell["judge_candidate"] = (r["clean_candidate"] + r["degraded_candidate"]) / 2
        cell["judge_delta"], cell["judge_bound"] = r["degraded_delta"], r["degraded_bound"]
        cell["judge_objects"], cell["mean_rule_swapped"] = r["degraded_objects"], r["degraded_mean_rule"]
        cell["judge_clean_gain"] = r["clean_candidate"] - r["clean_current"]
        cell["judge_degraded_gain"] = r["degraded_candidate"] - r["degraded_current"]
        cells.append(cell)
    if not cells:
        return pd.DataFrame()
    df = redecide(pd.concat(cells, ignore_index=True), "degraded")
    decided = {(r["dataset"], r["n_labelled"], r["budget_min"]): bool(r["degraded_swaps"]) for r in rows}
    mismatch = [k for k, g in df.groupby(["dataset", "n_labelled", "budget_min"])
                if bool(g["swapped"].iloc[0]) != decided[k]]
    if mismatch:  # the two implementations of the rule must agree
        raise RuntimeError(f"user_loop.redecide and never_worse.decide disagree on {mismatch}")
    return df


def main(argv=None) -> int:
    import pandas as pd
    import torch

    from training.evaluation.dataset import discover

    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    roots = args.data or ["../shared/data/medseg"]
    datasets = [d for root in roots for d in discover(root)]
    samples_by_key = {s.key: s for d in datasets for s in d.samples}
    modality_of = {s.key: d.modality for d in datasets for s in d.samples}
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for run, cell in find_cells(args.runs):
        print(f"judging {cell} ...", flush=True)
        rows.append(rejudge_cell(run, cell, samples_by_key, modality_of, args.level))
        pd.DataFrame(rows).to_csv(args.out / "rejudged.csv", index=False)
    text = report(rows, args.level)
    pd.DataFrame(rows).to_csv(args.out / "rejudged.csv", index=False)
    redecided_rows(rows).to_csv(args.out / "user_loop.csv", index=False)
    (args.out / "rejudged.md").write_text(f"Command: `python benchmarks/user_loop_rejudge.py "
                                          f"{' '.join(sys.argv[1:] if argv is None else argv)}`\n\n{text}\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
