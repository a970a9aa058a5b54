"""Label values / class names for commits, and starting from an existing label (annotation/, no Qt)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from napari_robustmedsam.annotation.prompt_decoding import segment_slice
from napari_robustmedsam.annotation.label_classes import LabelChoice, LabelClasses, commit_as
from napari_robustmedsam.annotation.session import AnnotationSession, SlicePrompts
from napari_robustmedsam.errors import UserFacingError


def test_choices_values_names_and_pairs():
    classes = LabelClasses()
    assert classes.choose("") == LabelChoice(None)
    assert classes.choose("2=oedema") == LabelChoice(2, "oedema")
    assert classes.choose("oedema") == LabelChoice(2, "oedema")
    assert classes.choose("2") == LabelChoice(2, "oedema")
    labels = np.zeros((4, 4), np.uint32)
    labels[0, 0] = 7
    assert classes.choose("necrosis", labels) == LabelChoice(8, "necrosis")  # after every value in use
    assert classes.choose("5: enhancing tumour").value == 5
    assert LabelClasses.from_json(classes.to_json()).names == classes.names
    with pytest.raises(UserFacingError, match="already label 2"):
        classes.choose("3=oedema")
    with pytest.raises(UserFacingError, match="from 1"):
        classes.choose("0")


def test_commits_write_the_chosen_value_and_class():
    session = AnnotationSession((8, 8))
    classes = LabelClasses()
    for box in ((0, 0, 3, 3), (5, 5, 8, 8)):
        mask = np.zeros((8, 8), bool)
        mask[box[1]:box[3], box[0]:box[2]] = True
        session.set_current_slice(0, mask)
        result = commit_as(session, classes.choose("2=oedema"), info={"model": "m"})
        assert result.label_id == 2
    assert set(np.unique(session.labels)) == {0, 2} and int((session.labels == 2).sum()) == 18
    assert session.objects[2].info == {"model": "m", "class": "oedema"}
    session.set_current_slice(0, np.eye(8, dtype=bool))
    assert commit_as(session, classes.choose("")).label_id == 3  # no choice: the next free id


def _volume_with_object():
    labels = np.zeros((4, 10, 10), np.uint32)
    labels[1, 2:6, 2:6] = 3
    labels[2, 3:7, 3:7] = 3
    labels[2, 8:10, 8:10] = 1  # another object
    return labels


def test_start_from_label_then_correct_and_commit_replaces_it():
    labels = _volume_with_object()
    session = AnnotationSession(labels.shape, labels=labels)
    seen = []
    n = session.start_from_label(3, logits_for=lambda z, m: seen.append(z) or f"logits{z}")
    assert n == 2 and seen == [1, 2]
    assert np.array_equal(session.current, labels == 3)
    assert session.current_prompts[1].source == "label"
    assert session.current_prompts[1].box.tolist() == [2, 2, 6, 6]
    assert session.current_logits[2] == "logits2"
    assert np.array_equal(session.labels, labels)  # nothing changes before the commit
    # a correction shrinks the object on slice 2
    smaller = np.zeros((10, 10), bool)
    smaller[3:5, 3:5] = True
    session.set_current_slice(2, smaller)
    result = session.commit()
    assert result.label_id == 3 and result.correction  # the status line says "Committed", not "Added"
    assert int((session.labels[2] == 3).sum()) == 4 and (session.labels[1] == labels[1]).all()
    assert int((session.labels[2] == 1).sum()) == 4  # the other object untouched
    session.undo()
    assert np.array_equal(session.labels, labels)  # one undo restores everything


def test_start_from_label_refusals():
    session = AnnotationSession((4, 10, 10), labels=_volume_with_object())
    with pytest.raises(UserFacingError, match=r"label 5 is not in the labels \(present: \[1, 3\]\)"):
        session.start_from_label(5)
    session.set_current_slice(0, np.ones((10, 10), bool))
    with pytest.raises(UserFacingError, match="commit or clear the current object first"):
        session.start_from_label(3)


def test_a_click_on_a_label_started_object_starts_from_its_mask():
    """The label's mask is the mask prompt of the first corrective click (and its box, for box-trained models)."""
    sent = {}

    def predict(**kwargs):
        sent.update(kwargs)
        return SimpleNamespace(masks=np.ones((1, 10, 10), bool), low_res_logits=np.zeros((1, 1, 4, 4)),
                               scores=np.array([0.9]))

    predictor = SimpleNamespace(predict=predict)
    embedding = SimpleNamespace(frame=SimpleNamespace(original_size=(10, 10)))
    label_prompt = SlicePrompts(box=[2, 2, 6, 6], source="label")
    click = SlicePrompts(points=[[4, 4]], labels=[0])
    segment_slice(predictor, embedding, click, previous_prompts=label_prompt, previous_logits="label-logits",
                  previous_mask=np.ones((10, 10), bool), box_primary=True)
    assert sent["mask_input"] == "label-logits"
    assert sent["boxes"].tolist() == [2, 2, 6, 6]


def test_mask_prompt_in_the_model_frame():
    from napari_robustmedsam.annotation.label_classes import mask_prompt_fn

    mask = np.zeros((60, 120), bool)
    mask[10:30, 20:80] = True
    logits = mask_prompt_fn("litemedsam", mask.shape)(0, mask)
    assert tuple(logits.shape) == (1, 1, 256, 256)
    positive = (logits[0, 0] > 0).numpy()
    # litemedsam: the longest side (120 px) fills 256 px; rows 10-30 of 60 -> 21-64 of the 128 used
    assert positive[40, 100] and not positive[100, 100] and not positive[40, 200]
