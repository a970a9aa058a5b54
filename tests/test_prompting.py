"""Seeded prompt simulation: boxes, random points, corrective clicks."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from napari_robustmedsam.prompting import (
    corrective_click,
    derive_seed,
    error_regions,
    jittered_box,
    micro_sam_corrective_clicks,
    random_positive_points,
    rng_for,
    tight_box,
)


def blob() -> np.ndarray:
    m = np.zeros((20, 30), bool)
    m[4:12, 5:20] = True
    return m


def test_tight_box_has_exclusive_upper_corner():
    assert tight_box(blob()).tolist() == [5, 4, 20, 12]
    one = np.zeros((5, 5), bool)
    one[2, 3] = True
    assert tight_box(one).tolist() == [3, 2, 4, 3]
    with pytest.raises(ValueError):
        tight_box(np.zeros((3, 3), bool))


def test_derive_seed_is_stable_and_distinct():
    assert derive_seed(0, "a/b", "label1") == derive_seed(0, "a/b", "label1")
    assert derive_seed(0, "a/b", "label1") != derive_seed(1, "a/b", "label1")
    assert derive_seed(0, "a/b", "label1") != derive_seed(0, "a/b", "label2")
    # fixed value: must not depend on PYTHONHASHSEED or the platform
    code = "from napari_robustmedsam.prompting import derive_seed; print(derive_seed(0, 'x', 1))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": "123", "PATH": ""}).stdout.strip()
    assert int(other) == derive_seed(0, "x", 1)


def test_random_points_are_inside_seeded_and_distinct():
    m = blob()
    pts = random_positive_points(m, 5, rng_for(0, "img", "obj"))
    assert pts.shape == (5, 2)
    assert all(m[int(y), int(x)] for x, y in pts)  # (x, y) order
    assert len({tuple(p) for p in pts}) == 5  # without replacement
    again = random_positive_points(m, 5, rng_for(0, "img", "obj"))
    assert np.array_equal(pts, again)
    assert not np.array_equal(pts, random_positive_points(m, 5, rng_for(1, "img", "obj")))
    tiny = np.zeros((4, 4), bool)
    tiny[1, 1] = True
    assert random_positive_points(tiny, 3, rng_for(0)).tolist() == [[1, 1]] * 3  # with replacement


def test_jittered_box_moves_sides_within_bounds():
    m = blob()
    tight = tight_box(m)
    w, h = tight[2] - tight[0], tight[3] - tight[1]
    boxes = np.stack([jittered_box(m, rng_for(0, i), 0.2) for i in range(50)])
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    assert (boxes[:, [0, 1]] >= 0).all() and (boxes[:, 2] <= 30).all() and (boxes[:, 3] <= 20).all()
    assert (np.abs(boxes[:, 0] - tight[0]) <= 0.2 * w + 0.5).all()
    assert (np.abs(boxes[:, 3] - tight[3]) <= 0.2 * h + 0.5).all()
    assert (boxes != tight).any(axis=1).mean() > 0.5  # actually jittered, both inwards and outwards
    assert (boxes[:, 0] < tight[0]).any() and (boxes[:, 0] > tight[0]).any()
    assert np.array_equal(jittered_box(m, rng_for(3), 0.2), jittered_box(m, rng_for(3), 0.2))


def test_corrective_click_positive_in_missed_region_center():
    gt = blob()
    pred = gt.copy()
    pred[4:12, 12:20] = False  # the right part (8 x 8) is missed
    fn, fp = error_regions(gt, pred)
    assert fn.sum() == 64 and fp.sum() == 0
    click = corrective_click(gt, pred)
    assert click.label == 1 and click.region_px == 64
    assert fn[int(click.y), int(click.x)]
    # the centre of the 8 x 8 region (rows 4..11, cols 12..19): 4 equally deep pixels at rows 7/8, cols 15/16
    assert (click.y, click.x) in {(7, 15), (7, 16), (8, 15), (8, 16)}


def test_corrective_click_negative_for_larger_false_positive():
    gt = blob()
    pred = gt.copy()
    pred[14:20, 0:30] = True  # 180 px false positive band below
    pred[4, 5] = False  # 1 px false negative
    click = corrective_click(gt, pred)
    assert click.label == 0 and click.region_px == 180
    assert pred[int(click.y), int(click.x)] and not gt[int(click.y), int(click.x)]


def test_corrective_click_none_when_perfect_and_random_strategy_seeded():
    gt = blob()
    assert corrective_click(gt, gt) is None
    pred = np.zeros_like(gt)
    a = corrective_click(gt, pred, "random", rng_for(0, "s"))
    b = corrective_click(gt, pred, "random", rng_for(0, "s"))
    assert a == b and a.label == 1 and gt[int(a.y), int(a.x)]
    with pytest.raises(ValueError):
        corrective_click(gt, pred, "random")
    with pytest.raises(ValueError):
        corrective_click(gt, pred, "nearest")


def test_micro_sam_clicks_seeded_and_global_state_untouched():
    gt = blob()
    pred = np.zeros_like(gt)
    pred[0:3, 0:10] = True  # false positives above, the whole object missed
    np.random.seed(7)
    before = np.random.get_state()[1].copy()
    pts, labels = micro_sam_corrective_clicks(gt, pred, seed=5)
    assert np.array_equal(np.random.get_state()[1], before)
    assert labels.tolist() == [1, 0]
    (x1, y1), (x0, y0) = pts
    assert gt[int(y1), int(x1)] and pred[int(y0), int(x0)] and not gt[int(y0), int(x0)]
    pts2, _ = micro_sam_corrective_clicks(gt, pred, seed=5)
    assert np.array_equal(pts, pts2)
