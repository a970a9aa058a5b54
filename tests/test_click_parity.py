"""The evaluation's iterative modes do what the annotator does: one user's box or point start and corrective clicks,
driven once through ``training.evaluate``'s ``iter_box`` / ``iter_point`` (``--policy annotator``) and once through
the annotator's controller (no viewer) with the real LiteMedSAM, give the same mask after every click.

LiteMedSAM is box-trained, so the annotator sends a point start's clicks with the box of the mask shown; the
evaluation's own copy of the click path once sent points only, and its point-start figures were not the
annotator's. A small nucleus covers the focus crop (zoom) too."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

from napari_robustmedsam.annotation.controller import AnnotationController, AnnotatorSettings
from napari_robustmedsam.annotation.prompt_decoding import zoom_default
from napari_robustmedsam.annotation.session import SlicePrompts
from napari_robustmedsam.annotation.slice_embeddings import SliceEmbeddings
from napari_robustmedsam.engine.predictor import Predictor
from napari_robustmedsam.prompting import corrective_click, random_positive_points, rng_for, tight_box
from test_annotation_controller import ManualTimer, View, Workers
from training.evaluate import _config, build_parser
from training.evaluation.dataset import discover, select_objects
from training.evaluation.runner import run_prompt_mode

STEPS = 3


def annotator_masks(loaded, predictor, image, obj, prompt, cfg, sample_key):
    """The masks the annotator shows after the start and each of ``STEPS`` clicks of the evaluation's user (the
    centre of the largest error region, as ``--click-strategy center``)."""
    view, workers, timers = View(image.shape[:2]), Workers(), []
    view.model = loaded
    policy = cfg.click_policy
    view.options = AnnotatorSettings(local_corrections=policy.local_corrections, click_guard=policy.click_guard,
                                     click_refinement=policy.click_refinement,
                                     zoom_small_objects=zoom_default(loaded.name))
    ctl = AnnotationController(view, workers, lambda ms, cb: timers.append(ManualTimer(ms, cb)) or timers[-1],
                               decode_context=contextlib.nullcontext)
    ctl.open_image(image.shape[:2])
    embeddings = SliceEmbeddings(predictor, image, "2d")
    embeddings.get(0)
    ctl.set_embeddings(embeddings)
    if prompt == "iter_box":
        view.prompts[0] = SlicePrompts(box=tight_box(obj.mask))
    else:
        point = random_positive_points(obj.mask, 1, rng_for(cfg.seed, sample_key, obj.object_id, "points1"))
        view.prompts[0] = SlicePrompts(point, np.ones(1, np.int64))

    def decode():
        ctl.segment(0)
        while workers.queue:
            workers.finish()
        assert not view.errors, view.errors
        return ctl.session.plane(ctl.session.current, 0).copy()

    masks = [decode()]
    for step in range(1, STEPS + 1):
        click = corrective_click(obj.mask, masks[-1], "center", rng_for(cfg.seed, sample_key, obj.object_id, prompt,
                                                                       step))
        if click is None:
            break
        view.prompts[0] = view.prompts[0].with_point(click.x, click.y, click.label)
        masks.append(decode())
    return masks


def dice(a, b):
    return 2 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum())


@pytest.mark.parametrize("dataset, prompt", [("acdc_cardiac_mri", "iter_point"), ("acdc_cardiac_mri", "iter_box"),
                                             ("dsb2018_nuclei", "iter_box")])
def test_the_evaluations_clicks_are_the_annotators(shared_data, litemedsam, dataset, prompt):
    cfg = _config(build_parser().parse_args(["--data", "d", "--policy", "annotator", "--steps", str(STEPS)]))
    info = next(d for d in discover(shared_data / "medseg") if d.name == dataset)
    sample = info.samples[0]
    image, labels = sample.load()
    objects = select_objects(labels, sample.key, cfg.seed, cfg.objects, cfg.min_object_px, cfg.max_objects)
    obj = min(objects, key=lambda o: o.size) if dataset == "dsb2018_nuclei" else objects[0]
    predictor = Predictor.from_loaded(litemedsam)
    assert predictor.box_primary  # the case the evaluation's own copy got wrong
    model_cfg = cfg.for_model(type("Handle", (), {"loaded": litemedsam})())
    emb = predictor.compute_embedding(image)
    crops = []

    def embed_crop(plan):
        crops.append(plan)
        return predictor.compute_embedding(np.ascontiguousarray(plan.crop(image)))

    rows = run_prompt_mode(predictor, emb, [obj], prompt, sample.key, model_cfg, image, embed_crop)
    ui = annotator_masks(litemedsam, predictor, image, obj, prompt, cfg, sample.key)
    assert len(rows) == STEPS + 1 and len(ui) == STEPS + 1  # every click found an error to correct
    if dataset == "dsb2018_nuclei":
        assert crops  # the small nucleus was zoomed, in both
    for row, mask in zip(rows, ui):
        assert row["dice"] == pytest.approx(dice(obj.mask, mask), abs=1e-12), f"step {row['step']}"


class BoxTrained:
    """A stand-in box-trained model: from points alone a small square at the first point, from a box the square
    of side 12 at (8, 8); records each call's box and mask prompt."""

    box_primary = True

    def __init__(self, empty_from_points=False):
        self.calls, self.empty_from_points = [], empty_from_points

    def predict(self, points=None, point_labels=None, boxes=None, mask_input=None, embedding=None, **kw):
        from types import SimpleNamespace

        import torch

        self.calls.append(SimpleNamespace(boxes=boxes, mask_input=mask_input, kw=kw))
        mask = np.zeros((32, 32), bool)
        if boxes is not None:
            mask[8:20, 8:20] = True
        elif not self.empty_from_points:
            x, y = (int(v) for v in np.asarray(points).reshape(-1, 2)[0])
            mask[y - 1:y + 2, x - 1:x + 2] = True
        logits = torch.where(torch.from_numpy(mask), 4.0, -4.0)[None, None]
        return SimpleNamespace(masks=mask[None], low_res_logits=logits, scores=np.array([0.9]))


def stand_in_embedding():
    from types import SimpleNamespace

    import torch

    return SimpleNamespace(frame=SimpleNamespace(original_size=(32, 32),
                                                 mask_to_low_res=lambda m: torch.zeros(1, 1, 32, 32)))


def test_a_box_trained_models_point_start_is_decoded_again_with_its_masks_box():
    """docs/results/click-refinement/point-then-box.md: the point start's first mask gives the box of a second
    decode, and the clicks after it are corrections sent with that box."""
    from napari_robustmedsam.annotation.prompt_decoding import segment_slice

    model, emb = BoxTrained(), stand_in_embedding()
    start = segment_slice(model, emb, SlicePrompts([[12.0, 12.0]], [1]), box_primary=True)
    assert len(model.calls) == 2 and model.calls[0].boxes is None
    np.testing.assert_allclose(model.calls[1].boxes, [11, 11, 14, 14])  # around the first mask and the point
    assert start.mask.sum() == 144 and start.prompts.box is not None and start.hint  # the hint still says: a box
    click = segment_slice(model, emb, SlicePrompts([[12.0, 12.0], [25.0, 25.0]], [1, 1]), previous_prompts=start.prompts,
                          previous_logits=start.logits, previous_mask=start.mask, box_primary=True)
    np.testing.assert_allclose(model.calls[-1].boxes, start.prompts.box)
    assert click.used_previous_logits and model.calls[-1].mask_input is start.logits
    # a model that takes points, or a first mask that is empty: one decode, as before
    for model, box_primary in ((BoxTrained(), False), (BoxTrained(empty_from_points=True), True)):
        segment_slice(model, emb, SlicePrompts([[12.0, 12.0]], [1]), box_primary=box_primary)
        assert len(model.calls) == 1
