"""A box per part against one box around the whole label, for targets made of separate parts.

    python benchmarks/parts_by_box.py --data runs/splits/heldout --datasets dc1000_dental_caries_xray \
        --model litemedsam --model robust-lite --levels LQ-3 --cache runs/refiner-cache --out runs/parts-by-box

Some targets are one label made of many separate parts: the carious lesions of a dental X-ray, the fragments of a
vessel tree. The evaluation treats each label as one object, so its box start is one tight box around all the
parts, which takes in whole teeth. A user can instead draw a box around each part and commit each into the same
label value (the Annotate tab's Label row). This measures both, for every label of every image, clean and at the
given levels:

- ``one box``: the tight box around the whole label, decoded as the evaluation's ``box`` prompt;
- ``box per part``: a tight box around each connected part of at least ``--min-part-px`` pixels, each decoded on
  its own as a separate object, their masks united.

Both use each model's own *Zoom on small objects* default (``--focus-crop on|off`` overrides it), the evaluation's
degradations and seeds, and the Dice against the whole label. Writes ``rows.csv`` (one row per label, condition and
model: both Dice values, the parts boxed and the label's parts in all) and prints the mean per dataset.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from napari_robustmedsam.annotation.prompt_decoding import zoom_default  # noqa: E402
from napari_robustmedsam.engine.focus_crop import DEFAULT_FOCUS_CROP  # noqa: E402
from napari_robustmedsam.io.atomic import atomic_write_path  # noqa: E402
from napari_robustmedsam.metrics import dice  # noqa: E402
from napari_robustmedsam.prompting import tight_box  # noqa: E402
from training.evaluation.dataset import discover, select_samples  # noqa: E402
from training.evaluation.runner import (  # noqa: E402
    Embedder,
    crop_embedder,
    decode_small_boxes_in_crops,
    load_model_handle,
    parse_conditions,
    set_threads,
)


def label_parts(mask: np.ndarray, min_part_px: int) -> tuple[list[np.ndarray], int]:
    """The connected parts of ``mask`` with at least ``min_part_px`` pixels (largest first), and how many parts it
    has in all (4-connected, as the evaluation's ``--objects components``)."""
    comps, n = ndimage.label(mask)
    sizes = np.bincount(comps.ravel(), minlength=n + 1)[1:]
    order = [int(k) + 1 for k in np.argsort(-sizes, kind="stable") if sizes[k] >= min_part_px]
    return [comps == k for k in order], n


def decode_boxes(handle, emb, boxes: np.ndarray, focus, embed_crop) -> list[np.ndarray]:
    """One mask per box, each box a separate object, small boxes in their focus crop (``focus`` None: none)."""
    pred = handle.predictor.predict(boxes=boxes, embedding=emb)
    masks, scores = list(pred.masks), [float(v) for v in pred.scores]
    if focus is not None:
        decode_small_boxes_in_crops(handle.predictor, emb, boxes, masks, scores, focus, embed_crop)
    return [np.asarray(m, dtype=bool) for m in masks]


def label_row(handle, emb, label_mask: np.ndarray, min_part_px: int, focus, embed_crop) -> dict:
    """Both strategies on one label: their Dice against it, the parts boxed and the parts in all."""
    one = decode_boxes(handle, emb, tight_box(label_mask)[None], focus, embed_crop)[0]
    parts, n_all = label_parts(label_mask, min_part_px)
    union = np.zeros_like(label_mask, dtype=bool)
    if parts:
        for m in decode_boxes(handle, emb, np.stack([tight_box(p) for p in parts]), focus, embed_crop):
            union |= m
    return {"label_px": int(label_mask.sum()), "parts_all": n_all, "parts_boxed": len(parts),
            "dice_one_box": dice(one, label_mask), "dice_box_per_part": dice(union, label_mask)}


def run(args) -> pd.DataFrame:
    set_threads(args.threads)
    samples = select_samples(discover(args.data), args.images_per_dataset, args.seed,
                             args.datasets.split(",") if args.datasets else None)
    conditions = parse_conditions(args.levels, None)
    handles = [load_model_handle(m) for m in args.model]
    embedder = Embedder(args.cache)
    rows = []
    for sample in samples:
        image, labels = sample.load()
        for cond in conditions:
            degraded, _ = cond.apply(image, sample.modality, sample.key, args.seed)
            for h in handles:
                on = zoom_default(getattr(h.loaded, "name", None)) if args.focus_crop == "model" \
                    else args.focus_crop == "on"
                focus = DEFAULT_FOCUS_CROP if on else None
                emb, embed_crop = embedder.embed(h, degraded), crop_embedder(embedder, h, degraded)
                for v in np.unique(labels):
                    label_mask = labels == v
                    if v == 0 or np.count_nonzero(label_mask) < args.min_part_px:
                        continue
                    row = label_row(h, emb, label_mask, args.min_part_px, focus, embed_crop)
                    row.update(model=h.label, dataset=sample.dataset, image_id=sample.image_id,
                               label=int(v), condition=cond.name, zoom=on)
                    rows.append(row)
            print(f"{sample.key} {cond.name}: done", flush=True)
    return pd.DataFrame(rows)


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """Mean Dice of both strategies and the mean number of boxes, per model, dataset and condition."""
    return (df.groupby(["model", "dataset", "condition"])
              .agg(labels=("label", "size"), parts_boxed=("parts_boxed", "mean"),
                   dice_one_box=("dice_one_box", "mean"), dice_box_per_part=("dice_box_per_part", "mean"))
              .round(3))


def main(argv: list[str] | None = None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="datasets folder (<dataset>/images + masks)")
    ap.add_argument("--datasets", help="comma-separated dataset names (default: all)")
    ap.add_argument("--model", action="append", default=None, help="registry name or LABEL=SPEC (repeatable)")
    ap.add_argument("--levels", default="LQ-3", help="degradation levels besides clean (default LQ-3)")
    ap.add_argument("--min-part-px", type=int, default=20, help="smallest part boxed (default 20, as the evaluation)")
    ap.add_argument("--focus-crop", choices=("model", "on", "off"), default="model",
                    help="Zoom on small objects: each model's default (default), on or off")
    ap.add_argument("--images-per-dataset", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--cache", default=None, help="embedding cache folder")
    ap.add_argument("--out", required=True, help="output folder (rows.csv)")
    args = ap.parse_args(argv)
    args.model = args.model or ["litemedsam"]
    if args.min_part_px < 1:
        ap.error("--min-part-px must be at least 1")
    df = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write_path(out / "rows.csv") as tmp:
        df.to_csv(tmp, index=False)
    if not df.empty:
        print(summary(df).to_string())
    return df


if __name__ == "__main__":
    main()
