"""Tables of what the shipped heads measured on the held-out split, from the recipe's own evaluation files.

    python benchmarks/shipped_heads_report.py [--runs runs/ship] [--out docs/results/shipped-heads/results.md]

Reads ``<runs>/<head>-ship/entry.json`` and ``<runs>/<head>-ship/eval-<policy>/measurements.csv`` written by
``python -m training.ship_heads`` and writes one markdown page: per head, the mean over datasets of box, 3-point
and 5-click Dice and the empty box masks, clean and LQ-3, next to LiteMedSAM on the same prompts and degradations;
per dataset, box Dice at LQ-3 with and without the empty-mask fallback; and the issue's targets checked.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "src")]

from training.ship_heads import HEADS, POLICIES, summarise  # noqa: E402

LEVEL = "LQ-3"


def _cell(x: float) -> str:
    return f"{x:.3f}"


def head_tables(name: str, folder: Path) -> tuple[list[str], dict]:
    entry = json.loads((folder / "entry.json").read_text())
    lines = [f"## {name}", "",
             f"Built by `{entry['command']}` ({entry['created_utc']}); training run `{entry['fit_command']}`.",
             f"Train part of the split: {sum(d['train_images'] for d in entry['training_data'])} images of "
             f"{', '.join(d['dataset'] for d in entry['training_data'])} (the fit validates on 10 % of them); best "
             f"validation epoch "
             f"{(entry['training'].get('best') or {}).get('epoch', '?')}, stopped by: "
             f"{entry['training'].get('stopped') or 'all epochs done'}.",
             f"Stored: {entry['export']['stored']['tensors']} of {entry['export']['stored']['of']} tensors "
             f"({entry['export']['stored']['parameters'] / 1e6:.2f} M values), {entry['size_bytes'] / 2**20:.1f} MiB, "
             f"{entry['export']['dtype']}; half precision check: {entry['export']['half_precision']['rule']}, "
             f"per-dataset mean IoU {min(entry['export']['half_precision']['mean_iou'].values()):.4f} at worst, "
             f"lowest single mask {entry['export']['half_precision']['min_iou']:.4f} "
             f"({entry['export']['half_precision']['prompts']} box prompts).", ""]
    checks = {}
    for policy in POLICIES:
        csv = folder / f"eval-{policy}" / "measurements.csv"
        if not csv.is_file():
            continue
        df = pd.read_csv(csv)
        summary = summarise(df)
        lines += [f"### {policy} click policy", "",
                  "| model | condition | box | 3 points | after 5 clicks | empty box masks |", "|---|---|---|---|---|---|"]
        for model in ("litemedsam", name, f"{name}-no-fallback"):
            for condition in ("clean", LEVEL):
                c = summary.get(model, {}).get(condition)
                if c:
                    lines.append(f"| {model} | {condition} | {_cell(c['box'])} | {_cell(c['points3'])} | "
                                 f"{_cell(c['clicks5'])} | {c['box_empty']} / {c['box_prompts']} |")
        base, head, bare = (summary.get(m, {}).get(LEVEL, {}) for m in ("litemedsam", name, f"{name}-no-fallback"))
        lines += ["", f"Box Dice per dataset at {LEVEL}:", "",
                  "| dataset | LiteMedSAM | head | head without fallback |", "|---|---|---|---|"]
        for ds in sorted(base.get("per_dataset_box", {})):
            lines.append(f"| {ds} | {base['per_dataset_box'][ds]:.3f} | {head.get('per_dataset_box', {}).get(ds, float('nan')):.3f} | "
                         f"{bare.get('per_dataset_box', {}).get(ds, float('nan')):.3f} |")
        if head and base:
            worst = min(head["per_dataset_box"][d] - base["per_dataset_box"][d] for d in base["per_dataset_box"]
                        if d in head["per_dataset_box"])
            checks[policy] = {
                "no dataset's box Dice more than 0.01 below LiteMedSAM's": (worst >= -0.01, f"worst difference {worst:+.3f}"),
                "empty box masks at most LiteMedSAM's + 1 % of prompts": (
                    head["box_empty"] <= base["box_empty"] + 0.01 * head["box_prompts"],
                    f"{head['box_empty']} vs {base['box_empty']} (+{0.01 * head['box_prompts']:.1f} allowed)"),
                "3-point Dice at least 0.50": (head["points3"] >= 0.50, _cell(head["points3"])),
                "Dice after 5 clicks above its own box Dice": (head["clicks5"] > head["box"],
                                                               f"{_cell(head['clicks5'])} vs {_cell(head['box'])}"),
            }
        lines.append("")
    return lines, checks


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default="runs/ship")
    p.add_argument("--out", default="docs/results/shipped-heads/results.md")
    args = p.parse_args(argv)
    runs = Path(args.runs)
    lines = ["# The shipped heads on the held-out development split", "",
             "How to use these figures: they compare each head shipped in `napari_robustmedsam/heads/` with LiteMedSAM on "
             "the 20 % of every development dataset that no head was trained on (seed 0), clean and at LQ-3, with the "
             "evaluation package's seeded prompts and degradations (mean over datasets, up to 3 objects per image). "
             "Rebuild a head and these files with `python -m training.ship_heads NAME --install`, then "
             "`python benchmarks/shipped_heads_report.py`.", ""]
    all_checks = {}
    for name in HEADS:
        folder = runs / f"{name}-ship"
        if (folder / "entry.json").is_file():
            part, checks = head_tables(name, folder)
            lines += part
            all_checks[name] = checks
    lines += ["## Targets (the shipped default head, robust-lite)", "", "| target | policy | result | met? |",
              "|---|---|---|---|"]
    for policy, checks in all_checks.get("robust-lite", {}).items():
        for target, (ok, text) in checks.items():
            lines.append(f"| {target} | {policy} | {text} | {'yes' if ok else '**no**'} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
