"""One evaluation report (summary.md with the interaction metrics, plots, measurements.csv.gz) from several runs,
each relabelled as a setting, optionally restricted to the samples of the first run.

    python benchmarks/click_refinement_report.py --out docs/results/click-refinement/heldout \\
        --same-samples "LiteMedSAM + random-walker=runs/held-random-walker" \\
        "LiteMedSAM, annotator default today=docs/results/click-guard/heldout-measurements.csv.gz:click-guard always-r2-negatives-before-positive"

A source is a run folder (its measurements) or a measurements CSV (``file:setting`` keeps the rows whose
``setting`` column is that value); only the first source's conditions and models' rows of litemedsam are kept.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.evaluation.report import write_report  # noqa: E402
from training.evaluation.store import load_measurements  # noqa: E402

DTYPES = {"sample": str, "image_id": str, "object_id": str, "protocol": str}


def load(source: str) -> pd.DataFrame:
    path, _, setting = source.partition(":") if not Path(source).exists() else (source, "", "")
    p = Path(path)
    df = load_measurements(p) if p.is_dir() else pd.read_csv(p, dtype=DTYPES)
    if setting:
        df = df[df["setting"].astype(str) == setting]
    return df


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--same-samples", action="store_true",
                    help="keep only the (sample, condition) pairs of the first source")
    ap.add_argument("--model", default="litemedsam", help="the model whose rows are kept")
    ap.add_argument("sources", nargs="+", metavar="LABEL=SOURCE")
    args = ap.parse_args()
    frames = []
    for spec in args.sources:
        label, source = spec.split("=", 1)
        df = load(source)
        df = df[df["model"] == args.model].copy()
        df["model"] = label
        frames.append(df)
    if args.same_samples:
        keys = set(zip(frames[0]["sample"], frames[0]["condition"]))
        frames = [f[[k in keys for k in zip(f["sample"], f["condition"])]] for f in frames]
    df = pd.concat(frames, ignore_index=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "measurements.csv.gz", index=False)
    write_report(df, out, header=f"Sources: {', '.join(args.sources)}")
    print(f"{len(df)} rows -> {out}")


if __name__ == "__main__":
    main()
