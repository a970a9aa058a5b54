"""3D propagation logic (no Qt, no model): a fake slice segmenter stands in for the decoder."""

from __future__ import annotations

import numpy as np
import pytest

from napari_robustmedsam.annotation.slice_embeddings import Cancelled
from napari_robustmedsam.annotation.propagation import derive_prompt, interior_points, propagate_object


def ball_volume(n=12, size=48, z_lo=3, z_hi=8):
    """A sphere-like object on slices z_lo..z_hi whose radius changes smoothly."""
    vol = np.zeros((n, size, size), bool)
    yy, xx = np.mgrid[:size, :size]
    for z in range(z_lo, z_hi + 1):
        r = 6 + 4 * np.sin(np.pi * (z - z_lo + 0.5) / (z_hi - z_lo + 1))
        vol[z] = (yy - 24) ** 2 + (xx - 24) ** 2 <= r**2
    return vol


def oracle(truth, calls=None):
    """Segment slice z as the truth inside the prompt box (empty box -> empty), like a good model."""

    def segment(z, box, points, labels, mask):
        if calls is not None:
            calls.append(z)
        out = np.zeros_like(truth[z])
        if box is not None:
            x0, y0, x1, y1 = (int(round(v)) for v in box)
            g = 3
            out[max(0, y0 - g): y1 + g, max(0, x0 - g): x1 + g] = truth[z][max(0, y0 - g): y1 + g, max(0, x0 - g): x1 + g]
        elif mask is not None:
            out = truth[z] & mask
        return out, None, 0.9

    return segment


def test_propagates_from_one_seed_and_stops_where_the_object_ends():
    truth = ball_volume()
    res = propagate_object(oracle(truth), truth.shape[0], {5: truth[5]}, iou_threshold=0.5, prompt_mode="box")
    np.testing.assert_array_equal(res.masks, truth)
    assert res.z_range == (3, 8)
    assert "empty" in res.stopped["down"] and "empty" in res.stopped["up"]
    assert res.propagated == [3, 4, 6, 7, 8]


def test_iou_threshold_stops_early():
    truth = ball_volume()
    strict = propagate_object(oracle(truth), truth.shape[0], {5: truth[5]}, iou_threshold=0.99, prompt_mode="box")
    assert strict.masks.sum() < truth.sum()
    assert "IoU" in strict.stopped["up"]


def test_end_marker_and_between_seeds():
    truth = ball_volume()
    seeds = {4: truth[4], 7: truth[7], 8: np.zeros_like(truth[8])}  # slice 8 marked as "object ends here"
    res = propagate_object(oracle(truth), truth.shape[0], seeds, iou_threshold=0.0, prompt_mode="box")
    assert not res.masks[8:].any(), "propagation went past the end marker"
    np.testing.assert_array_equal(res.masks[4:8], truth[4:8])  # filled between the seeds
    np.testing.assert_array_equal(res.masks[3], truth[3])


def test_repropagation_touches_only_stretches_next_to_the_changed_seed():
    truth = ball_volume(n=16, z_lo=2, z_hi=13)
    first = propagate_object(oracle(truth), 16, {4: truth[4], 10: truth[10]}, prompt_mode="box")
    calls: list[int] = []
    again = propagate_object(oracle(truth, calls), 16, {4: truth[4], 10: truth[10], 12: truth[12]},
                             existing=first.masks, changed_seeds=[12], prompt_mode="box")
    assert calls and min(calls) > 10, f"recomputed slices {sorted(set(calls))} outside the changed stretches"
    np.testing.assert_array_equal(again.masks[:11], first.masks[:11])


def test_cancel_raises_and_progress_is_reported():
    truth = ball_volume()
    seen = []
    with pytest.raises(Cancelled):
        propagate_object(oracle(truth), truth.shape[0], {5: truth[5]}, prompt_mode="box",
                         progress=lambda d, t: seen.append((d, t)), is_cancelled=lambda: len(seen) >= 2)
    assert seen[0][0] == 1 and seen[0][1] > 1


def test_derived_prompts():
    m = np.zeros((20, 30), bool)
    m[5:10, 8:20] = True
    p = derive_prompt(m, "box+points+mask", box_extension=0.5)
    assert p.box.tolist() == [2.0, 2.5, 26.0, 12.5]
    x, y = p.points[0]
    assert m[int(y), int(x)] and p.point_labels.tolist() == [1]
    assert p.mask is m
    assert interior_points(np.zeros((4, 4), bool)).shape == (0, 2)
    with pytest.raises(ValueError):
        derive_prompt(m, "lasso")


def test_logits_modes_prompt_each_slice_with_its_neighbours_logits():
    truth = ball_volume()
    seen = {}

    def segment(z, box, points, labels, mask, logits=None):
        seen[z] = (logits, points)
        return truth[z], f"logits{z}", 0.9

    propagate_object(segment, truth.shape[0], {5: truth[5]}, prompt_mode="box+points+logits",
                     seed_logits={5: "logits5"}, iou_threshold=0.0)
    assert seen[6][0] == "logits5" and seen[4][0] == "logits5"  # the seed's own logits
    assert seen[7][0] == "logits6" and seen[3][0] == "logits4"  # then each propagated slice's
    assert seen[6][1].shape == (1, 2)  # one positive point at the neighbour's interior
    seen.clear()
    propagate_object(segment, truth.shape[0], {5: truth[5]}, prompt_mode="box+logits", iou_threshold=0.0)
    assert seen[6][0] is None and seen[7][0] == "logits6"  # no seed logits: the seed's binary mask prompts


def test_min_score_stops_where_the_model_is_unsure_and_leaves_that_slice_empty():
    truth = ball_volume()

    def segment(z, box, points, labels, mask):
        # past the object the model still paints the neighbour's mask, with a low predicted IoU
        return (truth[z], None, 0.9) if truth[z].any() else (mask, None, 0.4)

    loose = propagate_object(segment, truth.shape[0], {5: truth[5]}, prompt_mode="mask", iou_threshold=0.5,
                             min_score=0.0)
    assert loose.z_range == (0, truth.shape[0] - 1)  # the IoU rule alone runs on to the volume's ends
    strict = propagate_object(segment, truth.shape[0], {5: truth[5]}, prompt_mode="mask", iou_threshold=0.5,
                              min_score=0.6)
    np.testing.assert_array_equal(strict.masks, truth)
    assert "predicted IoU 0.40" in strict.stopped["up"] and "predicted IoU" in strict.stopped["down"]
    # between two seeds the object is there at both ends: no stop there
    between = propagate_object(segment, truth.shape[0], {3: truth[3], 8: truth[8]}, prompt_mode="mask",
                               min_score=0.95)
    np.testing.assert_array_equal(between.masks[3:9], truth[3:9])
