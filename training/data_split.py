"""The seeded train / held-out split of a medseg-layout data folder, shared by the benchmarks and the recipe that
builds the shipped heads (``python -m training.ship_heads``).

Use: ``make_split(Path("../shared/data/medseg"), Path("runs/x"), heldout=0.2, seed=0)`` writes ``runs/x/split.json``
and two folders of symlinks, ``runs/x/split/train`` and ``runs/x/split/heldout``, in the medseg layout (with the
data's MANIFEST.json), so every command that reads a data folder reads either part. Per dataset, a seeded
``heldout`` share of the images (at least one) is held out; the same seed gives the same split on every machine.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path


def make_split(data: Path, out: Path, heldout: float, seed: int, train_per_dataset: int | None = None) -> dict:
    """{"train": [keys], "heldout": [keys]}; ``train_per_dataset`` keeps a seeded subset of each dataset's train
    part (a smaller CPU budget), the held-out part stays the same."""
    from napari_robustmedsam.prompting import rng_for
    from training.evaluation.dataset import discover

    split = {"train": [], "heldout": []}
    for info in discover(data):
        samples = sorted(info.samples, key=lambda s: s.key)
        n_held = max(1, int(round(len(samples) * heldout)))
        order = rng_for(seed, "bench-split", info.name).permutation(len(samples))
        held = {samples[i].key for i in order[:n_held]}
        train_keys = [samples[i].key for i in order[n_held:]]
        if train_per_dataset:
            train_keys = train_keys[:train_per_dataset]
        for s in samples:
            part = "heldout" if s.key in held else ("train" if s.key in train_keys else None)
            if part is None:
                continue
            split[part].append(s.key)
            for kind, src in (("images", s.image_path), ("masks", s.mask_path)):
                dst = out / "split" / part / info.name / kind / src.name
                dst.parent.mkdir(parents=True, exist_ok=True)
                if not dst.exists():
                    os.symlink(src.resolve(), dst)
    for part in ("train", "heldout"):
        if (data / "MANIFEST.json").is_file():
            (out / "split" / part).mkdir(parents=True, exist_ok=True)
            shutil.copy(data / "MANIFEST.json", out / "split" / part / "MANIFEST.json")
    (out / "split.json").write_text(json.dumps(split, indent=1))
    return split
