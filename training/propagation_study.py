"""Choose the 3D propagation's defaults by measurement: every candidate of docs/results/propagation/rule.md on every
volume (clean and under a degradation level), then the rule's leave-one-volume-out choice.

```bash
nice -n 10 python -m training.propagation_study --data ../shared/data/volumes --level LQ-3+ \\
    --cache runs/prop-cache --out docs/results/propagation
```

Every slice of every volume is embedded once (through the evaluation's disk cache, so a re-run and
``training.evaluate --cache`` reuse them), then each candidate propagates from the evaluation's seed (the model's
mask for the tight box on the object's central labelled slice, :func:`training.evaluation.volume_modes.propagate_masks`).
Writes ``candidates.csv`` (one row per candidate, volume, condition and object) and ``choice.md`` (the rule's
choice and the leave-one-volume-out figures).
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np
import pandas as pd

from napari_robustmedsam.annotation.propagation import PropagationSettings

PROMPTS = {"P0": "box+mask", "P1": "box+logits", "P2": "box+points+logits"}
MIN_SCORES = (0.0, 0.6, 0.7, 0.8)
MIN_IOUS = (0.3, 0.5)
TODAY = ("P0", 0.0, 0.5)
TIE = 0.005


def candidates() -> dict[str, PropagationSettings]:
    out = {}
    for (p, mode), s, i in itertools.product(PROMPTS.items(), MIN_SCORES, MIN_IOUS):
        out[f"{p} score>={s:g} iou>={i:g}"] = PropagationSettings(prompt_mode=mode, iou_threshold=i, min_score=s)
    return out


def _distance_from_today(name: str) -> tuple[int, int, int]:
    p, s, i = name.split(" ")
    return (p != TODAY[0], float(s.split(">=")[1]) != TODAY[1], float(i.split(">=")[1]) != TODAY[2])


def score_table(df: pd.DataFrame) -> pd.Series:
    """Candidate -> mean over volumes of (mean over objects and conditions of the 3D Dice)."""
    per_volume = df.groupby(["candidate", "volume"])["dice"].mean()
    return per_volume.groupby("candidate").mean()


def best(scores: pd.Series) -> str:
    """The best candidate; within ``TIE`` of the best, the one nearest to today's default."""
    top = scores.max()
    near = [c for c in scores.index if scores[c] >= top - TIE]
    return min(near, key=lambda c: (_distance_from_today(c), -scores[c]))


def choose(df: pd.DataFrame) -> tuple[str, pd.DataFrame]:
    """The rule: the overall choice (if it beats today's) and the leave-one-volume-out rows."""
    rows = []
    for held in sorted(df.volume.unique()):
        train = df[df.volume != held]
        pick = best(score_table(train))
        test = df[(df.volume == held) & (df.candidate == pick)]
        rows.append({"left out": held, "chosen on the others": pick,
                     **{f"Dice {c}": test[test.condition == c].dice.mean() for c in sorted(df.condition.unique())}})
    scores = score_table(df)
    today = [c for c in scores.index if not any(_distance_from_today(c))][0]
    pick = best(scores)
    if scores[pick] <= scores[today]:
        pick = today
    return pick, pd.DataFrame(rows)


def markdown(df: pd.DataFrame, index: bool = True) -> str:
    """A DataFrame as a markdown table, floats with 3 decimals."""
    frame = df.reset_index() if index else df
    cols = [" / ".join(map(str, c)) if isinstance(c, tuple) else str(c) for c in frame.columns]
    cells = [[f"{v:.3f}" if isinstance(v, float) else str(v) for v in row] for row in frame.itertuples(index=False)]
    return "\n".join(["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)] + ["| " + " | ".join(r) + " |" for r in cells])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--model", default="litemedsam")
    ap.add_argument("--level", default="LQ-3+")
    ap.add_argument("--cache", default="runs/prop-cache")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import torch

    from training.evaluation.dataset import discover
    from training.evaluation.runner import Embedder, EvalConfig, load_model_handle, parse_conditions, volume_key
    from training.evaluation.volume_modes import (
        _degrade_volume,
        _LazySliceEmbeddings,
        _volume_objects,
        propagate_masks,
    )

    torch.set_num_threads(1)
    handle = load_model_handle(args.model)
    embedder = Embedder(args.cache)
    cfg = EvalConfig(seed=args.seed)
    volumes = [d for d in discover(args.data) if d.kind == "3d"]
    conditions = parse_conditions(args.level, None, clean=True)
    cands = candidates()
    rows = []
    for vol in volumes:
        image, labels = vol.load_volume()
        key = volume_key(vol)
        objects = _volume_objects(labels, key, cfg)
        for cond in conditions:
            degraded, _ = _degrade_volume(cond, image, vol.modality, key, cfg.seed)
            embeddings = _LazySliceEmbeddings(embedder, handle, degraded)
            for z in range(degraded.shape[0]):
                embeddings.get(z)
            for obj in objects:
                for name, settings in cands.items():
                    steps, _, zc = propagate_masks(handle, embeddings, obj.mask, 0, settings)
                    pred, gt = steps[0], obj.mask
                    inter = int((pred & gt).sum())
                    dice = 2 * inter / max(1, int(pred.sum()) + int(gt.sum()))
                    zs = np.nonzero(pred.reshape(pred.shape[0], -1).any(axis=1))[0]
                    rows.append({"candidate": name, "volume": vol.name, "condition": cond.name,
                                 "object": obj.object_id, "dice": round(dice, 4), "pred_px": int(pred.sum()),
                                 "true_px": int(gt.sum()), "seed_slice": zc,
                                 "pred_slices": f"{zs[0]}-{zs[-1]}" if zs.size else "",
                                 "true_slices": "{}-{}".format(*np.nonzero(gt.any(axis=(1, 2)))[0][[0, -1]])})
            print(f"{vol.name} {cond.name}: {len(objects)} object(s) x {len(cands)} candidates", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame(rows)
    df.to_csv(out / "candidates.csv", index=False)
    pick, lovo = choose(df)
    scores = score_table(df).sort_values(ascending=False)
    per = df.groupby(["candidate", "volume", "condition"]).dice.mean().unstack(["volume", "condition"])
    with open(out / "choice.md", "w", encoding="utf-8") as fh:
        fh.write(f"# Propagation candidates: the rule's choice\n\nChosen default: **{pick}**\n\n")
        fh.write("## Leave one volume out\n\n" + markdown(lovo, index=False) + "\n\n")
        fh.write("## Score of every candidate (all volumes)\n\n"
                 + markdown(scores.to_frame("score")) + "\n\n")
        fh.write("## 3D Dice per candidate, volume and condition\n\n" + markdown(per) + "\n")
    print((out / "choice.md").read_text())


if __name__ == "__main__":
    main()
