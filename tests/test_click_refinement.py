"""The click refinement: every click is honoured and its surroundings re-decided at full resolution."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_robustmedsam.engine.click_refinement import (
    RefinementSettings,
    apply_model_change,
    as_refinement,
    click_pixel,
    refine_clicks,
    refine_prediction,
)

METHODS = ("random-walker", "graph-cut", "random-walker-directed", "graph-cut-directed")


def dice(a, b):
    return 2 * (a & b).sum() / max(a.sum() + b.sum(), 1)


def disk_scene(size=128, noise=8.0, seed=0):
    """A bright disk on a dark background; the model's mask misses its right part."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    truth = (yy - 64) ** 2 + (xx - 64) ** 2 < 30 ** 2
    image = (truth * 100 + 50 + rng.normal(0, noise, truth.shape)).astype(np.float32)
    model = truth & (xx < 74)
    return image, truth, model


@pytest.mark.parametrize("method", METHODS)
def test_a_positive_click_in_a_missed_part_adds_it_along_the_image_edge(method):
    image, truth, model = disk_scene()
    out = refine_clicks(image, model, [(84, 64)], [1], 1, method)
    assert out[64, 84]  # honoured
    assert dice(out, truth) > dice(model, truth) + 0.05
    assert not (model & ~out).any()  # a positive click in the missed part removes nothing here
    assert not out[:, :20].any() and not out[:20].any()  # the background far away stays


@pytest.mark.parametrize("method", METHODS)
def test_a_negative_click_removes_a_wrong_part(method):
    image, truth, _ = disk_scene()
    yy, xx = np.mgrid[:128, :128]
    model = truth | ((yy - 64) ** 2 + (xx - 100) ** 2 < 10 ** 2)  # a wrong blob on the right
    out = refine_clicks(image, model, [(102, 64)], [0], 1, method)
    assert not out[64, 102]
    assert dice(out, truth) > dice(model, truth)


@pytest.mark.parametrize("method", METHODS)
def test_stays_robust_on_a_degraded_image(method):
    """The degradation library's strongest random level on the same scene: the click is honoured and the mask
    gets closer to the truth."""
    from napari_robustmedsam.degradations import degrade_random

    image, truth, model = disk_scene(noise=2.0)
    img8 = np.clip(image, 0, 255).astype(np.uint8)
    for seed in (0, 1, 2):
        degraded, _ = degrade_random(img8, "LQ-3", "generic", seed)
        out = refine_clicks(degraded, model, [(84, 64)], [1], 1, method)
        assert out[64, 84]
        assert dice(out, truth) > dice(model, truth)


def test_a_click_on_a_pixel_with_its_label_changes_nothing():
    image, _, model = disk_scene()
    for method in METHODS:
        assert np.array_equal(refine_clicks(image, model, [(50, 64)], [1], 1, method), model)
        assert np.array_equal(refine_clicks(image, model, [(5, 5)], [0], 1, method), model)


def test_contradicting_clicks_on_one_pixel_the_last_wins():
    image, _, model = disk_scene()
    for method in METHODS:
        out = refine_clicks(image, model, [(84, 64), (84, 64)], [1, 0], 2, method)
        assert not out[64, 84]
        out = refine_clicks(image, model, [(84, 64), (84.2, 63.9)], [0, 1], 2, method)
        assert out[64, 84]


def test_a_click_outside_the_image_acts_on_the_nearest_edge_pixel():
    image, _, model = disk_scene()
    assert click_pixel((-30, 500), (128, 128)) == (127, 0)
    out = refine_clicks(image, model, [(-30, 64)], [1], 1)
    assert out[64, 0]


def test_two_hundred_clicks_all_stay_honoured():
    image, truth, model = disk_scene()
    rng = np.random.default_rng(3)
    pts = rng.uniform(0, 127, (200, 2))
    labels = truth[np.round(pts[:, 1]).astype(int), np.round(pts[:, 0]).astype(int)].astype(int)
    out = refine_clicks(image, model, pts, labels, 200, "graph-cut")
    pixels = [click_pixel(p, out.shape) for p in pts]
    assert all(out[px] == bool(lab) for px, lab in zip(pixels, labels))
    assert dice(out, truth) > dice(model, truth)


@pytest.mark.parametrize("solver", ("random-walker", "graph-cut"))
def test_directed_refinement_only_adds_at_a_positive_click_and_only_removes_at_a_negative_one(solver):
    image, truth, _ = disk_scene()
    yy, xx = np.mgrid[:128, :128]
    model = (truth & (xx < 74)) | ((yy - 64) ** 2 + (xx - 100) ** 2 < 6 ** 2)  # misses a part, has a wrong blob
    plain_pos = refine_clicks(image, model, [(80, 64)], [1], 1, solver)
    pos = refine_clicks(image, model, [(80, 64)], [1], 1, solver + "-directed")
    assert pos[64, 80] and not (model & ~pos).any() and np.array_equal(pos, model | plain_pos)
    neg = refine_clicks(image, model, [(100, 64)], [0], 1, solver + "-directed")
    assert not neg[64, 100] and not (neg & ~model).any()
    settings = as_refinement(solver + "-directed")
    assert settings.keep_direction and settings.method == solver and settings.word == solver + "-directed"


def test_off_none_and_bad_settings():
    image, _, model = disk_scene()
    assert np.array_equal(refine_clicks(image, model, [(84, 64)], [1], 1, "off"), model)
    assert as_refinement(None) is None and as_refinement("off") is None
    assert as_refinement("graph-cut").method == "graph-cut"
    with pytest.raises(ValueError, match="use one of"):
        RefinementSettings(method="magic")
    with pytest.raises(ValueError, match="use one of"):
        as_refinement("magic-directed")
    with pytest.raises(ValueError, match="labels"):
        refine_clicks(image, model, [(1, 1), (2, 2)], [1], 1)
    with pytest.raises(ValueError, match="does not match"):
        refine_clicks(image[:64], model, [(84, 64)], [1], 1)
    # zero new clicks: nothing to do
    assert np.array_equal(refine_clicks(image, model, [(84, 64)], [1], 0), model)


def test_the_shown_mask_keeps_earlier_refinements_and_takes_the_models_change():
    shown = np.zeros((8, 8), bool)
    shown[2:4, 2:4] = True  # an earlier refinement the model never made
    before = np.zeros((8, 8), bool)
    after = before.copy()
    after[6, 6] = True  # the model's new change
    out = apply_model_change(shown, before, after)
    assert out[2:4, 2:4].all() and out[6, 6] and out.sum() == 5
    assert np.array_equal(apply_model_change(None, None, after), after)
    image = np.zeros((8, 8), np.float32)
    assert np.array_equal(refine_prediction(image, shown, before, after, np.zeros((0, 2)), [], 0, "random-walker"), out)


def test_with_a_refinement_the_models_change_stays_near_the_new_click():
    """A point start's second positive click: the model's own mask was empty (the refined one is not) and now
    balloons; with a refinement on, only the part within twice the click's distance to the shown mask lands, and
    only as an addition. Without a refinement (or model_reach None) the whole change lands."""
    shown = np.zeros((64, 64), bool)
    shown[20:30, 20:30] = True  # what the refinement showed after the first point
    before = np.zeros((64, 64), bool)  # the model's own mask: empty
    after = np.zeros((64, 64), bool)
    after[5:60, 5:60] = True  # the model balloons
    click = np.array([[33.5, 25.5]])  # 4 px right of the shown mask's edge (pixel centres)
    image = np.zeros((64, 64), np.float32)
    assert np.array_equal(refine_prediction(image, shown, before, after, click, [1], 1, None), after | shown)
    bounded = apply_model_change(shown, before, after, (click, [1], 1, 2.0))
    assert bounded[shown].all()  # nothing shown is lost
    added = bounded & ~shown
    ay, ax = np.nonzero(added)
    assert added[25, 33] and added[25, 40] and not added[25, 42]
    assert np.hypot(ax + 0.5 - 33.5, ay + 0.5 - 25.5).max() <= 8.0
    unbounded = RefinementSettings(method="random-walker", model_reach=None)
    assert refine_prediction(image, shown, before, after, click, [1], 1, unbounded).sum() > 2500
    refined = refine_prediction(image, shown, before, after, click, [1], 1, "random-walker")
    assert not refined[55, 55] and refined[25, 33]
    # a negative click removes only near itself; a label with no shown pixel reaches every change
    large = np.zeros((64, 64), bool)
    large[10:50, 10:50] = True
    inside = np.array([[14.5, 30.5]])  # 5 px from the shown background: it reaches 10 px
    removed = apply_model_change(large, large, np.zeros_like(large), (inside, [0], 1, 2.0))
    ry, rx = np.nonzero(large & ~removed)
    assert not removed[30, 14] and removed[30, 45] and np.hypot(rx + 0.5 - 14.5, ry + 0.5 - 30.5).max() <= 10.0
    emptied = np.zeros((64, 64), bool)
    assert np.array_equal(apply_model_change(emptied, before, after, (click, [1], 1, 2.0)), after)
    with pytest.raises(ValueError, match="model_reach"):
        RefinementSettings(model_reach=0)


class _FakePredictor:
    """A model that ignores every click: always the same square (low-resolution logits and full mask)."""

    def __init__(self, size):
        from napari_robustmedsam.engine.preprocessing import ImageFrame

        self.frame = ImageFrame("litemedsam", (size, size), (256, 256), 256)
        logits = torch.full((1, 1, 256, 256), -4.0)
        logits[..., 64:192, 64:150] = 4.0
        self.logits = logits
        from napari_robustmedsam.engine.predictor import logits_to_original

        self.mask = (logits_to_original(self.frame, logits)[0, 0] > 0).numpy()

    def predict(self, **kwargs):
        from napari_robustmedsam.engine.predictor import Prediction

        return Prediction(masks=self.mask[None].copy(), scores=np.array([0.9]), low_res_logits=self.logits.clone())


@pytest.mark.parametrize("method", METHODS)
def test_segment_slice_honours_an_ignored_click_and_says_what_changed(method):
    from napari_robustmedsam.annotation.prompt_decoding import segment_slice
    from napari_robustmedsam.annotation.session import SlicePrompts

    image, truth, _ = disk_scene()
    fake = _FakePredictor(128)
    emb = type("Emb", (), {"frame": fake.frame})()
    box = np.array([30.0, 30.0, 98.0, 98.0])
    first = segment_slice(fake, emb, SlicePrompts(box=box), image=image, click_refinement=method)
    assert first.feedback == ""  # no click yet
    kw = dict(previous_prompts=first.prompts, previous_logits=first.logits, previous_mask=first.mask, image=image)
    click = SlicePrompts(points=np.array([[84.0, 64.0]]), labels=np.array([1]), box=box)
    ignored = segment_slice(fake, emb, click, **kw)
    assert np.array_equal(ignored.mask, first.mask) and "changed nothing" in ignored.feedback
    assert "Click refinement" in ignored.feedback
    refined = segment_slice(fake, emb, click, **kw, click_refinement=method)
    assert refined.mask[64, 84] and (refined.mask & ~first.mask).any()
    assert "added" in refined.feedback and "removed 0 px" in refined.feedback
    # the next click starts from the refined mask: the earlier refinement stays
    second = SlicePrompts(points=np.array([[84.0, 64.0], [64.0, 88.0]]), labels=np.array([1, 1]), box=box)
    nxt = segment_slice(fake, emb, second, previous_prompts=refined.prompts, previous_logits=refined.logits,
                        previous_mask=refined.mask, image=image, click_refinement=method)
    assert nxt.mask[64, 84] and nxt.mask[88, 64] and not (refined.mask & ~nxt.mask).any()


def test_click_feedback_sentences():
    from napari_robustmedsam.annotation.prompt_decoding import click_feedback

    before = np.zeros((10, 10), bool)
    before[2:6, 2:6] = True
    after = before.copy()
    after[6, 2:6] = True
    assert click_feedback(before, after, [[3, 6]], [1], 1) == "The click added 4 px and removed 0 px."
    same = click_feedback(before, before, [[3, 3]], [1], 1)
    assert "changed nothing" in same and "already had that label" in same
    ignored = click_feedback(before, before, [[8, 8]], [1], 1)
    assert "changed nothing" in ignored and "Click refinement" in ignored
    partly = click_feedback(before, after, [[8, 8]], [1], 1)
    assert "still has the other label" in partly
    last = click_feedback(before, before, [[3, 3], [3, 3]], [0, 1], 1)
    assert "the last click wins" in last


def test_a_click_outside_the_image_is_said_in_the_hint():
    from napari_robustmedsam.annotation.prompt_decoding import prompts_to_send
    from napari_robustmedsam.annotation.session import SlicePrompts

    def hint_for(points):
        prompts = SlicePrompts(np.asarray(points, float), np.ones(len(points), np.int64), None, "user")
        sent, hint = prompts_to_send(prompts, (64, 128), False, None, None, "model")
        return sent, hint

    sent, hint = hint_for([[10, 10], [-5, 20]])
    assert "(-5, 20), is outside the image" in hint and "B takes it back" in hint
    assert sent.points[-1].tolist() == [0.0, 20.0]
    assert hint_for([[10, 10], [127.4, 63.3]])[1] == ""  # inside the edge pixels themselves
    assert hint_for([[-5, 20], [10, 10]])[1] == ""  # said once, for the click that was outside
