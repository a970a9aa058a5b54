"""The click guard: a click changes the mask only in its direction and within its reach."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_robustmedsam.engine.click_guard import allowed_changes, guard_clicks
from napari_robustmedsam.engine.predictor import Predictor, logits_to_original
from napari_robustmedsam.engine.tiling import TiledPredictor
from napari_robustmedsam.errors import PromptError


def test_a_new_click_reaches_only_pixels_nearer_to_it_than_to_contradicting_clicks():
    points = np.array([[4.5, 8.5], [12.5, 8.5], [20.5, 8.5]])  # positive, positive, negative (new)
    may_add, may_remove = allowed_changes((16, 32), points, np.array([1, 1, 0]), n_new=1)
    assert not may_add.any()  # the only new click is negative
    assert may_remove[8, 20] and may_remove[8, 17] and not may_remove[8, 16] and not may_remove[8, 12]
    assert may_remove[:, 17:].all() and not may_remove[:, :16].any()  # the bisector with the nearer positive
    # a new positive click with no negative click before it may add anywhere
    may_add, may_remove = allowed_changes((16, 32), points[:2], np.array([1, 1]), n_new=1)
    assert may_add.all() and not may_remove.any()
    with pytest.raises(ValueError, match="labels"):
        allowed_changes((16, 32), points, np.array([1, 0]), n_new=1)
    with pytest.raises(ValueError, match="n_new"):
        allowed_changes((16, 32), points, np.array([1, 1, 0]), n_new=4)


def test_guard_keeps_only_changes_in_the_clicks_direction():
    prev = torch.full((1, 1, 32, 32), -4.0)
    prev[..., 8:24, 8:24] = 4.0
    new = prev.clone()
    new[..., 8:24, 20:24] = -3.0  # the mask loses its right side...
    new[..., 0:4, 0:4] = 3.0  # ...and gains a far blob
    new[..., 8:24, 24:28] = 2.0  # ...and grows at the click
    click = (np.array([[26.0, 16.0]]), np.array([1]), 1)  # a positive click right of the mask
    out = guard_clicks(prev, new, [click])
    assert torch.equal(out[..., 8:24, 24:28], new[..., 8:24, 24:28])  # added at a positive click: taken
    assert torch.equal(out[..., 0:4, 0:4], new[..., 0:4, 0:4])  # added, nothing contradicts it: taken
    assert torch.equal(out[..., 8:24, 20:24], prev[..., 8:24, 20:24])  # removed by a positive click: refused
    # the same change after a negative click: only the removal is taken
    out = guard_clicks(prev, new, [(np.array([[22.0, 16.0]]), np.array([0]), 1)])
    assert torch.equal(out[..., 8:24, 20:24], new[..., 8:24, 20:24])
    assert torch.equal(out[..., 8:24, 24:28], prev[..., 8:24, 24:28])
    assert torch.equal(out[..., 0:4, 0:4], prev[..., 0:4, 0:4])
    # None keeps the object's new logits whole
    assert torch.equal(guard_clicks(prev, new, [None]), new)
    with pytest.raises(ValueError, match="click sets"):
        guard_clicks(prev, new, [])


def test_an_earlier_positive_click_stays_inside():
    prev = torch.full((1, 1, 32, 32), -4.0)
    prev[..., 4:28, 4:28] = 4.0
    new = torch.full((1, 1, 32, 32), -4.0)  # the negative click wipes the whole object
    points = np.array([[8.0, 8.0], [24.0, 24.0]])  # an earlier positive click, the new negative one
    out = guard_clicks(prev, new, [(points, np.array([1, 0]), 1)])
    fg = out[0, 0] > 0
    assert fg[8, 8] and fg[4:10, 4:10].all()  # the positive click's side stays
    assert not fg[24, 24] and not fg[20:28, 20:28].any()  # the negative click's side goes


@pytest.fixture(scope="module")
def predictor_and_embedding(litemedsam, shared_data):
    from napari_robustmedsam.io import read_image

    image = read_image(sorted((shared_data / "medseg" / "ph2_dermoscopy" / "images").glob("*.png"))[0])
    predictor = Predictor.from_loaded(litemedsam)
    return predictor, predictor.compute_embedding(image)


def test_predictor_guarded_clicks_only_add_or_only_remove(predictor_and_embedding):
    """On a real image and LiteMedSAM: whatever the decoder does, a guarded negative click only removes pixels
    and a guarded positive click only adds them, at full resolution, and the mask shown is the logits fed back."""
    predictor, emb = predictor_and_embedding
    h, w = emb.frame.original_size
    box = np.array([w * 0.2, h * 0.2, w * 0.8, h * 0.8])
    first = predictor.predict(boxes=box, embedding=emb)
    ys, xs = np.nonzero(first.masks[0])
    inside = np.array([[float(xs.mean()), float(ys.mean())]])
    outside = np.array([[w * 0.25, h * 0.25]]) if not first.masks[0][int(h * 0.25), int(w * 0.25)] else None
    checked = 0
    for click, label in ((inside, 0), (outside, 1)):
        if click is None:
            continue
        args = dict(points=click, point_labels=np.array([label]), boxes=box, mask_input=first.low_res_logits,
                    embedding=emb)
        whole = predictor.predict(**args)
        guarded = predictor.predict(**args, guard_new_clicks=1)
        added = guarded.masks[0] & ~first.masks[0]
        removed = first.masks[0] & ~guarded.masks[0]
        assert not (removed if label == 1 else added).any()
        assert np.array_equal((logits_to_original(emb.frame, guarded.low_res_logits)[:, 0] > 0).numpy(), guarded.masks)
        # the guard refuses what whole prediction does against the click (LiteMedSAM moves the whole mask)
        against = (first.masks[0] & ~whole.masks[0]) if label == 1 else (whole.masks[0] & ~first.masks[0])
        if against.any():
            assert (guarded.masks[0] != whole.masks[0]).any()
        tiled = TiledPredictor(predictor).predict(**args, guard_new_clicks=[1])
        assert np.array_equal(tiled.masks, guarded.masks)
        checked += 1
    assert checked
    args = dict(points=inside, point_labels=np.array([0]), boxes=box, mask_input=first.low_res_logits, embedding=emb)
    with pytest.raises(PromptError, match="guard_new_clicks"):
        predictor.predict(**args, guard_new_clicks=[1, 1])
    with pytest.raises(PromptError, match="new clicks"):
        predictor.predict(**args, guard_new_clicks=2)


def test_segment_slice_guards_corrective_clicks_by_mode(predictor_and_embedding):
    from napari_robustmedsam.annotation.prompt_decoding import segment_slice
    from napari_robustmedsam.annotation.session import SlicePrompts

    predictor, emb = predictor_and_embedding
    h, w = emb.frame.original_size
    box = np.array([w * 0.2, h * 0.2, w * 0.8, h * 0.8])
    first = segment_slice(predictor, emb, SlicePrompts(box=box))
    ys, xs = np.nonzero(first.mask)
    click = np.array([[float(xs.mean()), float(ys.mean())]])
    kw = dict(previous_prompts=first.prompts, previous_logits=first.logits, previous_mask=first.mask)
    prompts = SlicePrompts(points=click, labels=np.array([0]), box=box)
    whole = segment_slice(predictor, emb, prompts, **kw)
    guarded = segment_slice(predictor, emb, prompts, **kw, click_guard="with a box")
    assert (whole.mask & ~first.mask).any(), "LiteMedSAM grows the mask somewhere at this negative click"
    assert not (guarded.mask & ~first.mask).any()  # a guarded negative click only removes
    assert np.array_equal(segment_slice(predictor, emb, prompts, **kw, click_guard=True).mask, guarded.mask)
    assert np.array_equal(segment_slice(predictor, emb, prompts, **kw, click_guard="off").mask, whole.mask)
    # from points alone, 'with a box' leaves the click unguarded; 'always' guards it
    p_first = segment_slice(predictor, emb, SlicePrompts(points=click, labels=np.array([1])))
    outside = np.array([[w * 0.1, h * 0.1]])
    p_prompts = SlicePrompts(points=np.vstack([click, outside]), labels=np.array([1, 0]))
    p_kw = dict(previous_prompts=p_first.prompts, previous_logits=p_first.logits, previous_mask=p_first.mask)
    assert np.array_equal(segment_slice(predictor, emb, p_prompts, **p_kw, click_guard="with a box").mask,
                          segment_slice(predictor, emb, p_prompts, **p_kw).mask)
    always = segment_slice(predictor, emb, p_prompts, **p_kw, click_guard="always")
    assert not (always.mask & ~p_first.mask).any()


def test_edge_reach_bounds_a_click_by_its_distance_to_the_mask_edge():
    from napari_robustmedsam.engine.click_guard import edge_distance

    previous = np.zeros((40, 40), bool)
    previous[10:30, 4:36] = True  # a band 20 px high; a negative click in its middle is 10 px from its edge
    click = np.array([[20.0, 20.0]])
    assert edge_distance(previous, click[0], 0) == pytest.approx(10.0, abs=0.6)
    assert edge_distance(previous, np.array([20.0, 5.0]), 1) == pytest.approx(5.0, abs=0.6)  # nearest mask pixel
    assert edge_distance(np.zeros((8, 8), bool), np.array([4.0, 4.0]), 1) == float("inf")
    _, free = allowed_changes(previous.shape, click, np.array([0]), 1)
    _, bounded = allowed_changes(previous.shape, click, np.array([0]), 1, previous, edge_reach=1.5)
    assert free[20, 38] and not bounded[20, 38]  # 18 px away: beyond 1.5 x 10.5 px
    assert bounded[20, 30] and bounded[20, 20]
    with pytest.raises(ValueError, match="previous mask"):
        allowed_changes(previous.shape, click, np.array([0]), 1, edge_reach=2.0)
    # through guard_clicks: a negative click that wipes the band only removes around itself
    prev = torch.where(torch.from_numpy(previous), 4.0, -4.0)[None, None]
    new = torch.full_like(prev, -4.0)
    out = guard_clicks(prev, new, [(click, np.array([0]), 1)], edge_reach=1.0)[0, 0] > 0
    assert not out[20, 20] and out[20, 33] and out[12, 5]


def test_a_scoped_edge_reach_bounds_only_negative_clicks_made_before_any_positive_click():
    """``EdgeReach(f, "negatives-before-positive")``: a box start's first negative click is bounded like the plain
    bound; a negative click after a positive one, and every positive click, reach as without a bound."""
    from napari_robustmedsam.engine.click_guard import EdgeReach

    previous = np.zeros((40, 40), bool)
    previous[10:30, 4:36] = True
    scoped = EdgeReach(1.5, "negatives-before-positive")
    lone = np.array([[20.0, 20.0]])
    _, plain = allowed_changes(previous.shape, lone, np.array([0]), 1, previous, edge_reach=1.5)
    _, first = allowed_changes(previous.shape, lone, np.array([0]), 1, previous, edge_reach=scoped)
    assert np.array_equal(first, plain) and not first[20, 38]
    # after a positive click far to the left the same negative click is free again (up to the bisector)
    after = np.array([[2.0, 20.0], [20.0, 20.0]])
    _, free = allowed_changes(previous.shape, after, np.array([1, 0]), 1, previous)
    _, opposed = allowed_changes(previous.shape, after, np.array([1, 0]), 1, previous, edge_reach=scoped)
    assert np.array_equal(opposed, free) and opposed[20, 38]
    # a positive click outside the mask is never bounded by this scope
    outside = np.array([[20.0, 36.5]])
    grow_free, _ = allowed_changes(previous.shape, outside, np.array([1]), 1, previous)
    grow_scoped, _ = allowed_changes(previous.shape, outside, np.array([1]), 1, previous, edge_reach=scoped)
    grow_plain, _ = allowed_changes(previous.shape, outside, np.array([1]), 1, previous, edge_reach=1.5)
    assert np.array_equal(grow_scoped, grow_free) and grow_plain.sum() < grow_free.sum()
    # two new clicks at once: the negative one is bounded only when the positive one comes after it
    both = np.array([[20.0, 20.0], [2.0, 20.0]])
    _, neg_first = allowed_changes(previous.shape, both, np.array([0, 1]), 2, previous, edge_reach=scoped)
    assert not neg_first[20, 38]
    with pytest.raises(ValueError, match="scope"):
        EdgeReach(2.0, "sometimes")
    with pytest.raises(ValueError, match="greater than 0"):
        EdgeReach(0.0)


def test_training_samples_the_next_click_from_the_guarded_prediction():
    """``training.fit --click-guard``: the state fed back and clicked on is the guarded one (after the local merge
    when that is on too); padding clicks (nothing left to correct) leave the object's mask as it was."""
    from training.finetune.prompt_simulation import PromptConfig, PromptState, add_clicks, shown_logits

    prev = torch.full((2, 1, 32, 32), -5.0)
    prev[:, :, 8:16, 8:16] = 5.0
    new = prev.clone()
    new[:, :, 8:16, 16:20] = 3.0  # grown at the click
    new[:, :, 8:10, 8:16] = -2.0  # and shrunk on top: against a positive click
    first = PromptState(np.zeros((2, 0, 2)), np.zeros((2, 0), np.int64), np.array([[8, 8, 16, 16]] * 2), start="box")
    state = add_clicks(first, np.array([[[17.0, 12.0]], [[0.0, 0.0]]]), np.array([[1], [-1]]))
    state.mask_input = prev
    guarded = shown_logits(state, new, PromptConfig(click_guard="with a box"))
    assert torch.equal(guarded[0, 0, 8:16, 16:20], new[0, 0, 8:16, 16:20])
    assert torch.equal(guarded[0, 0, 8:10, 8:16], prev[0, 0, 8:10, 8:16])  # the shrink is refused
    assert torch.equal(guarded[1], prev[1])  # padding click: nothing changes
    both = shown_logits(state, new, PromptConfig(local_corrections="always", click_guard="always"))
    assert torch.equal(both[0], guarded[0])
    points = PromptState(state.points, state.labels, None, prev, start="points1", new_clicks=1)
    assert torch.equal(shown_logits(points, new, PromptConfig(click_guard="with a box")), new)
    with pytest.raises(ValueError, match="click_guard"):
        PromptConfig(click_guard="sometimes")


def test_the_annotators_default_reach_bounds_a_box_starts_first_negative_click(predictor_and_embedding):
    """segment_slice with the annotator's default reach: a box start's first negative click removes only near
    itself (twice its distance to the mask's edge, up to the logits grid's cell); once a positive click exists the
    next negative click is guarded as without the bound."""
    from napari_robustmedsam.annotation.prompt_decoding import DEFAULT_CLICK_GUARD_REACH, segment_slice
    from napari_robustmedsam.annotation.session import SlicePrompts
    from napari_robustmedsam.engine.click_guard import edge_distance

    assert DEFAULT_CLICK_GUARD_REACH is not None and DEFAULT_CLICK_GUARD_REACH.scope == "negatives-before-positive"
    predictor, emb = predictor_and_embedding
    h, w = emb.frame.original_size
    box = np.array([w * 0.2, h * 0.2, w * 0.8, h * 0.8])
    first = segment_slice(predictor, emb, SlicePrompts(box=box))
    ys, xs = np.nonzero(first.mask)
    # near the lesion's left edge: LiteMedSAM removes a band far beyond the click's neighbourhood here
    click = np.array([[float(xs.min() + 0.15 * (xs.max() - xs.min())), float(ys.mean())]])
    assert first.mask[int(click[0, 1]), int(click[0, 0])]
    kw = dict(previous_prompts=first.prompts, previous_logits=first.logits, previous_mask=first.mask,
              click_guard="always")
    prompts = SlicePrompts(points=click, labels=np.array([0]), box=box)
    free = segment_slice(predictor, emb, prompts, **kw)
    bounded = segment_slice(predictor, emb, prompts, **kw, click_guard_reach=DEFAULT_CLICK_GUARD_REACH)
    removed_free, removed = first.mask & ~free.mask, first.mask & ~bounded.mask
    assert not (bounded.mask & ~first.mask).any()  # still only removes
    assert removed.sum() < removed_free.sum()
    cell = max(h, w) / 256  # one cell of the low-resolution logits grid, in image pixels
    ry, rx = np.nonzero(removed)
    reach = 2 * edge_distance(first.mask, click[0], 0) + 2 * cell
    assert np.hypot(rx + 0.5 - click[0, 0], ry + 0.5 - click[0, 1]).max() <= reach
    # after a positive click the same kind of negative click is not bounded
    pos = np.array([[float(xs.min()) + 2, float(ys[xs.argmin()])]])
    second = segment_slice(predictor, emb, SlicePrompts(points=pos, labels=np.array([1]), box=box), **kw)
    later = SlicePrompts(points=np.vstack([pos, click]), labels=np.array([1, 0]), box=box)
    kw2 = dict(kw, previous_prompts=second.prompts, previous_logits=second.logits, previous_mask=second.mask)
    assert np.array_equal(segment_slice(predictor, emb, later, **kw2, click_guard_reach=DEFAULT_CLICK_GUARD_REACH).mask,
                          segment_slice(predictor, emb, later, **kw2).mask)


def test_training_with_the_annotator_policy_shows_what_the_annotator_shows():
    """``training.fit --policy annotator``: the simulated state after a click is the engine's local merge and guard
    with the annotator's edge reach, so a box start's first negative click removes only near itself, as in the
    annotator (without the reach the same click removes the whole shrunk band)."""
    from napari_robustmedsam.annotation.click_policy import click_policy
    from napari_robustmedsam.engine.local_correction import merge_local_correction
    from training.finetune.presets import build_config
    from training.finetune.prompt_simulation import PromptState, add_clicks, policy_settings, shown_logits
    from training.fit import build_parser, config_from_args

    policy = click_policy("annotator")
    cfg = config_from_args(build_parser().parse_args(["--policy", "annotator"]))[0].prompts
    assert cfg == build_config(policy_settings("annotator")).prompts
    assert (cfg.local_corrections, cfg.click_guard, cfg.edge_reach) == (
        policy.local_corrections, policy.click_guard, policy.guard_reach)
    prev = torch.full((1, 1, 64, 64), -5.0)
    prev[:, :, 8:56, 8:56] = 5.0
    new = prev.clone()
    new[:, :, 8:56, 8:30] = -3.0  # the model drops a wide band for one negative click near the mask's edge
    click = np.array([[[12.0, 30.0]]])
    state = add_clicks(PromptState(np.zeros((1, 0, 2)), np.zeros((1, 0), np.int64), np.array([[8, 8, 56, 56]]),
                                   start="box"), click, np.array([[0]]))
    state.mask_input = prev
    shown = shown_logits(state, new, cfg)
    merged = merge_local_correction(prev, new, [click[0]])
    engine = guard_clicks(prev, merged, [(click[0], np.array([0]), 1)], edge_reach=policy.guard_reach)
    assert torch.equal(shown, engine)
    unbounded = shown_logits(state, new, build_config(dict(policy_settings("annotator"), click_guard_reach=0.0)).prompts)
    assert ((shown < 0) & (prev > 0)).sum() < ((unbounded < 0) & (prev > 0)).sum()


def test_training_simulates_a_refining_policys_click_path_up_to_the_model(monkeypatch):
    """A policy with a click refinement: training simulates the model's part of its click path (local corrections,
    guard and the reach that acts with the refinement); the refinement after the model is not simulated."""
    from napari_robustmedsam.annotation import click_policy as policies
    from napari_robustmedsam.engine.click_guard import EdgeReach
    from training.finetune.data import TrainingError
    from training.finetune.prompt_simulation import policy_settings

    monkeypatch.setitem(policies.CLICK_POLICIES, "refined",
                        policies.ClickPolicy("with a box", "always", EdgeReach(2.0, "negatives-before-positive"),
                                             "learned-directed", EdgeReach(3.0, "all")))
    assert policy_settings("refined") == dict(local_corrections="with a box", click_guard="always",
                                              click_guard_reach=3.0, click_guard_reach_scope="all")
    with pytest.raises(TrainingError, match="unknown click policy"):
        policy_settings("lab")
