"""Predictor behaviour on the embedded LiteMedSAM: prompt shapes, multimask, several objects, bad prompts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_robustmedsam.engine.predictor import Predictor
from napari_robustmedsam.errors import PromptError
from napari_robustmedsam.sample_data import mri_phantom


@pytest.fixture(scope="module")
def phantom():
    return mri_phantom(200, seed=3)


@pytest.fixture(scope="module")
def predictor(litemedsam, phantom):
    p = Predictor.from_loaded(litemedsam)
    p.set_image(phantom[0])
    return p


def _box(mask):
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], float)


def _dice(a, b):
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def test_box_segments_the_organ(predictor, phantom):
    organ = phantom[1] > 0
    pred = predictor.predict(boxes=_box(organ))
    assert pred.masks.shape == (1, 200, 200) and pred.masks.dtype == bool
    assert pred.low_res_logits.shape == (1, 1, 256, 256)
    assert _dice(pred.masks[0], organ) > 0.8


def test_several_objects_in_one_call_equal_separate_calls(predictor, phantom):
    organ, lesion = phantom[1] > 0, phantom[1] == 2
    boxes = np.stack([_box(organ), _box(lesion)])
    together = predictor.predict(boxes=boxes)
    for i, b in enumerate(boxes):
        alone = predictor.predict(boxes=b)
        np.testing.assert_array_equal(together.masks[i], alone.masks[0])
        np.testing.assert_allclose(together.scores[i], alone.scores[0], atol=1e-4)


def test_single_point_uses_multimask_and_picks_best_score(predictor, phantom):
    ys, xs = np.nonzero(phantom[1] == 1)
    pred = predictor.predict(points=[[xs[len(xs) // 2], ys[len(ys) // 2]]])
    assert pred.all_scores.shape == (1, 3)
    assert pred.scores[0] == pytest.approx(pred.all_scores[0].max())
    two = predictor.predict(points=[[xs[0], ys[0]], [xs[-1], ys[-1]]], point_labels=[1, 0])
    assert two.all_scores.shape == (1, 1)


def test_previous_logits_refine_with_a_corrective_click(predictor, phantom):
    organ = phantom[1] > 0
    first = predictor.predict(boxes=_box(organ))
    missed = organ & ~first.masks[0]
    extra = first.masks[0] & ~organ
    region = missed if missed.sum() >= extra.sum() else extra
    ys, xs = np.nonzero(region)
    label = 1 if region is missed else 0
    second = predictor.predict(
        points=[[xs[len(xs) // 2], ys[len(ys) // 2]]], point_labels=[label], boxes=_box(organ), mask_input=first.low_res_logits
    )
    assert second.masks.shape == first.masks.shape
    assert torch.isfinite(second.low_res_logits).all()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(), "empty prompt"),
        (dict(boxes=[50, 50, 20, 80]), "inverted"),
        (dict(boxes=[10, 10, 10, 40]), "inverted or empty"),
        (dict(boxes=[-40, 10, 80, 90]), "outside the image"),
        (dict(boxes=[10, 10, 80, 500]), "outside the image"),
        (dict(points=[[250, 10]]), "outside the image"),
        (dict(points=[[10, 10]], point_labels=[2]), "must be 1"),
        (dict(points=[[np.nan, 10]]), "NaN"),
        (dict(points=[[10, 10, 3]]), "2 coordinates"),
        (dict(boxes=[[1, 1, 9, 9], [2, 2, 8, 8]], points=[[5, 5]]), "2 boxes but 1 point"),
    ],
)
def test_bad_prompts_are_named(predictor, kwargs, message):
    with pytest.raises(PromptError, match=message):
        predictor.predict(**kwargs)


def test_no_embedding_is_a_clear_error(litemedsam):
    with pytest.raises(PromptError, match="no image embedding"):
        Predictor.from_loaded(litemedsam).predict(boxes=[1, 1, 5, 5])
