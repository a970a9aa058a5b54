"""How much Dice the 256 x 256 decoder output itself allows, per dataset (LiteMedSAM's frame).

Why: the mask decoder predicts 256 x 256 low-resolution logits that are upsampled to the image. Thin vessels or
small lesions could be out of reach at that resolution whatever the decoder learns, and the evaluation's
targets (Dice >= 0.80 after 5 clicks) would then be unreachable by construction. This script measures it: each
evaluated ground-truth object is area-averaged onto the low-resolution grid (a logit map that exists,
``ImageFrame.mask_to_low_res``), mapped back with the predictor's own upsampling
(``ImageFrame.logits_to_original``), and scored against the original mask. The result is a lower bound on what the best 256 x 256 logit map could give.

    python benchmarks/mask_resolution_ceiling.py --data runs/bench-train-lite-45/split/heldout
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    import pandas as pd

    from napari_robustmedsam.engine.preprocessing import preprocess
    from napari_robustmedsam.metrics import dice
    from training.evaluation.dataset import discover, select_objects

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="folder in the medseg layout (e.g. the held-out split)")
    p.add_argument("--seed", type=int, default=0, help="object selection seed (the evaluation's default)")
    p.add_argument("--max-objects", type=int, default=3)
    args = p.parse_args(argv)

    rows = []
    for ds in discover(Path(args.data)):
        for sample in sorted(ds.samples, key=lambda s: s.key):
            image, labels = sample.load()
            _, frame = preprocess(image, "litemedsam")
            for obj in select_objects(labels, sample.key, args.seed, max_objects=args.max_objects):
                low = frame.mask_to_low_res(obj.mask, antialias=True)
                pred = frame.logits_to_original(low)[0, 0].numpy() > 0
                rows.append({"dataset": ds.name, "sample": sample.key, "object": obj.object_id,
                             "object_px": obj.size, "dice": dice(pred, obj.mask)})
    df = pd.DataFrame(rows)
    per = df.groupby("dataset")["dice"].agg(["count", "mean", "min"])
    print(per.round(3).to_string())
    print(f"mean over objects {df['dice'].mean():.3f}; mean over datasets {per['mean'].mean():.3f} "
          f"({len(df)} objects)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
