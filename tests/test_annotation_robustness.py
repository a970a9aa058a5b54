"""Segment-on-degraded and the robustness sweep (no Qt), with a stand-in model that thresholds the image
inside the box: noise that crosses the threshold changes the mask, so Dice drops with the severity."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from napari_robustmedsam.annotation.slice_embeddings import Cancelled
from napari_robustmedsam.annotation.robustness import (
    SweepTable,
    robustness_sweep,
    segment_on_degraded,
    sweep_levels,
    sweep_types,
)
from napari_robustmedsam.annotation.session import SlicePrompts
from napari_robustmedsam.errors import UserFacingError


class ThresholdModel:
    """compute_embedding keeps the image; predict = (image > midpoint) inside the box."""

    def compute_embedding(self, image):
        arr = np.asarray(image, dtype=np.float64)
        return SimpleNamespace(image=arr, frame=SimpleNamespace(original_size=arr.shape[:2]))

    def predict(self, points=None, point_labels=None, boxes=None, mask_input=None, multimask_output=None,
                embedding=None):
        img = embedding.image
        mask = np.zeros(img.shape, bool)
        x0, y0, x1, y1 = (int(v) for v in boxes)
        inside = img[y0:y1, x0:x1]
        mask[y0:y1, x0:x1] = inside > (img.min() + img.max()) / 2
        return SimpleNamespace(masks=mask[None], scores=np.array([0.9]), low_res_logits=np.zeros((1, 1, 4, 4)))


@pytest.fixture
def case():
    image = np.full((64, 64), 40, np.uint8)
    image[20:44, 16:48] = 200
    prompts = SlicePrompts(box=[12, 16, 52, 48])
    return image, prompts


def test_segment_on_degraded_compares_clean_and_degraded_masks(case):
    image, prompts = case
    mild = segment_on_degraded(ThresholdModel(), image, prompts, "gaussian_noise", severity=0.05, seed=0)
    strong = segment_on_degraded(ThresholdModel(), image, prompts, "salt_pepper", level="LQ-3", seed=0)
    assert mild.clean_mask.sum() == 24 * 32
    assert mild.degraded_image.shape == image.shape and mild.degraded_image.dtype == image.dtype
    assert mild.dice > 0.99
    assert strong.dice < mild.dice
    assert "salt_pepper LQ-3" in strong.setting
    with pytest.raises(UserFacingError):
        segment_on_degraded(ThresholdModel(), image, SlicePrompts(), "gaussian_noise")


def test_sweep_table(case, tmp_path):
    image, prompts = case
    seen = []
    table = robustness_sweep(ThresholdModel(), image, prompts, types=["gaussian_noise", "salt_pepper"],
                             levels=["LQ-1", "LQ-3"], seed=0, progress=lambda d, t, m: seen.append((d, t)))
    assert seen[-1] == (4, 4)
    m = table.matrix()
    assert m.shape == (2, 2) and np.isfinite(m).all()
    assert m[1, 1] <= m[1, 0]  # stronger salt & pepper, lower Dice
    assert table.worst(1)[0]["dice"] == m.min()
    assert "| salt_pepper |" in table.to_markdown()
    assert table.save(tmp_path / "t.csv").read_text().splitlines()[0].startswith("type,level,dice,iou")
    assert table.save(tmp_path / "t.json").read_text().startswith("{")
    assert table.plot_png()[:4] == b"\x89PNG"
    assert set(table.mean_by_level()) == {"LQ-1", "LQ-3"}


def test_sweep_cancel_and_levels(case):
    image, prompts = case
    with pytest.raises(Cancelled):
        robustness_sweep(ThresholdModel(), image, prompts, types=["gaussian_noise"], levels=["LQ-1"],
                         is_cancelled=lambda: True)
    with pytest.raises(UserFacingError):
        robustness_sweep(ThresholdModel(), image, prompts, types=["gaussian_noise"], levels=["LQ-3+"])
    assert "rician_noise" in sweep_types("mri") and "gaussian_noise" in sweep_types("mri")
    assert sweep_levels("mri")[-1] == "LQ-3+" and sweep_levels(None) == ["LQ-1", "LQ-2", "LQ-3"]
    assert isinstance(SweepTable(["a"], ["LQ-1"]).matrix(), np.ndarray)
