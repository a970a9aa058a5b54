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
