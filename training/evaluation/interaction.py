"""The interactive-segmentation field's per-object metrics, from the iterative modes' rows (one row per object and
step, ``dice`` and ``click_honoured``):

- **NoC@T** (number of clicks): the clicks an object needs until its Dice reaches T (0.80, 0.85, 0.90; RITM, SAM,
  the interactive benchmarks). A point start's first point counts as a click, a box does not. An object that
  does not reach T within the run's steps counts as ``NOC_MAX_CLICKS`` (20, the field's cap), and the share of such
  objects is reported next to it (with fewer than 20 steps measured, "never" means "not within the steps run").
- **click-honoured share**: of the corrective clicks, the share whose pixel the next mask labels as asked.
- **fall share**: of the object-steps (an object from one step to the next), the share where Dice falls by more
  than ``FALL_THRESHOLD`` (0.01).
- **DSC-AUC**: the area under an object's Dice-per-click curve over its corrective clicks (steps 1..N, unit
  spacing, trapezoid), the CVPR 2025 interactive challenge's definition (there over 5 clicks after the box, so at
  most N - 1 = 4; here at most steps - 1).

Tables are per model, start and condition (objects averaged per dataset, then the mean of datasets, as the other
tables), and per dataset.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

NOC_THRESHOLDS = (0.80, 0.85, 0.90)
NOC_MAX_CLICKS = 20
FALL_THRESHOLD = 0.01
_OBJECT = ["model", "prompt", "condition", "dataset", "sample", "object_id"]


def clicks_to_reach(dice_by_step, threshold: float, first_step_clicks: int, max_clicks: int = NOC_MAX_CLICKS
                    ) -> tuple[int, bool]:
    """(clicks, reached): the first step whose Dice is at least ``threshold`` as a click count (step k has k
    corrective clicks plus ``first_step_clicks`` from the start: 1 for a point, 0 for a box); ``max_clicks`` and
    False when no step reaches it."""
    for step, value in enumerate(dice_by_step):
        if value >= threshold:
            return min(step + first_step_clicks, max_clicks), True
    return max_clicks, False


def dsc_auc(dice_by_step) -> float:
    """Trapezoid area under Dice over the corrective clicks (steps 1..N, unit spacing); 0 with fewer than 2."""
    d = np.asarray(dice_by_step, dtype=float)[1:]
    if d.size < 2:
        return 0.0
    return float(np.sum((d[1:] + d[:-1]) / 2))


def object_metrics(df: pd.DataFrame, thresholds=NOC_THRESHOLDS, max_clicks: int = NOC_MAX_CLICKS,
                   fall: float = FALL_THRESHOLD) -> pd.DataFrame:
    """One row per object of the iterative modes: ``noc@T`` and ``reached@T`` per threshold, ``dsc_auc``,
    ``falls`` / ``object_steps`` (steps whose Dice is more than ``fall`` below the step before), ``honoured`` /
    ``clicks`` (summed shares of honoured clicks and the number of steps with a click)."""
    it = df[df["prompt"].astype(str).str.startswith("iter_")]
    if it.empty:
        return pd.DataFrame()
    rows = []
    for key, g in it.sort_values("step").groupby(_OBJECT, sort=False):
        dice = g["dice"].to_numpy(dtype=float)
        row = dict(zip(_OBJECT, key))
        first = 1 if key[1] == "iter_point" else 0
        for t in thresholds:
            row[f"noc@{round(t * 100)}"], row[f"reached@{round(t * 100)}"] = clicks_to_reach(dice, t, first, max_clicks)
        row["dsc_auc"] = dsc_auc(dice)
        row["falls"] = int((np.diff(dice) < -fall).sum())
        row["object_steps"] = max(len(dice) - 1, 0)
        honoured = pd.to_numeric(g.get("click_honoured", pd.Series(dtype=float)), errors="coerce").dropna()
        row["honoured"], row["clicks"] = float(honoured.sum()), int(honoured.size)
        rows.append(row)
    return pd.DataFrame(rows)


def _summaries(objects: pd.DataFrame, keys: list[str], thresholds) -> pd.DataFrame:
    """Per ``keys`` group: mean NoC and never-reached share per threshold, mean DSC-AUC, pooled honoured and fall
    shares."""
    agg = {f"noc@{round(t * 100)}": "mean" for t in thresholds}
    agg.update({f"reached@{round(t * 100)}": "mean" for t in thresholds})
    agg.update(dsc_auc="mean", falls="sum", object_steps="sum", honoured="sum", clicks="sum")
    out = objects.groupby(keys).agg(agg)
    out["objects"] = objects.groupby(keys).size()
    for t in thresholds:
        out[f"never@{round(t * 100)}"] = 1 - out.pop(f"reached@{round(t * 100)}")
    out["honoured_share"] = out["honoured"] / out["clicks"].where(out["clicks"] > 0)
    out["fall_share"] = out["falls"] / out["object_steps"].where(out["object_steps"] > 0)
    return out


def interaction_summary(df: pd.DataFrame, by: str = "condition", thresholds=NOC_THRESHOLDS,
                        max_clicks: int = NOC_MAX_CLICKS, fall: float = FALL_THRESHOLD) -> pd.DataFrame:
    """``by="condition"``: per (model, prompt, condition), each dataset's summary then the mean of datasets;
    ``by="dataset"``: per (model, prompt, dataset, condition), over that dataset's objects."""
    objects = object_metrics(df, thresholds, max_clicks, fall)
    if objects.empty:
        return pd.DataFrame()
    per_ds = _summaries(objects, ["model", "prompt", "condition", "dataset"], thresholds)
    if by == "dataset":
        return per_ds
    if by != "condition":
        raise ValueError(f"by={by!r}: use 'condition' or 'dataset'")
    cols = [c for c in per_ds.columns if c not in ("falls", "object_steps", "honoured", "clicks", "objects")]
    out = per_ds[cols].groupby(["model", "prompt", "condition"]).mean()
    out["objects"] = per_ds["objects"].groupby(["model", "prompt", "condition"]).sum()
    return out


def interaction_table(df: pd.DataFrame, by: str = "condition", condition_order=None) -> str:
    """Markdown of :func:`interaction_summary`: NoC@80/85/90 (share never reaching it), clicks honoured, object-step
    falls > 0.01, DSC-AUC."""
    summary = interaction_summary(df, by)
    if summary.empty:
        return ""
    keys = list(summary.index.names)
    order = {c: i for i, c in enumerate(condition_order or [])}
    rows = []
    for idx, r in summary.iterrows():
        cells = [f"{r[f'noc@{round(t * 100)}']:.2f} ({r[f'never@{round(t * 100)}']:.0%})" for t in NOC_THRESHOLDS]
        fmt = (lambda v: "-" if pd.isna(v) else f"{v:.3f}")
        rows.append([str(v) for v in idx] + cells + [fmt(r["honoured_share"]), fmt(r["fall_share"]),
                                                     f"{r['dsc_auc']:.3f}", str(int(r["objects"]))])
    ci = keys.index("condition")
    rows.sort(key=lambda row: tuple(order.get(v, len(order)) if i == ci else v for i, v in enumerate(row[:len(keys)])))
    header = [("start" if k == "prompt" else k) for k in keys] + [
        f"NoC@{round(t * 100)} (never)" for t in NOC_THRESHOLDS] + [
        "clicks honoured", f"object-steps falling > {FALL_THRESHOLD}", "DSC-AUC", "objects"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
