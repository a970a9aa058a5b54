"""Compare two `python -m training.evaluate` outputs row by row: every column but the run id (the measurements,
the prompts, the protocol hash) must be equal, floats exactly. Exit status 0 when they are.

    python scripts/compare_eval_rows.py OUT_BEFORE OUT_AFTER
"""

from __future__ import annotations

import sys

import pandas as pd

KEY = ["model_key", "sample", "condition", "prompt", "object_id", "step"]


def main(before: str, after: str) -> int:
    a, b = (pd.read_csv(f"{d}/measurements.csv") for d in (before, after))
    skip = [c for c in a.columns if c == "run_id" or c.endswith(("_ms", "_s")) or "time" in c]  # differ by run
    a2, b2 = (x.drop(columns=skip).sort_values(KEY).reset_index(drop=True) for x in (a, b))
    print("rows:", len(a2), len(b2), "| columns compared:", len(a2.columns), "| left out:", skip)
    print("protocol hashes:", sorted(a2["protocol"].unique()), "==", sorted(b2["protocol"].unique()))
    same = a2.equals(b2)
    print("identical rows (every compared column, exact float equality):", same)
    if not same and len(a2) == len(b2):
        diff = (a2 != b2) & ~(a2.isna() & b2.isna())
        print(diff.sum()[diff.sum() > 0])
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
