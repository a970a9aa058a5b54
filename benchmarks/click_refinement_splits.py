"""Lay out the evaluation splits the click-path rules use, as folders of links that ``training.evaluate --data`` reads.

``<out>/heldout``: the 58 held-out images of docs/results/training-lite/split.json; ``<out>/validation``: the 23
validation images that training held back from its 231 training images (``split_items(..., 0.1, seed=0)``, the
split behind docs/results/click-guard's validation rows); ``<out>/train``: the other 208.

    python benchmarks/click_refinement_splits.py --data ../shared/data/medseg --out runs/splits
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

SPLIT_JSON = Path(__file__).resolve().parents[1] / "docs" / "results" / "training-lite" / "split.json"


def link_samples(samples, dst_root: Path, data: Path) -> None:
    for s in samples:
        for kind, src in (("images", s.image_path), ("masks", s.mask_path)):
            dst = dst_root / s.dataset / kind / src.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            if not dst.exists():
                os.symlink(src.resolve(), dst)
    if (data / "MANIFEST.json").is_file():
        dst_root.mkdir(parents=True, exist_ok=True)
        shutil.copy(data / "MANIFEST.json", dst_root / "MANIFEST.json")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/data/medseg")
    p.add_argument("--out", default="runs/splits")
    args = p.parse_args()
    from training.evaluation.dataset import discover
    from training.finetune import split_items
    from training.finetune.data import items_from_folder

    data, out = Path(args.data), Path(args.out)
    split = json.loads(SPLIT_JSON.read_text())
    samples = {s.key: s for info in discover(data) for s in info.samples}
    train = [samples[k] for k in split["train"]]
    link_samples([samples[k] for k in split["heldout"]], out / "heldout", data)
    link_samples(train, out / "all-train", data)
    items = items_from_folder(out / "all-train", min_object_px=20)
    _, val = split_items(items, 0.1, seed=0)
    val_keys = {it.key for it in val}  # 2D items: "<dataset>/<image stem>", the samples' keys
    val_samples = [s for s in train if s.key in val_keys]
    link_samples(val_samples, out / "validation", data)
    link_samples([s for s in train if s not in val_samples], out / "train", data)
    print(f"heldout {len(split['heldout'])}, validation {len(val_samples)} (of {len(val_keys)} items), "
          f"train {len(train) - len(val_samples)}")


if __name__ == "__main__":
    main()
