"""Focus crop (engine/focus_crop.py): planning, paste-back, and its use by segment_slice, propagation and the
evaluation. A coarse stand-in model shows why: it sees every image on a 16 x 16 grid, so a small object is lost in
the whole image and found in its enlarged crop."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from napari_robustmedsam.annotation.prompt_decoding import segment_slice
from napari_robustmedsam.annotation.propagation import predictor_segment_fn, propagate_object
from napari_robustmedsam.annotation.session import SlicePrompts
from napari_robustmedsam.engine.focus_crop import DEFAULT_FOCUS_CROP, CropPlan, FocusCrop, plan_crop, plan_crop_for_points
from napari_robustmedsam.engine.preprocessing import frame_for

GRID = 16  # the stand-in model's resolution: every image is seen as GRID x GRID cells


def small_object_image(size=256, y0=100, x0=100, h=6, w=10):
    img = np.zeros((size, size), np.float32)
    img[y0:y0 + h, x0:x0 + w] = 1.0
    return img


def embed(pixels):
    return SimpleNamespace(frame=frame_for(pixels.shape, "litemedsam"), pixels=np.asarray(pixels, np.float32))


class CoarseModel:
    """Segments the bright pixels inside the box, but only as whole cells of a GRID x GRID grid over the image it
    was given (a cell is on when most of its pixels inside the box are bright). Records every call."""

    def __init__(self):
        self.calls = []

    def predict(self, points=None, point_labels=None, boxes=None, mask_input=None, embedding=None,
                multimask_output=None, **extra):
        self.calls.append(SimpleNamespace(embedding=embedding, boxes=None if boxes is None else np.asarray(boxes),
                                          points=points, mask_input=mask_input))
        img = embedding.pixels
        h, w = img.shape
        inside = np.zeros((h, w), bool)
        if boxes is not None:
            x0, y0, x1, y1 = (int(round(v)) for v in np.asarray(boxes).reshape(4))
            inside[max(0, y0):y1, max(0, x0):x1] = True
        else:
            inside[:] = True
        bright = (img > 0.5) & inside
        out = np.zeros((h, w), bool)
        ys = np.linspace(0, h, GRID + 1).astype(int)
        xs = np.linspace(0, w, GRID + 1).astype(int)
        for a, b in zip(ys[:-1], ys[1:]):
            for c, d in zip(xs[:-1], xs[1:]):
                cell = inside[a:b, c:d]
                if cell.any() and bright[a:b, c:d][cell].mean() > 0.5:
                    out[a:b, c:d] = True
        return SimpleNamespace(masks=out[None], scores=np.array([0.9]), low_res_logits=torch.zeros(1, 1, 256, 256))


def dice(a, b):
    return 2 * (a & b).sum() / max(1, a.sum() + b.sum())


# ---- planning and geometry -----------------------------------------------------------------------
def test_plan_is_three_box_sides_centred_on_the_box_at_least_min_side_and_only_for_small_objects():
    plan = plan_crop([100, 100, 110, 106], (256, 256))
    # longer side 10 -> 3 x 10 = 30 < 32 px: a 32 px square centred on (105, 103)
    assert plan == CropPlan(87, 119, 89, 121, (256, 256))
    assert plan_crop([100, 100, 110, 106], (256, 256)) == plan  # a function of the box: later clicks share it
    big = plan_crop([50, 50, 90, 70], (256, 256))  # 40 px: 3 x 40 = 120 px
    assert big.shape == (120, 120) and (big.x0, big.y0) == (10, 0)  # clipped to the image at the top
    assert plan_crop([0, 0, 70, 10], (256, 256)) is None  # 70 > 0.25 x 256: not small
    assert plan_crop([0, 0, 70, 10], (256, 256), FocusCrop(max_object_share=0.3)) is not None
    assert plan_crop([0, 0, 20, 20], (40, 40), FocusCrop(max_object_share=1.0)) is None  # the crop is the image
    assert plan_crop([100, 100, 110, 106], (256, 256), None) is None
    with pytest.raises(ValueError, match="context"):
        FocusCrop(context=0.5)
    with pytest.raises(ValueError, match="max_object_share"):
        FocusCrop(max_object_share=0)


def test_points_boxes_and_masks_move_between_the_image_and_the_crop():
    plan = CropPlan(87, 119, 89, 121, (256, 256))
    np.testing.assert_allclose(plan.points_to_crop([[105.0, 103.0]]), [[16.0, 16.0]])
    np.testing.assert_allclose(plan.box_to_crop([100, 100, 110, 106]), [11, 13, 21, 19])
    assert plan.contains_points([[89, 87], [120.5, 118.9]]) and not plan.contains_points([[121, 100]])
    crop_mask = np.zeros(plan.shape, bool)
    crop_mask[13:19, 11:21] = True
    full = plan.paste(crop_mask)
    assert full.shape == (256, 256) and full.sum() == 60 and full[100:106, 100:110].all()
    np.testing.assert_array_equal(plan.crop(full), crop_mask)
    with pytest.raises(ValueError, match="does not fit"):
        plan.paste(np.zeros((5, 5), bool))


# ---- segment_slice --------------------------------------------------------------------------------
def test_segment_slice_decodes_a_small_box_in_its_crop_and_pastes_the_mask_back():
    img = small_object_image()
    truth = img > 0.5
    model, crops = CoarseModel(), []

    def embed_crop(plan):
        crops.append(plan)
        return embed(plan.crop(img))

    box = SlicePrompts(box=np.array([100.0, 100.0, 110.0, 106.0]))
    whole = segment_slice(model, embed(img), box)
    assert whole.crop is None and dice(whole.mask, truth) < 0.5  # the object is lost in 16 px cells
    result = segment_slice(model, embed(img), box, focus_crop=DEFAULT_FOCUS_CROP, embed_crop=embed_crop)
    assert crops == [plan_crop(box.box, img.shape)] and result.crop == crops[0]
    np.testing.assert_allclose(model.calls[-1].boxes, crops[0].box_to_crop(box.box))  # decoded in the crop frame
    assert result.mask.shape == img.shape and dice(result.mask, truth) > 0.75
    np.testing.assert_allclose(result.prompts.box, box.box)  # what was sent, in the image's pixels

    # a corrective click in the same crop feeds the crop-frame logits back
    click = SlicePrompts(points=[[104.0, 102.0]], labels=[1], box=box.box)
    again = segment_slice(model, embed(img), click, previous_prompts=result.prompts, previous_logits=result.logits,
                          previous_mask=result.mask, previous_crop=result.crop, focus_crop=DEFAULT_FOCUS_CROP,
                          embed_crop=embed_crop)
    assert again.crop == result.crop and again.used_previous_logits
    assert model.calls[-1].mask_input is result.logits
    np.testing.assert_allclose(model.calls[-1].points, [[15.0, 15.0]])
    # logits of the whole slice are not fed into the crop: the previous mask, cropped, is the mask prompt
    segment_slice(model, embed(img), click, previous_prompts=whole.prompts, previous_logits=whole.logits,
                  previous_mask=result.mask, previous_crop=None, focus_crop=DEFAULT_FOCUS_CROP, embed_crop=embed_crop)
    sent = model.calls[-1].mask_input
    assert sent is not whole.logits and float(sent.max()) > 0  # the previous mask's cells are positive


def test_point_starts_large_boxes_and_clicks_outside_the_crop_use_the_whole_slice():
    img = small_object_image()
    model, crops = CoarseModel(), []

    def embed_crop(plan):
        crops.append(plan)
        return embed(plan.crop(img))

    kw = dict(focus_crop=DEFAULT_FOCUS_CROP, embed_crop=embed_crop)
    assert segment_slice(model, embed(img), SlicePrompts(points=[[105.0, 103.0]], labels=[1]), **kw).crop is None
    assert segment_slice(model, embed(img), SlicePrompts(box=np.array([10.0, 10.0, 200.0, 200.0])), **kw).crop is None
    far = SlicePrompts(points=[[200.0, 200.0]], labels=[0], box=np.array([100.0, 100.0, 110.0, 106.0]))
    assert segment_slice(model, embed(img), far, **kw).crop is None
    assert crops == []


# ---- propagation ----------------------------------------------------------------------------------
def test_propagation_decodes_each_small_slice_in_the_crop_of_its_prompt_box():
    vol = np.stack([small_object_image(h=6 + z % 2, w=10) for z in range(5)])
    truth = vol > 0.5
    model, crops = CoarseModel(), []

    class Slices:
        def get(self, z):
            return embed(vol[z])

    def embed_crop(z, plan):
        crops.append((z, plan))
        return embed(plan.crop(vol[z]))

    plain = propagate_object(predictor_segment_fn(model, Slices()), 5, {2: truth[2]}, min_score=0)
    focused = propagate_object(predictor_segment_fn(model, Slices(), focus_crop=DEFAULT_FOCUS_CROP,
                                                    embed_crop=embed_crop), 5, {2: truth[2]}, min_score=0,
                               iou_threshold=0.3)
    assert not plain.masks[[0, 1, 3, 4]].any()  # lost in the whole slice: propagation stops at once
    assert sorted(z for z, _ in crops) == [0, 1, 3, 4]
    for z, plan in crops:
        assert plan == plan_crop(focused.slices[z].prompt.box, truth[z].shape)
    assert focused.masks.reshape(5, -1).any(axis=1).all() and dice(focused.masks, truth) > 0.6


def test_propagation_feeds_crop_logits_back_only_into_the_same_crop():
    img = small_object_image()
    model = CoarseModel()
    seg = predictor_segment_fn(model, SimpleNamespace(get=lambda z: embed(img)), focus_crop=DEFAULT_FOCUS_CROP,
                               embed_crop=lambda z, plan: embed(plan.crop(img)))
    box = np.array([100.0, 100.0, 110.0, 106.0])
    mask, logits, _ = seg(0, box, None, None, img > 0.5)
    seg(1, box, None, None, mask, logits)  # the same box: the same crop
    assert model.calls[-1].mask_input is logits
    seg(1, box + [2, 0, 12, 4], None, None, mask, logits)  # another crop: the neighbour's mask instead
    assert model.calls[-1].mask_input is not logits and model.calls[-1].mask_input.shape == (1, 1, 256, 256)
    outside = torch.zeros(1, 1, 256, 256)  # logits from elsewhere count as the whole slice's
    seg(1, box, None, None, mask, outside)
    assert model.calls[-1].mask_input is not outside


# ---- evaluation -------------------------------------------------------------------------------------
def test_evaluation_flag_enters_the_protocol_hash_only_when_on_and_only_for_box_starts():
    from training.evaluate import _config, build_parser
    from training.evaluation.runner import EvalConfig

    off = EvalConfig()
    # the hashes before the focus crop existed: earlier runs stay resumable (the iterative modes' changed once, when
    # their steps moved onto the annotator's segment_slice)
    assert off.protocol("box") == "52ae8f83ee" and off.protocol("iter_box") == "94faf308d9"
    assert off.protocol("propagate_3d") == "5e318b2265" and off.protocol("propagate_3d_plus3") == "993604adec"
    on = EvalConfig(focus_crop=True)
    for prompt in ("box", "box_jitter", "iter_box", "propagate_3d", "propagate_3d_plus3"):
        assert on.protocol(prompt) != off.protocol(prompt)
    assert on.protocol("iter_point") == off.protocol("iter_point") == "c17405a8da"  # point starts: no crop
    assert on.protocol("points3") == off.protocol("points3")
    parser = build_parser()
    assert _config(parser.parse_args(["--data", "d", "--focus-crop", "on"])).focus_crop
    assert not _config(parser.parse_args(["--data", "d"])).focus_crop  # the papers' protocol: no crop
    # the annotator's default (docs/results/focus-crop/results.md), unless said otherwise
    assert _config(parser.parse_args(["--data", "d", "--policy", "annotator"])).focus_crop
    assert not _config(parser.parse_args(["--data", "d", "--policy", "annotator", "--focus-crop", "off"])).focus_crop


def test_evaluation_box_and_clicks_of_a_small_object_use_its_crop():
    from training.evaluation.dataset import GTObject
    from training.evaluation.runner import EvalConfig, run_prompt_mode

    img = small_object_image()
    obj = GTObject("label1", img > 0.5)
    model, crops = CoarseModel(), []

    def embed_crop(plan):
        crops.append(plan)
        return embed(plan.crop(img))

    off = EvalConfig(steps=2)
    on = EvalConfig(steps=2, focus_crop=True)
    box_off = run_prompt_mode(model, embed(img), [obj], "box", "s", off, img)
    box_on = run_prompt_mode(model, embed(img), [obj], "box", "s", on, img, embed_crop)
    assert box_on[0]["dice"] > 0.75 > 0.5 > box_off[0]["dice"] and len(crops) == 1
    iter_on = run_prompt_mode(model, embed(img), [obj], "iter_box", "s", on, img, embed_crop)
    assert iter_on[-1]["dice"] > 0.75
    assert all(c.embedding.frame.original_size == crops[0].shape for c in model.calls[-len(iter_on):])
    with pytest.raises(ValueError, match="embed_crop"):
        run_prompt_mode(model, embed(img), [obj], "box", "s", on, img)


def test_a_point_starts_crop_is_sized_by_its_first_mask_and_holds_its_points():
    mask = np.zeros((256, 256), bool)
    assert plan_crop_for_points(mask, [[100, 100]], mask.shape) is None  # nothing to size the crop by
    mask[100:106, 100:110] = True
    plan = plan_crop_for_points(mask, [[104, 103]], mask.shape)
    assert plan == plan_crop([100, 100, 110, 106], mask.shape)
    # a point outside the mask widens the box, and the crop still holds it
    assert plan_crop_for_points(mask, [[104, 103], [130, 103]], mask.shape).contains_points([[130, 103]])
    big = np.zeros((256, 256), bool)
    big[20:200, 20:200] = True
    assert plan_crop_for_points(big, [[100, 100]], big.shape) is None  # not small
    assert plan_crop_for_points(mask, [[104, 103]], mask.shape, None) is None


def test_evaluation_point_starts_use_the_crop_only_with_focus_points():
    from training.evaluation.dataset import GTObject
    from training.evaluation.runner import EvalConfig, run_prompt_mode

    img = small_object_image(y0=96, x0=96, h=24, w=28)  # big enough for a coarse mask on the whole image
    obj = GTObject("label1", img > 0.5)
    model, crops = CoarseModel(), []

    def embed_crop(plan):
        crops.append(plan)
        return embed(plan.crop(img))

    crop_only = EvalConfig(steps=2, focus_crop=True)
    both = EvalConfig(steps=2, focus_crop=True, focus_points=True)
    assert crop_only.protocol("points3") == EvalConfig().protocol("points3")  # earlier runs keep their hash
    assert both.protocol("points3") != crop_only.protocol("points3")
    assert both.protocol("iter_point") != crop_only.protocol("iter_point")
    assert both.protocol("box") == crop_only.protocol("box")
    assert EvalConfig(focus_points=True).protocol("points3") == EvalConfig().protocol("points3")  # needs the crop
    plain = run_prompt_mode(model, embed(img), [obj], "points3", "s", crop_only, img, embed_crop)
    assert not crops
    zoomed = run_prompt_mode(model, embed(img), [obj], "points3", "s", both, img, embed_crop)
    assert len(crops) == 1 and zoomed[0]["dice"] > plain[0]["dice"]
    steps = run_prompt_mode(model, embed(img), [obj], "iter_point", "s", both, img, embed_crop)
    assert len(crops) == 2  # one crop for the point start, sized by its first mask
    # the point start (after its first pass) and every click are decoded in that crop
    assert all(c.embedding.frame.original_size == crops[1].shape for c in model.calls[-len(steps):])
    assert steps[-1]["dice"] >= zoomed[0]["dice"] - 0.05


def test_evaluation_click_outside_an_objects_crop_is_decoded_on_the_whole_image():
    from training.evaluation.dataset import GTObject
    from training.evaluation.runner import EvalConfig, run_prompt_mode

    img = small_object_image(y0=96, x0=96, h=24, w=28)
    truth = img > 0.5
    truth[200:210, 20:30] = True  # a part of the object the model cannot see, far outside the first mask's crop
    obj = GTObject("label1", truth)
    model = CoarseModel()
    cfg = EvalConfig(steps=2, focus_crop=True, focus_points=True)
    rows = run_prompt_mode(model, embed(img), [obj], "iter_point", "s", cfg, img, lambda plan: embed(plan.crop(img)))
    assert len(rows) == 3  # the run went on instead of stopping at the click outside the crop
    assert model.calls[-1].embedding.frame.original_size == img.shape and model.calls[-1].mask_input is not None


def test_evaluation_point_second_pass_feeds_the_first_logits_back_only_when_on():
    from training.evaluation.dataset import GTObject
    from training.evaluation.runner import EvalConfig, run_prompt_mode

    img = small_object_image(y0=96, x0=96, h=24, w=28)
    obj = GTObject("label1", img > 0.5)
    on, off = EvalConfig(steps=1, point_second_pass=True), EvalConfig(steps=1)
    assert on.protocol("points3") != off.protocol("points3") and on.protocol("iter_point") != off.protocol("iter_point")
    assert on.protocol("box") == off.protocol("box") and on.protocol("iter_box") == off.protocol("iter_box")
    for prompt, calls_off in (("points3", 1), ("iter_point", 2)):
        model = CoarseModel()
        run_prompt_mode(model, embed(img), [obj], prompt, "s", off, img)
        assert len(model.calls) == calls_off and model.calls[0].mask_input is None
        model = CoarseModel()
        run_prompt_mode(model, embed(img), [obj], prompt, "s", on, img)
        first, second = model.calls[:2]
        assert first.mask_input is None and second.mask_input is not None and second.boxes is None
        assert np.array_equal(np.asarray(second.points), np.asarray(first.points))
        assert len(model.calls) == calls_off + 1


# ---- annotator controller ------------------------------------------------------------------------
class SliceStandIn:
    """The controller's SliceEmbeddings over a (Z, H, W) volume, with the stand-in model."""

    def __init__(self, volume, model):
        self.volume, self.predictor, self.crops = volume, model, {}
        self.n_slices, self.plane_shape = volume.shape[0], volume.shape[1:]

    def has(self, z):
        return True

    def get(self, z):
        return embed(self.volume[z])

    def slice_image(self, z):
        return self.volume[z]

    def has_crop(self, z, plan):
        return (z, plan) in self.crops

    def crop(self, z, plan):
        return self.crops.setdefault((z, plan), embed(plan.crop(self.volume[z])))


def zoom_controller(volume, model):
    import contextlib

    from napari_robustmedsam.annotation.controller import AnnotationController, AnnotatorSettings
    from test_annotation_controller import ManualTimer, View, Workers

    view, workers = View(volume.shape), Workers()
    view.options = AnnotatorSettings(local_corrections="off", click_guard="off", zoom_small_objects=True,
                                     min_score=0.0, iou_threshold=0.3)
    ctl = AnnotationController(view, workers, lambda i, c: ManualTimer(i, c), decode_context=contextlib.nullcontext)
    ctl.open_image(volume.shape if volume.shape[0] > 1 else volume.shape[1:])
    slices = SliceStandIn(volume, model)
    ctl.set_embeddings(slices)
    return ctl, view, workers, slices


def test_annotator_zoom_embeds_the_crop_in_a_worker_then_decodes_in_it_and_says_so():
    from napari_robustmedsam.annotation.controller import AnnotatorSettings

    img = small_object_image()
    model = CoarseModel()
    ctl, view, workers, slices = zoom_controller(img[None], model)
    box = np.array([100.0, 100.0, 110.0, 106.0])
    view.prompts[0] = SlicePrompts(box=box)
    ctl.segment(0)
    # the crop is embedded off the GUI thread first: nothing decoded yet
    assert len(workers.queue) == 1 and workers.queue[0][4] == "embed" and model.calls == []
    assert "Zooming" in view.status
    workers.finish()
    plan = plan_crop(box, img.shape)
    assert list(slices.crops) == [(0, plan)] and model.calls[-1].embedding is slices.crops[(0, plan)]
    assert "zoomed: object is small" in view.status
    assert dice(ctl.session.plane(ctl.session.current, 0), img > 0.5) > 0.75
    # a corrective click: the same crop (already embedded, no worker), the crop-frame logits fed back
    logits = ctl.session.current_logits[0]
    view.prompts[0] = SlicePrompts(points=[[104.0, 102.0]], labels=[1], box=box)
    ctl.segment(0)
    assert not workers.queue and model.calls[-1].mask_input is logits
    # zoom off: the whole slice, and the crop-frame logits are not fed into it
    view.options = AnnotatorSettings(local_corrections="off", click_guard="off", zoom_small_objects=False)
    logits = ctl.session.current_logits[0]
    view.prompts[0] = SlicePrompts(points=[[104.0, 102.0], [105.0, 103.0]], labels=[1, 1], box=box)
    ctl.segment(0)
    assert model.calls[-1].embedding.frame.original_size == img.shape
    assert model.calls[-1].mask_input is not logits and "zoomed" not in view.status


def test_annotator_propagation_zooms_on_small_slices_and_remembers_their_frames():
    vol = np.stack([small_object_image(h=6 + z % 2, w=10) for z in range(5)])
    model = CoarseModel()
    ctl, view, workers, slices = zoom_controller(vol, model)
    box = np.array([100.0, 100.0, 110.0, 106.0])
    view.prompts[2] = SlicePrompts(box=box)
    ctl.segment(2)
    workers.finish()  # the seed's crop
    assert "zoomed" in view.status
    ctl.propagation.propagate()
    assert workers.queue[-1][4] == "propagate"
    workers.finish()
    assert {z for z, _ in slices.crops} == {0, 1, 2, 3, 4}  # every small slice decoded in its crop
    assert ctl.session.current.reshape(5, -1).any(axis=1).all()
    for z in (0, 1, 3, 4):  # a click there feeds back crop-frame logits only into the same crop
        assert ctl.previous_crop(z) is not None and (z, ctl.previous_crop(z)) in slices.crops
