"""The embedded LiteMedSAM on real images: box prompts from the ground truth must give good masks.

The floors were measured on this selection (see the closing note of the foundation issue) and sit a
little below the measured values: a wrong preprocessing or a wrong box frame drops them far below.
"""

from __future__ import annotations

import numpy as np
import pytest

from napari_robustmedsam.engine.predictor import Predictor
from napari_robustmedsam.io import read_image

DATASETS = (
    "acdc_cardiac_mri",
    "dc1000_dental_caries_xray",
    "drive_fundus_vessels",
    "dsb2018_nuclei",
    "hc18_fetal_head_us",
    "ph2_dermoscopy",
)
IMAGES_PER_DATASET = 2


def tight_box(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float64)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    denom = a.sum() + b.sum()
    return 1.0 if denom == 0 else 2.0 * np.logical_and(a, b).sum() / denom


def _objects(label_map: np.ndarray, limit: int = 3):
    values = [v for v in np.unique(label_map) if v != 0]
    masks = [label_map == v for v in values]
    masks = [m for m in masks if m.sum() >= 20]
    return masks[:limit]


@pytest.fixture(scope="module")
def box_dice(shared_data, litemedsam):
    predictor = Predictor.from_loaded(litemedsam)
    results: dict[str, list[float]] = {}
    for name in DATASETS:
        images = sorted((shared_data / "medseg" / name / "images").glob("*.png"))[:IMAGES_PER_DATASET]
        for path in images:
            image = read_image(path)
            labels = read_image(path.parent.parent / "masks" / path.name)
            objects = _objects(labels)
            predictor.set_image(image)
            boxes = np.stack([tight_box(m) for m in objects])
            prediction = predictor.predict(boxes=boxes)  # all objects of the image in one call
            assert prediction.masks.shape == (len(objects), *labels.shape)
            results.setdefault(name, []).extend(dice(p, g) for p, g in zip(prediction.masks, objects))
    return {k: float(np.mean(v)) for k, v in results.items()}


def test_box_prompts_on_real_images_reach_measured_floor(box_dice):
    print({k: round(v, 3) for k, v in box_dice.items()})
    mean = float(np.mean(list(box_dice.values())))
    assert mean >= MEAN_FLOOR, box_dice
    # Large single structures are easy for LiteMedSAM with a tight box.
    assert box_dice["hc18_fetal_head_us"] >= 0.85
    assert box_dice["ph2_dermoscopy"] >= 0.85


MEAN_FLOOR = 0.55  # measured 0.588 on this selection (2026-11-21, CPU fp32)
