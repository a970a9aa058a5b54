"""The box check of a head that carries a base model: for a box alone, the base model's mask is shown where it scores
its own mask higher than the head's by more than the margin; points, masks and clicks stay the head's."""

from __future__ import annotations

import numpy as np
import pytest

from napari_robustmedsam.annotation.prompt_decoding import BOX_CHECK_HINT
from napari_robustmedsam.checkpoints import load_model
from napari_robustmedsam.engine.predictor import Predictor
from napari_robustmedsam.models import registry
from napari_robustmedsam.sample_data import mri_phantom
from training.evaluation.runner import load_model_handle, parse_box_check


@pytest.fixture(scope="module")
def head_and_base():
    head = Predictor.from_loaded(load_model("robust-lite", device="cpu", progress=False))
    base = Predictor.from_loaded(load_model("litemedsam", device="cpu", progress=False))
    image, labels = mri_phantom(seed=3)
    head.set_image(image)
    base.set_image(image)
    return head, base, image, labels


def _boxes(labels: np.ndarray) -> np.ndarray:
    boxes = []
    for oid in np.unique(labels)[1:]:
        ys, xs = np.nonzero(labels == oid)
        boxes.append([xs.min(), ys.min(), xs.max(), ys.max()])
    # a loose box and a box over background too, so that the two models disagree somewhere
    h, w = labels.shape
    boxes += [[w * 0.1, h * 0.1, w * 0.6, h * 0.6], [2, 2, w // 5, h // 5]]
    return np.asarray(boxes, float)


def test_a_box_alone_shows_the_base_models_mask_where_it_scores_higher(head_and_base):
    head, base, _image, labels = head_and_base
    boxes = _boxes(labels)
    model = head.model
    try:
        model.set_box_check(None)
        own = head.predict(boxes=boxes)
        theirs = base.predict(boxes=boxes)
        assert not own.base_preferred.any()
        # a margin between the score differences, so that some boxes swap and some do not
        gaps = np.sort(theirs.scores - own.scores)
        margin = max(0.0, float(gaps[len(gaps) // 2 - 1] + gaps[len(gaps) // 2]) / 2)
        model.set_box_check(margin)
        checked = head.predict(boxes=boxes)
        higher = (theirs.scores - own.scores > margin) & own.masks.reshape(len(boxes), -1).any(1)
        assert higher.any() and not higher.all(), "the case needs both outcomes to test anything"
        np.testing.assert_array_equal(checked.base_preferred, higher)
        for i, swapped in enumerate(higher):
            expected = theirs if swapped else own
            np.testing.assert_array_equal(checked.masks[i], expected.masks[i])
            assert checked.scores[i] == pytest.approx(expected.scores[i], abs=1e-5)
        model.set_box_check(1.0)  # no predicted IoU is higher by more than 1
        assert not head.predict(boxes=boxes).base_preferred.any()
    finally:
        model.set_box_check(registry.MODELS["robust-lite"].box_check)


def test_points_and_mask_prompts_stay_the_heads(head_and_base):
    head, _base, _image, labels = head_and_base
    model = head.model
    boxes = _boxes(labels)
    centre = boxes[:, :2] + (boxes[:, 2:] - boxes[:, :2]) / 2
    try:
        model.set_box_check(None)
        with_points = head.predict(points=centre[:, None, :], boxes=boxes)
        first = head.predict(boxes=boxes)
        with_mask = head.predict(boxes=boxes, mask_input=first.low_res_logits)
        model.set_box_check(0.0)
        np.testing.assert_array_equal(head.predict(points=centre[:, None, :], boxes=boxes).masks, with_points.masks)
        again = head.predict(boxes=boxes, mask_input=first.low_res_logits)
        np.testing.assert_array_equal(again.masks, with_mask.masks)
        assert not again.base_preferred.any()
    finally:
        model.set_box_check(registry.MODELS["robust-lite"].box_check)


def test_the_status_line_says_when_the_base_models_mask_is_shown(head_and_base):
    """Through the annotator's own decode (segment_slice): a box LiteMedSAM takes over says so; a click after it is
    the head's, with no such hint."""
    from napari_robustmedsam.annotation.prompt_decoding import segment_slice
    from napari_robustmedsam.annotation.session import SlicePrompts

    head, _base, image, labels = head_and_base
    model = head.model
    boxes = _boxes(labels)
    try:
        model.set_box_check(0.0)
        swapped = np.flatnonzero(head.predict(boxes=boxes).base_preferred)
        assert swapped.size
        box = boxes[int(swapped[0])]
        shown = segment_slice(head, head.embedding, SlicePrompts(box=box), model_name="robust-lite", image=image)
        assert shown.hint == BOX_CHECK_HINT.format(name="robust-lite")
        x, y = (box[:2] + box[2:]) / 2
        clicked = segment_slice(head, head.embedding, shown.prompts.with_point(x, y, 1), previous_prompts=shown.prompts,
                                previous_logits=shown.logits, previous_mask=shown.mask, model_name="robust-lite",
                                image=image)
        assert "box check" not in clicked.hint
        model.set_box_check(None)
        assert segment_slice(head, head.embedding, SlicePrompts(box=box), model_name="robust-lite", image=image).hint == ""
    finally:
        model.set_box_check(registry.MODELS["robust-lite"].box_check)


def test_the_check_needs_a_base_model_and_a_valid_margin(litemedsam):
    model = litemedsam.model
    model.set_box_check(0.0)
    try:
        assert model.box_check_margin is None  # no base model: nothing to check against
    finally:
        model.set_box_check(None)
    for bad in (-0.1, float("nan")):
        with pytest.raises(ValueError, match="box check margin"):
            model.set_box_check(bad)


def test_each_head_opens_with_its_registry_setting_and_the_evaluation_can_override_it():
    for name in ("robust-lite", "robust-lite-permissive"):
        assert registry.MODELS[name].box_check == registry.HEAD_BOX_CHECK.get(name)
        assert load_model(name, device="cpu", progress=False).model.box_check_margin == registry.HEAD_BOX_CHECK.get(name)
    handle = load_model_handle("robust-lite", "cpu", parse_box_check("higher+0.05"))
    assert handle.loaded.model.box_check_margin == pytest.approx(0.05) and handle.key.endswith(":box-check0.05")
    off = load_model_handle("robust-lite", "cpu", parse_box_check("off"))
    assert off.loaded.model.box_check_margin is None and "box-check" not in off.key
    assert parse_box_check("own") is None and parse_box_check("higher") == 0.0
    with pytest.raises(ValueError, match="--box-check"):
        parse_box_check("sometimes")


def test_the_registry_turns_the_check_on_only_where_its_rule_chose_it():
    """docs/results/shipped-heads/box-check.md: robust-lite-permissive with a margin of 0.05, the others off."""
    assert registry.HEAD_BOX_CHECK == {"robust-lite-permissive": 0.05}
    assert registry.MODELS["robust-lite"].box_check is None and registry.MODELS["pge-lite-fast"].box_check is None


def test_info_and_the_model_panel_rows_say_which_head_checks_its_boxes():
    from napari_robustmedsam.annotation.model_info import registry_rows
    from napari_robustmedsam.checkpoints.inspect import describe_checkpoint, render_description

    assert "box check: on, margin 0.05" in render_description(describe_checkpoint("robust-lite-permissive"))
    assert "box check" not in render_description(describe_checkpoint("robust-lite"))
    assert dict(registry_rows("robust-lite-permissive"))["box check"].startswith("on:")
    assert "box check" not in dict(registry_rows("robust-lite"))
