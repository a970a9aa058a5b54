"""Metric functions against hand-computed cases (empty masks, identical masks, one-pixel shifts)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from napari_robustmedsam.metrics import dice, hd95, iou, nsd, segmentation_metrics, surface, surface_distances


def square(shape=(12, 12), r0=2, c0=2, size=5) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[r0 : r0 + size, c0 : c0 + size] = True
    return m


def test_identical_masks_are_perfect():
    g = square()
    assert dice(g, g) == 1.0
    assert iou(g, g) == 1.0
    assert nsd(g, g) == 1.0
    assert hd95(g, g) == 0.0


def test_both_empty_convention():
    e = np.zeros((8, 9), bool)
    assert dice(e, e) == 1.0 and iou(e, e) == 1.0 and nsd(e, e) == 1.0 and hd95(e, e) == 0.0
    assert segmentation_metrics(e, e) == {"dice": 1.0, "iou": 1.0, "nsd": 1.0, "hd95": 0.0}


@pytest.mark.parametrize("swap", [False, True])
def test_one_empty_convention(swap):
    e, g = np.zeros((6, 8), bool), square((6, 8), 1, 1, 3)
    p, t = (g, e) if swap else (e, g)
    assert dice(p, t) == 0.0 and iou(p, t) == 0.0 and nsd(p, t) == 0.0
    assert hd95(p, t) == pytest.approx(10.0)  # diagonal of a 6 x 8 image
    assert hd95(p, t, spacing=(2.0, 0.5)) == pytest.approx(math.hypot(12, 4))
    assert math.isnan(hd95(p, t, empty_distance=float("nan")))
    assert segmentation_metrics(p, t)["hd95"] == pytest.approx(10.0)


def test_surface_of_a_square_is_its_perimeter():
    s = surface(square())
    assert s.sum() == 16  # 5 x 5 square: 25 - 9 interior pixels
    assert not s[3:6, 3:6].any()
    edge = np.zeros((4, 4), bool)
    edge[:2, :] = True  # touches the image edge: the edge counts as background
    assert surface(edge).sum() == 8


def test_one_pixel_shift_by_hand():
    # 5 x 5 square shifted right by one pixel.
    g, p = square(), square(c0=3)
    assert dice(p, g) == pytest.approx(2 * 20 / 50)
    assert iou(p, g) == pytest.approx(20 / 30)
    # 8 of the 16 surface pixels of each coincide with the other's surface (top and bottom rows,
    # 4 each); the other 8 are exactly 1 px away.
    d_pg, d_gp = surface_distances(p, g)
    assert sorted(d_pg.tolist()) == [0.0] * 8 + [1.0] * 8
    assert sorted(d_gp.tolist()) == [0.0] * 8 + [1.0] * 8
    assert nsd(p, g, tolerance_px=0.5) == pytest.approx(16 / 32)
    assert nsd(p, g, tolerance_px=1.0) == 1.0
    assert nsd(p, g, tolerance_px=2.0) == 1.0
    assert hd95(p, g) == pytest.approx(1.0)


def test_three_pixel_shift_nsd_at_2px():
    # Shift by 3: the left/right sides are 3 px from each other, the top/bottom rows overlap partially.
    g, p = square((12, 16), 2, 2, 5), square((12, 16), 2, 5, 5)
    d_pg, d_gp = surface_distances(p, g)
    within = int((d_pg <= 2).sum() + (d_gp <= 2).sum())
    assert nsd(p, g, tolerance_px=2.0) == pytest.approx(within / (d_pg.size + d_gp.size))
    # P's right column (5 px) and its top/bottom pixels at cols 8, 9 are 3 px or more from G's surface:
    # P surface = 16 px, of which the right column (col 9: rows 2..6, 5 px) is 3 px away; col 8 top/bottom are 2 px.
    assert int((d_pg > 2).sum()) == 5
    assert nsd(p, g, tolerance_px=2.0) == pytest.approx((11 + 11) / 32)
    assert hd95(p, g) == pytest.approx(3.0)


def test_spacing_scales_distances():
    g = np.zeros((3, 8), bool)
    p = np.zeros((3, 8), bool)
    g[1, 1], p[1, 4] = True, True  # single pixels, 3 columns apart
    assert hd95(p, g) == pytest.approx(3.0)
    assert hd95(p, g, spacing=(1.0, 0.5)) == pytest.approx(1.5)
    assert nsd(p, g, tolerance_px=2.0) == 0.0
    assert nsd(p, g, tolerance_px=2.0, spacing=(1.0, 0.5)) == 1.0


def test_3d_masks():
    g = np.zeros((6, 8, 8), bool)
    g[1:5, 2:6, 2:6] = True
    p = np.roll(g, 1, axis=0)
    assert dice(p, g) == pytest.approx(2 * 48 / 128)
    assert nsd(p, g, tolerance_px=1.0) == 1.0
    assert hd95(p, g) == pytest.approx(1.0)


def test_crop_does_not_change_distances():
    rng = np.random.default_rng(0)
    g = np.zeros((64, 64), bool)
    g[10:40, 12:30] = True
    p = g.copy()
    p[rng.random(p.shape) < 0.05] ^= True
    # reference: the same computation on a padded canvas (no cropping effects possible)
    big_p, big_g = np.pad(p, 20), np.pad(g, 20)
    assert nsd(p, g) == pytest.approx(nsd(big_p, big_g))
    assert hd95(p, g) == pytest.approx(hd95(big_p, big_g))


def test_shape_mismatch_raises():
    with pytest.raises(ValueError):
        dice(np.zeros((3, 3)), np.zeros((3, 4)))
