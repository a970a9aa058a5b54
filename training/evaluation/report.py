"""Summary tables (Markdown) and plots (PNG) from the long-format measurements.

Aggregation conventions:

- A prompt mode's number is its final measurement: step 0 for box / points modes, the last step for the
  iterative modes (``iter_box``, ``iter_point``); the per-step table and plot show every step.
- Per dataset: mean ± std over objects. "all datasets": mean ± std over the dataset means (each dataset weighs
  the same, as the seed papers' "mean across datasets").
- Per-image Dice (the empirical CDF, tail percentiles): mean over the image's objects.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from napari_robustmedsam.io import atomic_write_path

from .store import make_readable

METRICS = ("dice", "nsd", "iou", "hd95")
METRIC_TITLES = {"dice": "Dice", "nsd": "NSD (tau = 2 px)", "iou": "IoU", "hd95": "HD95 (px)"}
ALL = "all datasets"


def _condition_order(conds) -> list[str]:
    order = {"clean": 0, "LQ-1": 1, "LQ-2": 2, "LQ-3": 3, "LQ-3+": 4}
    return sorted(set(conds), key=lambda c: (order.get(c, 10), c))


def _prompt_order(prompts) -> list[str]:
    def key(p):
        if p == "box":
            return (0, 0, p)
        if p == "box_jitter":
            return (1, 0, p)
        if p.startswith("points"):
            return (2, int(p[6:] or 0), p)
        return (3, 0, p)

    return sorted(set(prompts), key=key)


def final_rows(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, sample, condition, prompt, object): the last step of each prompt mode."""
    if df.empty:
        return df
    last = df.groupby(["model", "sample", "condition", "prompt", "object_id"])["step"].transform("max")
    return df[df["step"] == last]


def per_dataset(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """mean, std, n per (model, dataset, prompt, condition) over objects, plus the 'all datasets' rows."""
    g = df.groupby(["model", "dataset", "prompt", "condition"])[metric]
    out = g.agg(["mean", "std", "count"]).reset_index()
    overall = (
        out.groupby(["model", "prompt", "condition"])["mean"].agg(["mean", "std", "count"]).reset_index()
        .assign(dataset=ALL)
    )
    return pd.concat([out, overall[out.columns]], ignore_index=True)


def _fmt(mean: float, std: float, metric: str) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    digits = 1 if metric == "hd95" else 3
    if std is None or (isinstance(std, float) and math.isnan(std)):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def metric_table(fin: pd.DataFrame, metric: str) -> str:
    """Markdown: rows (model, dataset, prompt), columns conditions, cells mean ± std."""
    stats = per_dataset(fin, metric)
    conds = _condition_order(fin["condition"])
    datasets = sorted(set(fin["dataset"])) + [ALL]
    rows = []
    multi = fin["model"].nunique() > 1
    for model in sorted(set(fin["model"])):
        for ds in datasets:
            for prompt in _prompt_order(fin["prompt"]):
                sel = stats[(stats.model == model) & (stats.dataset == ds) & (stats.prompt == prompt)]
                if sel.empty:
                    continue
                cells = []
                for c in conds:
                    s = sel[sel.condition == c]
                    cells.append(_fmt(float(s["mean"].iloc[0]), float(s["std"].iloc[0]), metric) if len(s) else "-")
                n = sel["count"].max() if ds != ALL else sel["count"].max()
                label = f"**{ds}**" if ds == ALL else ds
                rows.append(([model] if multi else []) + [label, prompt] + cells + [str(int(n))])
    header = (["model"] if multi else []) + ["dataset", "prompt"] + conds + ["n (objects / datasets)"]
    return _md_table(header, rows)


def step_means(df: pd.DataFrame, metric: str = "dice") -> pd.Series:
    """Mean-of-datasets metric after each interaction step of the iterative modes, indexed by (model, prompt,
    condition, step): objects averaged per dataset first, so that datasets with many objects do not dominate."""
    it = df[df["prompt"].str.startswith("iter_")]
    per_ds = it.groupby(["model", "prompt", "condition", "dataset", "step"])[metric].mean()
    return per_ds.groupby(["model", "prompt", "condition", "step"]).mean()


def step_table(df: pd.DataFrame, metric: str = "dice") -> str:
    """Markdown: mean-of-datasets metric after each interaction step, per model, start and condition."""
    it = df[df["prompt"].str.startswith("iter_")]
    if it.empty:
        return ""
    agg = step_means(it, metric).unstack("step")
    steps = list(agg.columns)
    corder = {c: i for i, c in enumerate(_condition_order(it["condition"]))}
    rows = []
    for (model, prompt, cond), vals in agg.iterrows():
        rows.append([model, prompt, cond] + ["-" if pd.isna(v) else f"{v:.3f}" for v in vals])
    rows.sort(key=lambda r: (r[0], r[1], corder[r[2]]))
    return _md_table(["model", "start", "condition"] + [f"step {s}" for s in steps], rows)


def step_falls(df: pd.DataFrame, metric: str = "dice", n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Every step at which the mean-of-datasets curve of :func:`step_means` falls, with a 95 % interval of that
    change from a paired bootstrap over images (resampled within each dataset, an image's objects and steps kept
    together). Why: with tens of images one object's slip moves the mean by a few thousandths; an interval that
    excludes 0 marks a fall that the number of images does not explain."""
    cols = ["model", "prompt", "condition", "step", "change", "ci_low", "ci_high", "images"]
    it = df[df["prompt"].str.startswith("iter_")]
    rng = np.random.default_rng(seed)
    rows = []
    for (model, prompt, cond), g in it.groupby(["model", "prompt", "condition"]):
        sums, counts = [], []
        for _, gd in g.groupby("dataset"):
            by_image = gd.pivot_table(index="sample", columns="step", values=metric, aggfunc=["sum", "count"])
            sums.append(by_image["sum"].fillna(0.0).to_numpy())
            counts.append(by_image["count"].fillna(0).to_numpy())
        steps = sorted(g["step"].unique())
        curve = np.mean([s.sum(0) / c.sum(0) for s, c in zip(sums, counts)], axis=0)
        change = np.diff(curve)
        if not (change < 0).any():
            continue
        boot = np.zeros((n_boot, len(steps)))
        for s, c in zip(sums, counts):
            idx = rng.integers(0, s.shape[0], size=(n_boot, s.shape[0]))
            boot += s[idx].sum(1) / np.maximum(c[idx].sum(1), 1)
        lo, hi = np.percentile(np.diff(boot / len(sums), axis=1), [2.5, 97.5], axis=0)
        n_img = sum(s.shape[0] for s in sums)
        rows += [[model, prompt, cond, steps[k + 1], change[k], lo[k], hi[k], n_img]
                 for k in np.flatnonzero(change < 0)]
    return pd.DataFrame(rows, columns=cols)


def falls_table(df: pd.DataFrame, metric: str = "dice") -> str:
    """Markdown: the falls of :func:`step_falls`, or a line saying there are none."""
    falls = step_falls(df, metric)
    if falls.empty:
        return "No step lowers the mean of any model, start and condition."
    corder = {c: i for i, c in enumerate(_condition_order(falls["condition"]))}
    falls = falls.assign(_c=falls["condition"].map(corder)).sort_values(["model", "prompt", "_c", "step"])
    rows = [[r.model, r.prompt, r.condition, str(r.step), f"{r.change:+.5f}", f"{r.ci_low:+.4f} .. {r.ci_high:+.4f}",
             "yes" if r.ci_high < 0 else "no", str(r.images)] for r in falls.itertuples()]
    return _md_table(["model", "start", "condition", "step", "change", "95 % interval", "beyond sampling noise",
                      "images"], rows)


def honoured_table(df: pd.DataFrame) -> str:
    """Markdown: share of corrective clicks the very next mask agrees with, per model, start and condition
    (clicks pooled per dataset, then the mean of datasets). Empty for runs measured before the column existed."""
    if "click_honoured" not in df.columns:
        return ""
    it = df[df["prompt"].str.startswith("iter_")].copy()
    it["click_honoured"] = pd.to_numeric(it["click_honoured"], errors="coerce")
    it = it.dropna(subset=["click_honoured"])
    if it.empty:
        return ""
    per_ds = it.groupby(["model", "prompt", "condition", "dataset"])["click_honoured"].mean().reset_index()
    agg = per_ds.groupby(["model", "prompt", "condition"])["click_honoured"].mean().unstack("condition")
    conds = [c for c in _condition_order(it["condition"]) if c in agg.columns]
    n = it.groupby(["model", "prompt"]).size()
    rows = [[model, prompt] + ["-" if pd.isna(vals[c]) else f"{vals[c]:.2f}" for c in conds] + [str(int(n[(model, prompt)]))]
            for (model, prompt), vals in agg.iterrows()]
    return _md_table(["model", "start"] + conds + ["clicks"], rows)


def per_image(fin: pd.DataFrame, metric: str = "dice") -> pd.DataFrame:
    return fin.groupby(["model", "dataset", "sample", "condition", "prompt"])[metric].mean().reset_index()


def tail_table(fin: pd.DataFrame) -> str:
    """Markdown: per-image Dice tail (10th percentile, share of images below 0.5), pooled over datasets."""
    pi = per_image(fin)
    rows = []
    for (model, prompt, cond), g in pi.groupby(["model", "prompt", "condition"]):
        v = g["dice"].to_numpy()
        rows.append([model, prompt, cond, f"{np.percentile(v, 10):.3f}", f"{np.median(v):.3f}",
                     f"{(v < 0.5).mean() * 100:.0f} %", str(v.size)])
    order = {p: i for i, p in enumerate(_prompt_order(pi["prompt"]))}
    corder = {c: i for i, c in enumerate(_condition_order(pi["condition"]))}
    rows.sort(key=lambda r: (r[0], order[r[1]], corder[r[2]]))
    return _md_table(["model", "prompt", "condition", "P10 per-image Dice", "median", "images < 0.5", "images"], rows)


# ---- plots -----------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    with atomic_write_path(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
    _plt().close(fig)
    return make_readable(path)


_STYLES = ["-", "--", ":", "-."]


def plot_dice_vs_step(df: pd.DataFrame, path: Path) -> Path | None:
    it = df[df["prompt"].str.startswith("iter_")]
    if it.empty:
        return None
    plt = _plt()
    starts = sorted(set(it["prompt"]))
    conds = _condition_order(it["condition"])
    models = sorted(set(it["model"]))
    cmap = plt.get_cmap("viridis", max(len(conds), 2))
    fig, axes = plt.subplots(1, len(starts), figsize=(5.2 * len(starts), 4), squeeze=False, sharey=True)
    agg = step_means(it, "dice").reset_index()
    for ax, start in zip(axes[0], starts):
        for mi, model in enumerate(models):
            for ci, cond in enumerate(conds):
                s = agg[(agg.model == model) & (agg.prompt == start) & (agg.condition == cond)]
                if s.empty:
                    continue
                ax.plot(s["step"], s["dice"], _STYLES[mi % len(_STYLES)], marker="o", ms=3, color=cmap(ci),
                        label=f"{model} · {cond}" if len(models) > 1 else cond)
        ax.set_title(f"start: {'box' if start == 'iter_box' else 'one point'}")
        ax.set_xlabel("interaction step (corrective clicks)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("Dice (mean of datasets)")
    if len(models) * len(conds) > 8:  # many curves: the legend beside the panels, not over them
        axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    else:
        axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.suptitle("Dice vs interaction step")
    return _save(fig, path)


def plot_degradation_bars(fin: pd.DataFrame, path: Path) -> Path:
    plt = _plt()
    prompts = _prompt_order(fin["prompt"])
    conds = _condition_order(fin["condition"])
    models = sorted(set(fin["model"]))
    per_ds = fin.groupby(["model", "prompt", "condition", "dataset"])["dice"].mean().reset_index()
    agg = per_ds.groupby(["model", "prompt", "condition"])["dice"].agg(["mean", "std"]).reset_index()
    fig, axes = plt.subplots(1, len(prompts), figsize=(4.2 * len(prompts), 3.8), squeeze=False, sharey=True)
    width = 0.8 / max(len(models), 1)
    x = np.arange(len(conds))
    for ax, prompt in zip(axes[0], prompts):
        for mi, model in enumerate(models):
            s = agg[(agg.model == model) & (agg.prompt == prompt)].set_index("condition").reindex(conds)
            ax.bar(x + (mi - (len(models) - 1) / 2) * width, s["mean"], width, yerr=s["std"].fillna(0), capsize=2,
                   label=model, alpha=0.85)
        ax.set_xticks(x, conds, rotation=45, ha="right", fontsize=8)
        ax.set_title(prompt)
        ax.set_ylim(0, 1)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("Dice (mean ± std of dataset means)")
    if len(models) > 1:
        axes[0][-1].legend(fontsize=8)
    fig.suptitle("Dice per degradation condition")
    return _save(fig, path)


def plot_clean_vs_degraded(fin: pd.DataFrame, model: str, path: Path) -> Path | None:
    plt = _plt()
    d = fin[fin["model"] == model]
    clean = d[d["condition"] == "clean"].set_index(["sample", "prompt", "object_id"])["dice"]
    degraded = [c for c in _condition_order(d["condition"]) if c != "clean"]
    if clean.empty or not degraded:
        return None
    prompts = _prompt_order(d["prompt"])
    cmap = plt.get_cmap("plasma", max(len(degraded) + 1, 2))
    fig, axes = plt.subplots(1, len(prompts), figsize=(3.9 * len(prompts), 3.9), squeeze=False)
    for ax, prompt in zip(axes[0], prompts):
        for ci, cond in enumerate(degraded):
            sel = d[(d["condition"] == cond) & (d["prompt"] == prompt)]
            s = sel.set_index(["sample", "prompt", "object_id"])["dice"]
            joined = pd.concat([clean.rename("clean"), s.rename("deg")], axis=1, join="inner")
            ax.scatter(joined["clean"], joined["deg"], s=6, alpha=0.5, color=cmap(ci), label=cond)
        ax.plot([0, 1], [0, 1], "k--", lw=0.8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title(prompt)
        ax.set_xlabel("Dice, clean image")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("Dice, degraded image (same object, same prompt)")
    axes[0][-1].legend(fontsize=7, markerscale=2)
    fig.suptitle(f"Clean vs degraded, per object - {model}")
    return _save(fig, path)


def plot_ecdf(fin: pd.DataFrame, path: Path) -> Path:
    plt = _plt()
    pi = per_image(fin)
    prompts = _prompt_order(pi["prompt"])
    conds = _condition_order(pi["condition"])
    models = sorted(set(pi["model"]))
    cmap = plt.get_cmap("viridis", max(len(conds), 2))
    fig, axes = plt.subplots(1, len(prompts), figsize=(4.2 * len(prompts), 3.8), squeeze=False, sharey=True)
    for ax, prompt in zip(axes[0], prompts):
        for mi, model in enumerate(models):
            for ci, cond in enumerate(conds):
                v = np.sort(pi[(pi.model == model) & (pi.prompt == prompt) & (pi.condition == cond)]["dice"].to_numpy())
                if v.size == 0:
                    continue
                x = np.concatenate([[0.0], v, [1.0]])
                y = np.concatenate([[0.0], np.arange(1, v.size + 1) / v.size, [1.0]])
                ax.step(x, y, where="post", ls=_STYLES[mi % len(_STYLES)], color=cmap(ci),
                        label=f"{model} · {cond}" if len(models) > 1 else cond)
        ax.set_xlim(0, 1)
        ax.set_title(prompt)
        ax.set_xlabel("per-image Dice")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("fraction of images with Dice ≤ x")
    axes[0][-1].legend(fontsize=7, loc="upper left")
    fig.suptitle("Empirical CDF of per-image Dice (left-shifted curve = heavier failure tail)")
    return _save(fig, path)


# ---- the whole report ------------------------------------------------------------------------
def _slug(s: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in s)


def write_report(df: pd.DataFrame, out: str | Path, header: str = "", plots: bool = True) -> dict[str, Path]:
    """summary.md and plots/*.png under `out`; returns the written paths."""
    out = Path(out)
    written: dict[str, Path] = {}
    if df.empty:
        with atomic_write_path(out / "summary.md") as tmp:
            tmp.write_text("# Evaluation summary\n\nNo finished measurements yet.\n")
        return {"summary": out / "summary.md"}
    fin = final_rows(df)
    parts = ["# Evaluation summary", ""]
    if header:
        parts += [header.strip(), ""]
    n_obj = fin.groupby("model")[["sample", "object_id"]].apply(lambda g: len(g.drop_duplicates())).to_dict()
    parts += [
        f"Models: {', '.join(sorted(set(df['model'])))}. Datasets: {df['dataset'].nunique()}, images: "
        f"{df['sample'].nunique()}, objects per model: {', '.join(f'{k} {v}' for k, v in n_obj.items())}. "
        f"Conditions: {', '.join(_condition_order(df['condition']))}. "
        f"Prompts: {', '.join(_prompt_order(df['prompt']))}.",
        "",
        "Cells: mean ± std over objects (per dataset) or over dataset means (**all datasets**). Iterative modes "
        "report their last step.",
        "",
    ]
    for metric in METRICS:
        parts += [f"## {METRIC_TITLES[metric]}", "", metric_table(fin, metric), ""]
    st = step_table(df, "dice")
    if st:
        parts += ["## Dice after each interaction step (mean of datasets)", "", st, ""]
        parts += ["## Steps where the mean falls", "",
                  "Change of the mean of datasets from the previous step, with a 95 % interval from 1000 paired "
                  "bootstrap resamples of the images (within each dataset). \"beyond sampling noise\": the whole "
                  "interval is below 0.", "", falls_table(df, "dice"), ""]
    ht = honoured_table(df)
    if ht:
        parts += ["## Corrective clicks honoured by the next mask (mean of datasets)", "",
                  "Share of corrective clicks whose pixel the next mask labels as asked (inside for a positive "
                  "click, outside for a negative one).", "", ht, ""]
    from .interaction import FALL_THRESHOLD, NOC_MAX_CLICKS, interaction_table

    it_level = interaction_table(df, "condition", _condition_order(df["condition"]))
    if it_level:
        steps = int(df.loc[df["prompt"].astype(str).str.startswith("iter_"), "step"].max())
        parts += ["## Interaction metrics (mean of datasets)", "",
                  f"NoC@T: clicks until an object's Dice reaches T (a point start's point counts, a box does not); "
                  f"an object not reaching it within the {steps} steps run counts as {NOC_MAX_CLICKS}, and the share "
                  f"of such objects is in brackets. Clicks honoured: share of corrective clicks whose pixel the next "
                  f"mask labels as asked. Object-steps falling: share of an object's steps whose Dice falls by more "
                  f"than {FALL_THRESHOLD}. DSC-AUC: trapezoid area under Dice over the corrective clicks 1..{steps} "
                  f"(the CVPR 2025 interactive challenge's; at most {max(steps - 1, 0)}).", "", it_level, "",
                  "### Per dataset", "", interaction_table(df, "dataset", _condition_order(df["condition"])), ""]
    parts += ["## Tail robustness: per-image Dice (all datasets pooled)", "", tail_table(fin), ""]
    if plots:
        pdir = out / "plots"
        p = plot_dice_vs_step(df, pdir / "dice_vs_step.png")
        if p:
            written["dice_vs_step"] = p
        written["degradation_bars"] = plot_degradation_bars(fin, pdir / "dice_per_degradation.png")
        written["ecdf"] = plot_ecdf(fin, pdir / "ecdf_per_image_dice.png")
        for model in sorted(set(fin["model"])):
            p = plot_clean_vs_degraded(fin, model, pdir / f"clean_vs_degraded_{_slug(model)}.png")
            if p:
                written[f"scatter_{model}"] = p
        parts += ["## Plots", ""]
        for key, p in written.items():
            parts.append(f"![{key}](plots/{p.name})")
        parts.append("")
    with atomic_write_path(out / "summary.md") as tmp:
        tmp.write_text("\n".join(parts))
    written["summary"] = make_readable(out / "summary.md")
    return written
