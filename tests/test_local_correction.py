"""Corrective clicks that stay local: only the changes connected to the new click are taken."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_robustmedsam.annotation.prompt_decoding import segment_slice
from napari_robustmedsam.annotation.session import SlicePrompts
from napari_robustmedsam.engine.local_correction import changed_regions_at_clicks, merge_local_correction
from napari_robustmedsam.engine.predictor import Predictor
from napari_robustmedsam.engine.tiling import TiledPredictor
from napari_robustmedsam.errors import PromptError


def _disk(shape, cy, cx, r):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def test_only_the_region_at_the_click_is_taken():
    prev = _disk((64, 64), 32, 32, 10)
    new = prev | _disk((64, 64), 32, 46, 5) | _disk((64, 64), 5, 5, 3)  # grows right (clicked) and far away
    new[30:34, 22:24] = False  # and loses a notch on the left
    keep = changed_regions_at_clicks(prev, new, np.array([[47.0, 32.0]]))
    assert keep.any()
    assert keep[32, 46] and not keep[5, 5] and not keep[31, 22]
    assert not (keep & ~(prev != new)).any()  # only changed pixels


def test_click_one_pixel_off_its_region_still_counts_and_far_clicks_do_not():
    prev = np.zeros((32, 32), bool)
    new = prev.copy()
    new[10:14, 10:14] = True
    assert changed_regions_at_clicks(prev, new, np.array([[14.0, 12.0]])).sum() == 16  # adjacent pixel
    assert not changed_regions_at_clicks(prev, new, np.array([[20.0, 20.0]])).any()
    assert not changed_regions_at_clicks(prev, prev, np.array([[11.0, 11.0]])).any()  # nothing changed


def test_merge_keeps_previous_logits_outside_the_clicked_change():
    prev = torch.full((2, 1, 32, 32), -5.0)
    prev[:, :, 8:16, 8:16] = 5.0
    new = prev.clone() * 1.5
    new[:, :, 8:16, 16:20] = 3.0  # grown at the click
    new[:, :, 25:30, 25:30] = 2.0  # a far blob
    clicks = [np.array([[17.0, 12.0]]), None]  # object 1: no merge
    out = merge_local_correction(prev, new, clicks)
    assert torch.equal(out[0, 0, 8:16, 16:20], new[0, 0, 8:16, 16:20])
    assert torch.equal(out[0, 0, 25:30, 25:30], prev[0, 0, 25:30, 25:30])
    assert torch.equal(out[0, 0, 8:16, 8:16], prev[0, 0, 8:16, 8:16])  # unchanged sign: previous values
    assert torch.equal(out[1], new[1])
    with pytest.raises(ValueError, match="click sets"):
        merge_local_correction(prev, new, clicks[:1])


@pytest.fixture(scope="module")
def predictor_and_embedding(litemedsam, shared_data):
    from napari_robustmedsam.io import read_image

    image = read_image(sorted((shared_data / "medseg" / "ph2_dermoscopy" / "images").glob("*.png"))[0])
    predictor = Predictor.from_loaded(litemedsam)
    return predictor, predictor.compute_embedding(image)


def _acted_on_click(predictor, emb, box, first):
    """A negative click just inside the mask's edge that the full prediction acts on (flips its pixel): a box-
    trained model ignores many clicks, which is exactly what local corrections then leave alone."""
    ys, xs = np.nonzero(first.masks[0])
    candidates = [(xs.max() - 2, ys[xs.argmax()]), (xs.min() + 2, ys[xs.argmin()]),
                  (xs[ys.argmax()], ys.max() - 2), (xs[ys.argmin()], ys.min() + 2)]
    for x, y in candidates:
        click = np.array([[float(x), float(y)]])
        whole = predictor.predict(points=click, point_labels=np.array([0]), boxes=box,
                                  mask_input=first.low_res_logits, embedding=emb)
        if not whole.masks[0][int(y), int(x)]:
            return click, whole
    pytest.fail("no edge click changed the mask: the feedback of the previous logits is broken")


def test_predictor_local_click_changes_only_the_region_at_the_click(predictor_and_embedding):
    predictor, emb = predictor_and_embedding
    h, w = emb.frame.original_size
    box = np.array([w * 0.2, h * 0.2, w * 0.8, h * 0.8])
    first = predictor.predict(boxes=box, embedding=emb)
    click, whole = _acted_on_click(predictor, emb, box, first)
    args = dict(points=click, point_labels=np.array([0]), boxes=box, mask_input=first.low_res_logits, embedding=emb)
    local = predictor.predict(**args, local_clicks=click)
    changed_whole = whole.masks[0] != first.masks[0]
    changed_local = local.masks[0] != first.masks[0]
    x, y = int(click[0, 0]), int(click[0, 1])
    assert changed_local[y, x], "the change at the click must be taken"
    assert changed_local.sum() < changed_whole.sum(), "LiteMedSAM also moves far edges; those must stay"
    # the same decoder output, merged: where the full prediction did not change, the local one did not either
    assert not (changed_local & ~changed_whole).any()
    # the shown mask is the thresholded merged logits, the ones fed back at the next click
    from napari_robustmedsam.engine.predictor import logits_to_original

    assert np.array_equal((logits_to_original(emb.frame, local.low_res_logits)[:, 0] > 0).numpy(), local.masks)
    with pytest.raises(PromptError, match="local_clicks"):
        predictor.predict(**args, local_clicks=[click, click])
    # plain lists work as in the README: one object's clicks, (K, 2)
    as_list = predictor.predict(**args, local_clicks=[[float(click[0, 0]), float(click[0, 1])]])
    assert np.array_equal(as_list.masks, local.masks)
    # the tiled wrapper passes it through for a plain embedding
    tiled = TiledPredictor(predictor).predict(**args, local_clicks=click)
    assert np.array_equal(tiled.masks, local.masks)


def test_segment_slice_local_corrections_only_for_corrective_clicks(predictor_and_embedding):
    predictor, emb = predictor_and_embedding
    h, w = emb.frame.original_size
    box = np.array([w * 0.2, h * 0.2, w * 0.8, h * 0.8])
    first = segment_slice(predictor, emb, SlicePrompts(box=box))
    click, _ = _acted_on_click(predictor, emb, box, predictor.predict(boxes=box, embedding=emb))
    prompts = SlicePrompts(points=click, labels=np.array([0]), box=box)
    kw = dict(previous_prompts=first.prompts, previous_logits=first.logits, previous_mask=first.mask)
    whole = segment_slice(predictor, emb, prompts, **kw)
    local = segment_slice(predictor, emb, prompts, **kw, local_corrections=True)
    assert local.used_previous_logits
    assert (local.mask != first.mask).any()
    assert not ((local.mask != first.mask) & (whole.mask == first.mask)).any()
    assert (local.mask != first.mask).sum() < (whole.mask != first.mask).sum()
    # a new box is not a corrective click: the whole new prediction is taken
    other = SlicePrompts(box=box + np.array([5, 5, -5, -5]))
    assert np.array_equal(segment_slice(predictor, emb, other, **kw, local_corrections=True).mask,
                          segment_slice(predictor, emb, other, **kw).mask)


def test_local_correction_modes():
    from napari_robustmedsam.annotation.prompt_decoding import DEFAULT_LOCAL_CORRECTIONS, local_corrections_apply

    assert DEFAULT_LOCAL_CORRECTIONS == "with a box"
    assert local_corrections_apply("with a box", has_box=True) and not local_corrections_apply("with a box", False)
    assert local_corrections_apply("always", False) and not local_corrections_apply("off", True)
    assert local_corrections_apply(True, False) and not local_corrections_apply(False, True)
    with pytest.raises(ValueError, match="valid: off, with a box, always"):
        local_corrections_apply("sometimes", True)


def test_point_only_corrections_take_the_whole_mask_with_a_box_mode(predictor_and_embedding):
    predictor, emb = predictor_and_embedding
    h, w = emb.frame.original_size
    start = SlicePrompts(points=np.array([[w / 2, h / 2]]), labels=np.array([1]))
    first = segment_slice(predictor, emb, start)
    more = SlicePrompts(points=np.array([[w / 2, h / 2], [w * 0.3, h * 0.3]]), labels=np.array([1, 0]))
    kw = dict(previous_prompts=first.prompts, previous_logits=first.logits, previous_mask=first.mask)
    whole = segment_slice(predictor, emb, more, **kw)
    assert np.array_equal(segment_slice(predictor, emb, more, **kw, local_corrections="with a box").mask, whole.mask)
    always = segment_slice(predictor, emb, more, **kw, local_corrections="always")
    assert not ((always.mask != first.mask) & (whole.mask == first.mask)).any()


def test_training_samples_the_next_click_from_the_merged_prediction():
    """Training with local corrections (``training.fit --local-corrections``) feeds back, and samples the next click
    from, what the annotator would show: the new logits only in the changed region at the last click."""
    from training.finetune.prompt_simulation import PromptConfig, PromptState, add_clicks, shown_logits

    prev = torch.full((2, 1, 32, 32), -5.0)
    prev[:, :, 8:16, 8:16] = 5.0
    new = prev.clone()
    new[:, :, 8:16, 16:20] = 3.0  # grown at the click
    new[:, :, 25:30, 25:30] = 2.0  # a far blob the click did not ask for
    first = PromptState(np.zeros((2, 0, 2)), np.zeros((2, 0), np.int64), np.array([[8, 8, 16, 16]] * 2), start="box")
    assert torch.equal(shown_logits(first, new, PromptConfig(local_corrections="always")), new)  # first prompt
    state = add_clicks(first, np.array([[[17.0, 12.0]], [[0.0, 0.0]]]), np.array([[1], [-1]]))
    state.mask_input = prev
    local = shown_logits(state, new, PromptConfig(local_corrections="with a box"))
    assert torch.equal(local[0, 0, 8:16, 16:20], new[0, 0, 8:16, 16:20])
    assert torch.equal(local[0, 0, 25:30, 25:30], prev[0, 0, 25:30, 25:30])
    assert torch.equal(local[1], prev[1])  # nothing left to correct (padding click): the mask stays
    assert torch.equal(shown_logits(state, new, PromptConfig()), new)  # off: the whole prediction
    points = PromptState(state.points, state.labels, None, prev, start="points1", new_clicks=1)
    assert torch.equal(shown_logits(points, new, PromptConfig(local_corrections="with a box")), new)
    assert not torch.equal(shown_logits(points, new, PromptConfig(local_corrections="always")), new)
    state.mask_input = None  # logits not fed back: as in the annotator and the evaluation, nothing to merge with
    assert torch.equal(shown_logits(state, new, PromptConfig(local_corrections="always")), new)
    with pytest.raises(ValueError, match="local_corrections"):
        PromptConfig(local_corrections="sometimes")


@pytest.mark.parametrize("flag, word, field, mode", [
    ("--local-corrections", "with-a-box", "local_corrections", "with a box"),
    ("--click-guard", "always", "click_guard", "always"),
])
def test_fit_option_reaches_the_config_and_keeps_older_runs_resumable(flag, word, field, mode):
    """``training.fit --local-corrections`` / ``--click-guard``: the annotator's mode reaches the prompt config."""
    from training.fit import build_parser, config_from_args

    cfg, _ = config_from_args(build_parser().parse_args(["--data", "x", "--preset", "pge-lite-fast", flag, word]))
    assert getattr(cfg.prompts, field) == mode
    cfg_off, _ = config_from_args(build_parser().parse_args(["--data", "x", "--preset", "pge-lite-fast"]))
    assert getattr(cfg_off.prompts, field) == "off"
    assert cfg_off.to_dict()["prompts"][field] == "off"  # recorded in the run's provenance
    assert cfg.fingerprint() != cfg_off.fingerprint()
    # runs started before the option existed still resume: tests/test_pge_head.py recomputes their fingerprint
