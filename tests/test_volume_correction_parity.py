"""The evaluation's ``propagate_3d_correct3`` does what the annotator does: the same box, propagation, corrections
and re-propagations, driven once through :func:`training.evaluation.volume_modes.correct_masks` and once through
the annotator's controller (no viewer), give the same masks after every step and send the model the same mask
prompts."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from napari_robustmedsam.annotation.controller import AnnotationController, AnnotatorSettings
from napari_robustmedsam.annotation.session import SlicePrompts
from napari_robustmedsam.prompting import corrective_click, tight_box
from test_annotation_controller import ManualTimer, View, Workers
from training.evaluation.runner import EvalConfig
from training.evaluation.volume_modes import correct_masks, largest_error_slice
from volume_stand_ins import StandInSlices, StandInVolumeModel


class RecordingModel(StandInVolumeModel):
    """The stand-in, recording every click's slice and mask prompt."""

    def __init__(self, gt):
        super().__init__(gt, miss_corner=True)
        self.click_prompts = []

    def predict(self, points=None, embedding=None, mask_input=None, **kw):
        if points is not None:
            self.click_prompts.append((embedding.z, None if mask_input is None else mask_input.clone()))
        return super().predict(points=points, embedding=embedding, mask_input=mask_input, **kw)


class Embeddings(StandInSlices):
    """The controller's view of the slice embeddings, over the stand-in slices."""

    def __init__(self, n_slices, predictor):
        super().__init__(n_slices)
        self.predictor, self.n_slices, self.plane_shape = predictor, n_slices, (32, 32)

    def has(self, z):
        return True

    def slice_image(self, z):
        return self.volume[z]


def finish(workers):
    while workers.queue:
        workers.finish()


def annotator_steps(gt, cfg, n_steps):
    """The same user as ``correct_masks``: a tight box on the central labelled slice, Propagate, then on the slice
    with the most wrong voxels a box (no mask there) or a click at the centre of its largest error, each followed
    by the automatic re-propagation. Returns the masks after each step and the model's click prompts."""
    model = RecordingModel(gt)
    view, workers, timers = View(gt.shape), Workers(), []
    policy = cfg.click_policy
    view.model.box_primary = True
    view.options = AnnotatorSettings(local_corrections=policy.local_corrections, click_guard=policy.click_guard,
                                     click_refinement=policy.click_refinement, zoom_small_objects=False)
    ctl = AnnotationController(view, workers, lambda ms, cb: timers.append(ManualTimer(ms, cb)) or timers[-1],
                               decode_context=contextlib.nullcontext)
    ctl.open_image(gt.shape)
    ctl.set_embeddings(Embeddings(gt.shape[0], model))
    zs = np.flatnonzero(gt.reshape(gt.shape[0], -1).any(1))
    zc = int(zs[len(zs) // 2])
    view.prompts[zc] = SlicePrompts(box=tight_box(gt[zc]))
    ctl.segment(zc)
    finish(workers)
    ctl.propagation.propagate()
    finish(workers)
    steps = [ctl.session.current.copy()]
    for _ in range(n_steps):
        current = steps[-1]
        z = largest_error_slice(current, gt, set())
        assert current[z].any() and gt[z].any() or not current[z].any()  # no "mark end" in these volumes
        if not current[z].any():
            view.prompts[z] = SlicePrompts(box=tight_box(gt[z]))
        else:
            click = corrective_click(gt[z], current[z], "center")
            view.prompts[z] = view.slice_prompts(z).with_point(click.x, click.y, click.label)
        ctl.segment(z)
        finish(workers)
        assert ctl.propagation.repropagate_timer.isActive()
        ctl.propagation.repropagate_timer.fire()
        finish(workers)
        steps.append(ctl.session.current.copy())
    return steps, model.click_prompts


@pytest.mark.parametrize("first, last", [(3, 5), (1, 7)])
def test_the_evaluations_corrections_are_the_annotators(first, last):
    gt = np.zeros((9, 32, 32), bool)
    for z in range(first, last + 1):  # a different box on every slice: a user's box is told apart from a propagated one
        h = 3 + z
        gt[z, 16 - h:16 + h, 16 - h:16 + h] = True
    cfg = EvalConfig(click_refinement="off")
    model = RecordingModel(gt)
    from types import SimpleNamespace

    eval_steps, _, _, kinds = correct_masks(SimpleNamespace(predictor=model), StandInSlices(gt.shape[0]), gt, cfg)
    assert "click+" in kinds
    ui_steps, ui_prompts = annotator_steps(gt, cfg, len(kinds))
    assert len(ui_steps) == len(eval_steps)
    for k, (a, b) in enumerate(zip(eval_steps, ui_steps)):
        assert np.array_equal(a, b), f"step {k} ({kinds})"
    assert [z for z, _ in model.click_prompts] == [z for z, _ in ui_prompts]
    for (z, a), (_, b) in zip(model.click_prompts, ui_prompts):
        assert a is not None and b is not None and torch.equal(a, b), f"the click on slice {z}"
