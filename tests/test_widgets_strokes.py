"""Strokes in the napari annotator: a path drawn on the ``stroke prompts`` layer becomes clicks along it and the
mask follows it (positive adds, negative removes); one-point and off-image strokes; B takes a stroke back; a commit
clears the strokes. The embedded LiteMedSAM on the MRI phantom, as in test_widgets_annotator.py.

Run under a virtual display: xvfb-run -a -s "-screen 0 1600x1000x24" python -m pytest tests/test_widgets_strokes.py
"""

from __future__ import annotations

import numpy as np
import pytest

from napari_robustmedsam.annotation.model_info import preimport_model_modules
from napari_robustmedsam.engine.click_refinement import click_pixel
from test_widgets_annotator import engine, plugin, segment_with_box  # noqa: F401  (fixtures)
from widget_helpers import shot, wait_idle

preimport_model_modules()

pytestmark = pytest.mark.gui

GREEN, RED = (0.0, 1.0, 0.0), (1.0, 32 / 255, 32 / 255)  # the positive / negative colours of the prompt layers


def start_on_left_half(qtbot, viewer, widget):
    """The MRI phantom's organ, boxed over its left half only: the right half is missing from the mask."""
    from napari_robustmedsam.sample_data import mri_phantom

    widget.show_tab("annotate")
    image, labels = mri_phantom(256, seed=0)
    annotator = widget.annotator
    annotator.set_image_layer(viewer.add_image(image, name="phantom"))
    organ = labels >= 1
    ys, xs = np.nonzero(organ)
    mid = (xs.min() + xs.max()) // 2
    segment_with_box(qtbot, annotator, [xs.min(), ys.min(), mid, ys.max() + 1])
    return annotator, organ


def stroke(qtbot, annotator, path, positive=True):
    with qtbot.waitSignal(annotator.segmented, timeout=180_000):
        annotator.add_stroke(path, positive=positive)
    wait_idle(qtbot)


def near(path, shape, radius):
    """Pixels within ``radius`` of the polyline ``path`` ((N, 2) x, y)."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    out = np.zeros(shape, bool)
    pts = np.asarray(path, float)
    for a, b in zip(pts[:-1], pts[1:]):
        for t in np.linspace(0, 1, 50):
            x, y = a + (b - a) * t
            out |= (xx - x) ** 2 + (yy - y) ** 2 <= radius**2
    return out


def test_positive_and_negative_strokes_change_the_mask_along_them(plugin, qtbot):
    viewer, widget = plugin
    annotator, organ = start_on_left_half(qtbot, viewer, widget)
    assert annotator.strokes_layer is not None and annotator.strokes_layer.name == "stroke prompts"
    assert annotator.strokes_layer.mode == "add_path"
    names = [layer.name for layer in viewer.layers]
    assert names.index("stroke prompts") == names.index("point prompts") - 1  # just below the clicks
    session = annotator.session
    before = session.current.copy()
    decodes = sum(annotator.decode_modes.values())

    # a positive stroke through the missed right half adds pixels there, and only adds
    plus = [[110, 100], [125, 120], [140, 140]]
    stroke(qtbot, annotator, plus, positive=True)
    after = session.current.copy()
    added, removed = after & ~before, before & ~after
    assert sum(annotator.decode_modes.values()) == decodes + 1  # one decode for the whole stroke
    assert added.sum() > 0 and removed.sum() == 0
    assert (added & near(plus, after.shape, 12)).sum() > 0
    assert (added & organ).sum() > 0.8 * added.sum()
    k = len(annotator.points_layer.data)
    assert k >= 5 and set(annotator.points_layer.features["stroke"]) == {0}
    assert annotator.points_layer.features["label"].tolist() == ["positive"] * k
    assert f"Stroke of {k} points: +{int(added.sum())} px / -0 px." in annotator.status.text()
    assert np.allclose(annotator.strokes_layer.edge_color[0][:3], GREEN)

    # a negative stroke through the mask removes pixels there, and only removes; drawn in red
    minus = [[60, 95], [75, 110], [90, 125]]
    stroke(qtbot, annotator, minus, positive=False)
    final = session.current.copy()
    added, removed = final & ~after, after & ~final
    assert removed.sum() > 0 and added.sum() == 0
    assert (removed & near(minus, final.shape, 12)).sum() > 0
    assert "-" + str(int(removed.sum())) + " px." in annotator.status.text()
    assert np.allclose(annotator.strokes_layer.edge_color[1][:3], RED)
    assert annotator.polarity == "negative"  # the stroke's polarity is the next point's (one control)
    shot(viewer, "10_strokes")

    # B takes the whole negative stroke back (its path and all its clicks): the mask is exactly as before it
    with qtbot.waitSignal(annotator.segmented, timeout=60_000):
        annotator.take_back_click()
    wait_idle(qtbot)
    assert annotator.strokes_layer.nshapes == 1 and len(annotator.points_layer.data) == k
    assert np.array_equal(session.current, after)
    assert "back to the mask before that stroke (" in annotator.status.text(), annotator.status.text()

    # deleting the positive path in the layer removes its clicks too, and the mask follows
    annotator.strokes_layer.selected_data = {0}
    with qtbot.waitSignal(annotator.segmented, timeout=60_000):
        annotator.strokes_layer.remove_selected()
    wait_idle(qtbot)
    assert len(annotator.points_layer.data) == 0
    assert np.array_equal(session.current, before)

    # a commit clears the strokes with the clicks
    stroke(qtbot, annotator, plus, positive=True)
    assert annotator.strokes_layer.nshapes == 1
    assert annotator.commit() == 1
    assert annotator.strokes_layer.nshapes == 0 and len(annotator.points_layer.data) == 0
    assert not session.current.any()


def test_one_point_and_off_image_strokes(plugin, qtbot):
    viewer, widget = plugin
    annotator, organ = start_on_left_half(qtbot, viewer, widget)
    session = annotator.session
    h, w = session.shape
    # the click refinement honours every click of a stroke, as it does a click's (the model alone may ignore
    # a click outside the box)
    annotator.refine_combo.setCurrentText("graph-cut")

    # a stroke of one point (the path's vertices coincide) is one click
    before = session.current.copy()
    assert not before[120, 130]
    stroke(qtbot, annotator, [[130, 120], [130, 120]], positive=True)
    assert len(annotator.points_layer.data) == 1
    assert annotator.points_layer.data[0].tolist() == [120.0, 130.0]
    assert session.current[120, 130]
    assert "Stroke of 1 point: +" in annotator.status.text()

    # a stroke that leaves the image: only its part on the image becomes clicks, each honoured
    n = len(annotator.points_layer.data)
    stroke(qtbot, annotator, [[140, 110], [w + 80, 110]], positive=True)
    new = np.asarray(annotator.points_layer.data)[n:]
    assert len(new) >= 2 and new[:, 1].max() <= w - 0.5 and new[:, 1].min() == 140
    assert all(session.current[click_pixel((x, y), (h, w))] for y, x in new)
    assert annotator.strokes_layer.nshapes == 2

    # a stroke entirely outside the image: a clear message, the path removed, nothing else changes
    mask, points = session.current.copy(), np.asarray(annotator.points_layer.data).copy()
    decodes = sum(annotator.decode_modes.values())
    annotator.add_stroke([[w + 10, 10], [w + 60, 40]], positive=False)
    wait_idle(qtbot)
    assert "outside the image" in annotator.banner.text()
    assert "nothing changed" in annotator.status.text() and "outside the image" in annotator.status.text()
    assert annotator.strokes_layer.nshapes == 2
    assert np.array_equal(np.asarray(annotator.points_layer.data), points)
    assert np.array_equal(session.current, mask) and sum(annotator.decode_modes.values()) == decodes
    assert not np.array_equal(mask, before)  # the earlier strokes did change it


def test_stroke_clicks_follow_their_paths_in_the_layers():
    """sync_stroke_points on the bare layers: a new path becomes clicks with its polarity and a stroke id, an edited
    path's clicks are sampled again, a removed path's clicks go, a path off the image or a closed shape is refused."""
    import pandas as pd
    from napari.layers import Points, Shapes

    from napari_robustmedsam.widgets.annotation_layers import POINT_COLORS, POLARITIES
    from napari_robustmedsam.widgets.stroke_layer import ensure_stroke_feature, point_strokes, sync_stroke_points

    strokes = Shapes(ndim=2, shape_type="path", edge_color="label", edge_color_cycle=POINT_COLORS,
                     features={"label": pd.Categorical([], categories=POLARITIES), "stroke": np.zeros(0, np.int64)},
                     feature_defaults={"label": "positive", "stroke": -1})
    points = Points(np.zeros((0, 2)), property_choices={"label": POLARITIES}, face_color="label",
                    face_color_cycle=POINT_COLORS, size=4)
    points.feature_defaults = {"label": "positive"}
    ensure_stroke_feature(points)
    points.add(np.array([[5.0, 5.0]]))  # a click before the strokes
    strokes.add_paths([np.array([[10.0, 10.0], [10.0, 40.0]])])  # (row, col): along row 10
    change = sync_stroke_points(strokes, points, (64, 64), False, "positive")
    assert change.added == [(0, 6, "positive")] and not change.refused
    assert point_strokes(points, 0, False).tolist() == [-1] + [0] * 6
    strokes.add_paths([np.array([[30.0, 10.0], [30.0, 20.0]])])
    change = sync_stroke_points(strokes, points, (64, 64), False, "negative")
    assert change.added == [(1, 2, "negative")]
    assert strokes.features["label"].tolist() == ["positive", "negative"]
    assert points.features["label"].tolist()[-2:] == ["negative", "negative"]
    assert points.feature_defaults["stroke"][0] == -1  # the next click is a click again
    # nothing changed: nothing to do
    assert not sync_stroke_points(strokes, points, (64, 64), False, "positive").changed
    # the first path edited (as napari's vertex tool does): its clicks are sampled again, as the newest
    strokes._data_view.edit(0, np.array([[12.0, 10.0], [12.0, 30.0]]))
    change = sync_stroke_points(strokes, points, (64, 64), False, "positive")
    assert change.added == [(0, 4, "positive")] and change.removed == 1
    assert np.allclose(np.asarray(points.data)[-4:, 0], 12.0)
    assert point_strokes(points, 0, False).tolist() == [-1, 1, 1, 0, 0, 0, 0]
    # the second path removed: its clicks go, the click and the first stroke stay
    strokes.selected_data = {1}
    strokes.remove_selected()
    change = sync_stroke_points(strokes, points, (64, 64), False, "positive")
    assert change.removed == 1 and point_strokes(points, 0, False).tolist() == [-1, 0, 0, 0, 0]
    # off the image, or a closed shape: refused with the reason, removed, the clicks unchanged
    strokes.add_paths([np.array([[100.0, 100.0], [120.0, 130.0]])])
    strokes.add_rectangles([np.array([[1.0, 1.0], [8.0, 8.0]])])
    change = sync_stroke_points(strokes, points, (64, 64), False, "positive")
    assert not change.changed and len(change.refused) == 2
    assert "outside the image" in change.refused[0] and "path tool" in change.refused[1]
    assert strokes.nshapes == 1 and len(points.data) == 5


def test_a_stroke_on_a_volume_slice_belongs_to_that_slice(plugin, qtbot):
    from napari_robustmedsam.sample_data import mri_phantom_volume

    viewer, widget = plugin
    widget.show_tab("annotate")
    annotator = widget.annotator
    annotator.prefetch_check.setChecked(False)  # only the slice prompted is embedded
    volume, labels = mri_phantom_volume(6, 160, seed=1)
    annotator.set_image_layer(viewer.add_image(volume, name="phantom volume"))
    z = 3
    annotator.set_slice(z)
    organ = labels[z] >= 1
    ys, xs = np.nonzero(organ)
    mid = (xs.min() + xs.max()) // 2
    segment_with_box(qtbot, annotator, [xs.min(), ys.min(), mid, ys.max() + 1], z=z)
    assert annotator.strokes_layer.ndim == 3
    stroke(qtbot, annotator, [[mid + 5, (ys.min() + ys.max()) // 2], [xs.max() - 5, (ys.min() + ys.max()) // 2]])
    data = np.asarray(annotator.points_layer.data)
    assert len(data) >= 2 and (data[:, 0] == z).all()
    assert annotator.slice_prompts(z).points.shape[0] == len(data)
    assert annotator.slice_prompts(z - 1).points.shape[0] == 0
    assert "troke of" in annotator.status.text()
    # B takes the stroke back on its slice
    with qtbot.waitSignal(annotator.segmented, timeout=60_000):
        annotator.take_back_click()
    wait_idle(qtbot)
    assert annotator.strokes_layer.nshapes == 0 and len(annotator.points_layer.data) == 0
    annotator.clear()
    assert annotator.strokes_layer.nshapes == 0


def brush(qtbot, annotator, path, label, size=7):
    """Paint (label 1) or erase (label 0) along ``path`` ((N, 2) x, y) on the current object layer, as one brush
    stroke of napari's paint tool: one paint event at its end."""
    layer = annotator.current_layer
    layer.brush_size = size
    with qtbot.waitSignal(annotator.segmented, timeout=180_000):
        with layer.block_history():
            for a, b in zip(path[:-1], path[1:]):
                for t in np.linspace(0, 1, 12):
                    x, y = np.asarray(a, float) + (np.asarray(b, float) - np.asarray(a, float)) * t
                    layer.paint((y, x), label, refresh=False)
    wait_idle(qtbot)


def test_brushing_the_mask_is_a_positive_stroke_and_erasing_it_a_negative_one(plugin, qtbot):
    """The brush on the current object layer is a prompt, not a pixel edit: its band's centre line becomes a stroke
    (a path in the strokes layer, clicks along it, one decode), the next point's polarity stays, and B takes it
    back whole."""
    viewer, widget = plugin
    annotator, organ = start_on_left_half(qtbot, viewer, widget)
    session = annotator.session
    before = session.current.copy()
    decodes = sum(annotator.decode_modes.values())
    assert annotator.polarity == "positive"

    plus = [[110, 100], [125, 120], [140, 140]]
    brush(qtbot, annotator, plus, 1)
    after = session.current.copy()
    assert sum(annotator.decode_modes.values()) == decodes + 1  # one decode for the whole brush stroke
    assert annotator.strokes_layer.nshapes == 1 and len(annotator.points_layer.data) >= 3
    assert (after & ~before & near(plus, after.shape, 12)).sum() > 0 and not (before & ~after).any()
    assert np.array_equal(np.asarray(annotator.current_layer.data) > 0, after)  # the layer shows the model's mask
    assert "Stroke of" in annotator.status.text()
    shot(viewer, "11_brush_stroke")

    # the eraser across the mask is a negative stroke; the next click stays positive
    minus = [[70, 120], [100, 125]]
    brush(qtbot, annotator, minus, 0)
    final = session.current.copy()
    assert annotator.strokes_layer.nshapes == 2 and annotator.polarity == "positive"
    assert (after & ~final).sum() > 0 and not (final & ~after).any()

    # B takes the eraser stroke back whole
    with qtbot.waitSignal(annotator.segmented, timeout=60_000):
        annotator.take_back_click()
    wait_idle(qtbot)
    assert annotator.strokes_layer.nshapes == 1 and np.array_equal(session.current, after)
