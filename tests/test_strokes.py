"""Strokes as prompts: sampling along a path, bad strokes, and that the refinement honours every point."""

from __future__ import annotations

import numpy as np
import pytest

from napari_robustmedsam.annotation.strokes import MAX_STROKE_POINTS, stroke_points
from napari_robustmedsam.errors import PromptError


def test_a_stroke_is_sampled_every_few_pixels_with_both_ends():
    pts, labels = stroke_points([[10, 20], [40, 20]], 1, (64, 64), spacing=6)
    assert pts.shape == (6, 2) and (labels == 1).all()  # 30 px: 0, 6, 12, 18, 24, 30
    assert np.allclose(pts[0], [10, 20]) and np.allclose(pts[-1], [40, 20])
    assert np.allclose(np.diff(pts[:, 0]), 6)


def test_a_one_point_stroke_is_one_click():
    pts, labels = stroke_points([[5.0, 7.0]], 0, (64, 64))
    assert pts.tolist() == [[5.0, 7.0]] and labels.tolist() == [0]


def test_a_stroke_leaving_the_image_keeps_its_part_on_the_image():
    pts, _ = stroke_points([[30, 10], [100, 10]], 1, (64, 64), spacing=4)
    assert pts[:, 0].max() <= 63.5 and pts[:, 0].min() == 30
    with pytest.raises(PromptError, match="outside the image"):
        stroke_points([[100, 100], [120, 130]], 1, (64, 64))
    with pytest.raises(PromptError, match="label"):
        stroke_points([[1, 1]], 2, (64, 64))
    with pytest.raises(PromptError, match="NaN"):
        stroke_points([[1, np.nan]], 1, (64, 64))


def test_a_long_stroke_is_capped():
    path = [[0, 0], [500, 0], [500, 500], [0, 500]]
    pts, _ = stroke_points(path, 1, (512, 512))
    assert len(pts) == MAX_STROKE_POINTS


def test_refinement_honours_every_point_of_a_stroke():
    from napari_robustmedsam.engine.click_refinement import click_pixel, refine_clicks

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:96, :96]
    truth = (yy - 48) ** 2 + (xx - 48) ** 2 < 25 ** 2
    image = (truth * 100 + 50 + rng.normal(0, 5, truth.shape)).astype(np.float32)
    model = truth & (xx < 50)
    pts, labels = stroke_points([[55, 35], [66, 48], [55, 62]], 1, (96, 96), spacing=5)
    out = refine_clicks(image, model, pts, labels, len(pts), "graph-cut")
    assert all(out[click_pixel(p, out.shape)] for p in pts)
    assert (out & truth).sum() > (model & truth).sum()


def test_the_status_line_names_a_stroke_and_what_it_changed():
    from napari_robustmedsam.annotation.prompt_decoding import click_feedback, new_points_form_one_stroke

    before = np.zeros((32, 32), bool)
    before[8:16, 8:16] = True
    after = before.copy()
    after[8:16, 16:20] = True
    after[8, 8] = False
    pts = np.array([[10.0, 10.0], [17.0, 10.0], [18.0, 12.0]])
    text = click_feedback(before, after, pts, [1, 1, 1], 2, stroke=True)
    assert text == "Stroke of 2 points: +32 px / -1 px."
    unchanged = click_feedback(before, before, pts, [1, 1, 1], 2, stroke=True)
    assert unchanged.startswith("The stroke of 2 points changed nothing: the model kept its mask. Try Click refinement")
    inside = click_feedback(before, before, np.array([[9.0, 9.0], [10.0, 10.0]]), [1, 1], 2, stroke=True)
    assert "its points already had that label" in inside
    # a stroke of one point is one click, named as a stroke
    assert click_feedback(before, after, pts[:1], [1], 1, stroke=True).startswith("Stroke of 1 point: ")
    # which new points form one stroke: the stroke ids of the points (-1: a click)
    assert new_points_form_one_stroke(np.array([-1, 3, 3]), 3, 2)
    assert not new_points_form_one_stroke(np.array([-1, 3, 3]), 3, 3)  # a click among them
    assert not new_points_form_one_stroke(np.array([2, 3]), 2, 2)  # two strokes
    assert not new_points_form_one_stroke(np.array([-1, -1]), 2, 1) and not new_points_form_one_stroke(None, 2, 1)
    assert not new_points_form_one_stroke(np.array([3, 3]), 3, 1)  # ids that do not match the points: not named


def test_a_brushed_band_becomes_a_path_along_its_centre_line():
    """brush_path: the skeleton of the painted band, points at least the stroke spacing apart, in order, so the
    stroke's clicks all fall inside the band, for a straight and a curved band; nothing painted gives None."""
    from napari_robustmedsam.annotation.strokes import STROKE_SPACING_PX, brush_path

    band = np.zeros((100, 120), bool)
    band[40:47, 10:90] = True
    path = brush_path(band)
    assert abs(path[:, 1] - 43).max() <= 1 and path[:, 0].min() <= 12 and path[:, 0].max() >= 87
    steps = np.diff(path[:, 0])
    assert np.all(steps > 0) or np.all(steps < 0), "the path runs along the band in one direction"
    assert np.all(np.hypot(*np.diff(path, axis=0)[:-1].T) >= STROKE_SPACING_PX - 1e-9)  # the end is kept as is
    yy, xx = np.mgrid[:100, :120]
    r = np.hypot(xx - 60, yy - 60)
    arc = (r > 34) & (r < 41) & (yy < 60)
    pts, labels = stroke_points(brush_path(arc), 0, arc.shape)
    assert len(pts) >= 10 and set(labels) == {0}
    assert all(arc[int(round(y)), int(round(x))] for x, y in pts)
    assert brush_path(np.zeros((8, 8), bool)) is None
    dot = np.zeros((8, 8), bool)
    dot[3, 4] = True
    np.testing.assert_array_equal(brush_path(dot), [[4.0, 3.0]])
    with pytest.raises(PromptError, match="one \\(H, W\\) plane"):
        brush_path(np.zeros((2, 8, 8), bool))
