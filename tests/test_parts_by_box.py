"""benchmarks/parts_by_box.py: one box around a multi-part label against a box per part, their masks united."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from benchmark_loading import load_benchmark  # tests/ is on sys.path under pytest

parts_by_box = load_benchmark("parts_by_box")


class BoxFillPredictor:
    """A stand-in model whose mask for a box is the box's whole interior (what LiteMedSAM does for a box around
    several lesions: it takes in everything between them)."""

    def __init__(self, shape):
        self.shape = shape
        self.calls = []

    def predict(self, boxes, embedding=None, **_):
        self.calls.append(np.asarray(boxes).copy())
        masks = []
        for x0, y0, x1, y1 in np.asarray(boxes, dtype=float):
            m = np.zeros(self.shape, bool)
            m[int(y0):int(np.ceil(y1)), int(x0):int(np.ceil(x1))] = True
            masks.append(m)
        return SimpleNamespace(masks=np.stack(masks), scores=np.ones(len(masks)))


def two_squares_and_a_speck():
    label = np.zeros((64, 64), bool)
    label[5:15, 5:15] = True  # 100 px
    label[40:50, 40:50] = True  # 100 px
    label[60, 2] = True  # 1 px: below --min-part-px
    return label


def test_parts_are_the_connected_parts_above_the_size_floor_largest_first():
    label = two_squares_and_a_speck()
    label[5:15, 30:33] = True  # a third part of 30 px
    parts, n_all = parts_by_box.label_parts(label, min_part_px=20)
    assert n_all == 4
    assert [int(p.sum()) for p in parts] == [100, 100, 30]
    assert not any(p[60, 2] for p in parts)


def test_a_box_per_part_beats_one_box_around_separate_parts():
    label = two_squares_and_a_speck()
    handle = SimpleNamespace(predictor=BoxFillPredictor(label.shape))
    row = parts_by_box.label_row(handle, emb=None, label_mask=label, min_part_px=20, focus=None, embed_crop=None)
    assert row["parts_all"] == 3 and row["parts_boxed"] == 2 and row["label_px"] == 201
    # one box fills the whole span of the label, the speck included (x 2..49, y 5..60: 48 x 56 px, all 201 label
    # pixels inside); the parts' boxes are the squares themselves
    assert row["dice_one_box"] == pytest.approx(2 * 201 / (201 + 48 * 56), abs=1e-6)
    assert row["dice_box_per_part"] == pytest.approx(2 * 200 / 401, abs=1e-6)
    # each part is decoded as its own object (one box per object in one call), after the one-box decode
    assert [c.shape for c in handle.predictor.calls] == [(1, 4), (2, 4)]


def test_a_label_without_a_part_above_the_floor_gets_an_empty_union():
    label = np.zeros((32, 32), bool)
    label[3, 3] = label[20, 20] = True
    handle = SimpleNamespace(predictor=BoxFillPredictor(label.shape))
    row = parts_by_box.label_row(handle, emb=None, label_mask=label, min_part_px=5, focus=None, embed_crop=None)
    assert row["parts_boxed"] == 0 and row["dice_box_per_part"] == 0.0


def test_summary_means_per_model_dataset_and_condition():
    import pandas as pd

    df = pd.DataFrame([
        {"model": "m", "dataset": "d", "condition": "clean", "label": 1, "parts_boxed": 2,
         "dice_one_box": 0.1, "dice_box_per_part": 0.8},
        {"model": "m", "dataset": "d", "condition": "clean", "label": 1, "parts_boxed": 4,
         "dice_one_box": 0.3, "dice_box_per_part": 0.6},
    ])
    s = parts_by_box.summary(df).loc[("m", "d", "clean")]
    assert s["labels"] == 2 and s["parts_boxed"] == 3.0
    assert s["dice_one_box"] == pytest.approx(0.2) and s["dice_box_per_part"] == pytest.approx(0.7)


def test_the_command_refuses_a_part_floor_below_one(tmp_path):
    with pytest.raises(SystemExit):
        parts_by_box.main(["--data", str(tmp_path), "--out", str(tmp_path / "o"), "--min-part-px", "0"])
