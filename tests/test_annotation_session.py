"""Annotation session logic (no Qt): commit ids, no overwriting, undo, re-open, prompts, export/import."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_robustmedsam.annotation.export import load_session, prompts_path_for, save_session
from napari_robustmedsam.annotation.session import mask_box
from napari_robustmedsam.annotation.session import AnnotationSession, SlicePrompts
from napari_robustmedsam.errors import UserFacingError


def disk(shape, cy, cx, r):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2


def test_commit_gives_new_ids_and_never_overwrites_other_objects():
    s = AnnotationSession((64, 64))
    a, b = disk((64, 64), 20, 20, 10), disk((64, 64), 26, 26, 10)
    s.set_current_slice(0, a, prompts=SlicePrompts(box=mask_box(a)))
    r1 = s.commit()
    assert r1.label_id == 1 and r1.n_pixels == a.sum() and not s.has_current
    s.set_current_slice(0, b, prompts=SlicePrompts(points=[[26, 26]], labels=[1]))
    r2 = s.commit()
    assert r2.label_id == 2
    assert (s.labels[a] == 1).all(), "object 1 lost pixels to object 2"
    assert r2.n_kept == int((a & b).sum()) > 0
    assert (s.labels[b & ~a] == 2).all()
    assert set(s.objects) == {1, 2}
    assert s.objects[2].prompts[0].points.tolist() == [[26.0, 26.0]]


def test_overwrite_takes_pixels_and_undo_restores_exactly():
    s = AnnotationSession((32, 32))
    a, b = disk((32, 32), 10, 10, 6), disk((32, 32), 14, 14, 6)
    s.set_current_slice(0, a)
    s.commit()
    before = s.labels.copy()
    s.set_current_slice(0, b)
    s.commit(overwrite=True)
    assert (s.labels[b] == 2).all()
    assert s.undo() == 2
    np.testing.assert_array_equal(s.labels, before)
    assert s.undo() == 1
    assert not s.labels.any()
    assert s.undo() is None


def test_resuming_over_committed_objects_is_one_undo_step_that_brings_them_back():
    s = AnnotationSession((32, 32))
    a, b = disk((32, 32), 10, 10, 6), disk((32, 32), 22, 22, 5)
    s.set_current_slice(0, a, prompts=SlicePrompts(box=mask_box(a)))
    s.commit()
    s.set_current_slice(0, b, prompts=SlicePrompts(points=[[22, 22]], labels=[1]))
    s.commit()
    before, records_before = s.labels.copy(), s.records_json()
    saved = np.zeros((32, 32), np.uint16)
    saved[disk((32, 32), 16, 16, 8)] = 7
    replaced = s.replace_all(saved, [{"id": 7, "n_pixels": int((saved == 7).sum()), "slices": {}}])
    assert replaced == 2 and set(s.objects) == {7} and s.next_id() == 8
    np.testing.assert_array_equal(s.labels, saved)
    assert s.next_undo_kind == "replace"
    assert s.undo() == 0
    np.testing.assert_array_equal(s.labels, before)
    assert s.records_json() == records_before  # the prompts come back with the objects
    assert s.next_undo_kind == "commit" and s.undo() == 2  # the commits before the resume stay undoable
    assert s.undo() == 1 and not s.labels.any() and s.next_undo_kind is None


def test_resuming_into_an_empty_session_replaces_nothing():
    s = AnnotationSession((8, 8))
    s.replace_all(np.zeros((8, 8), np.uint8), [])
    assert not s.can_undo
    labels = np.zeros((8, 8), np.uint8)
    labels[2:4, 2:4] = 1
    assert s.replace_all(labels, []) == 0 and s.can_undo
    with pytest.raises(UserFacingError, match="shape"):
        s.replace_all(np.zeros((4, 4), np.uint8), [])
    np.testing.assert_array_equal(s.labels, labels)


def test_failed_commit_leaves_labels_untouched():
    s = AnnotationSession((16, 16), labels=np.eye(16, dtype=np.uint8) * 3)
    before = s.labels.copy()
    with pytest.raises(UserFacingError):
        s.commit()  # nothing to commit
    np.testing.assert_array_equal(s.labels, before)
    assert s.next_id() == 4


def test_commit_of_an_object_covered_by_others_is_refused_unless_overwrite():
    s = AnnotationSession((32, 32))
    big, small = disk((32, 32), 16, 16, 10), disk((32, 32), 16, 16, 4)
    s.set_current_slice(0, big)
    s.commit()
    before = s.labels.copy()
    s.set_current_slice(0, small)
    with pytest.raises(UserFacingError, match="already belongs"):
        s.commit()
    np.testing.assert_array_equal(s.labels, before)
    assert s.has_current  # kept, so that the user can tick overwrite
    assert s.commit(overwrite=True).label_id == 2


def test_labels_shape_mismatch_is_a_user_error():
    with pytest.raises(UserFacingError):
        AnnotationSession((8, 8), labels=np.zeros((9, 8), np.uint8))
    with pytest.raises(UserFacingError):
        AnnotationSession((2, 3, 4, 5))


def test_volume_commit_reopen_keeps_id():
    s = AnnotationSession((5, 16, 16))
    m = disk((16, 16), 8, 8, 4)
    for z in (1, 2, 3):
        s.set_current_slice(z, m, prompts=SlicePrompts(box=mask_box(m), source="user" if z == 2 else "propagated"))
    assert s.user_slices() == [2]
    assert s.current_slices() == [1, 2, 3]
    r = s.commit()
    assert (s.labels[1:4][:, m] == r.label_id).all()
    assert s.reopen_last_commit() == r.label_id
    assert not s.labels.any() and s.current_slices() == [1, 2, 3]
    assert s.commit().label_id == r.label_id


def test_mark_end_and_sync_manual_edits():
    s = AnnotationSession((4, 8, 8))
    s.set_current_slice(1, np.ones((8, 8), bool), prompts=SlicePrompts(points=[[1, 1]], labels=[1]))
    s.mark_end(2)
    assert s.user_slices() == [1, 2]
    painted = np.zeros((4, 8, 8), np.uint32)
    painted[0, :2, :2] = 7
    s.sync_labels(painted)  # hand-painted labels are adopted, new ids continue after them
    assert s.next_id() == 8


def test_slice_prompts_extends_is_a_corrective_click():
    base = SlicePrompts(points=[[1, 2]], labels=[1], box=[0, 0, 5, 5])
    more = SlicePrompts(points=[[1, 2], [3, 3]], labels=[1, 0], box=[0, 0, 5, 5])
    other_box = SlicePrompts(points=[[1, 2], [3, 3]], labels=[1, 0], box=[0, 0, 6, 5])
    assert more.extends(base)
    assert not other_box.extends(base)
    assert not base.extends(more)
    assert SlicePrompts.from_json(json.loads(json.dumps(more.to_json()))).extends(base)


def test_step_back_restores_each_earlier_state_of_a_slice_exactly():
    s = AnnotationSession((2, 8, 8))
    box = np.array([1.0, 1.0, 7.0, 7.0])
    asked = [SlicePrompts(box=box), SlicePrompts([[3, 3]], [1], box), SlicePrompts([[3, 3], [5, 5]], [1, 0], box)]
    masks = [np.eye(8, dtype=bool), np.ones((8, 8), bool), np.tri(8, dtype=bool)]
    logits = [object(), object(), object()]
    for k in range(3):
        s.set_current_slice(1, masks[k], logits[k], asked[k].copy(), score=0.5 + k / 10, asked=asked[k])
    assert s.steps_back(1) == 2 and s.steps_back(0) == 0
    # prompts that are not the previous state's (a point moved, a label flipped) restore nothing
    assert not s.step_back(1, SlicePrompts([[3, 4]], [1], box))
    assert not s.step_back(1, SlicePrompts([[3, 3]], [0], box))
    assert np.array_equal(s.current[1], masks[2]) and s.steps_back(1) == 2
    for k in (1, 0):  # take the clicks back one by one
        assert s.step_back(1, asked[k].copy())
        assert np.array_equal(s.current[1], masks[k]) and s.current_logits[1] is logits[k]
        assert s.current_scores[1] == pytest.approx(0.5 + k / 10) and s.current_prompts[1].same_prompts(asked[k])
    assert s.steps_back(1) == 0 and not s.step_back(1, asked[0])
    # a new click after stepping back is kept as well
    s.set_current_slice(1, masks[2], logits[2], asked[2], asked=asked[2])
    assert s.steps_back(1) == 1
    # propagation (no user prompts), clearing the slice and committing drop the slice's history
    s.set_current_slice(1, masks[1], None, SlicePrompts(box=box, source="propagated"))
    assert s.steps_back(1) == 0 and not s.step_back(1, asked[0])
    s.set_current_slice(1, masks[0], None, asked[0], asked=asked[0])
    s.set_current_slice(1, masks[1], None, asked[1], asked=asked[1])
    s.clear_current_slice(1)
    assert s.steps_back(1) == 0
    s.set_current_slice(0, masks[0], None, asked[0], asked=asked[0])
    s.set_current_slice(0, masks[1], None, asked[1], asked=asked[1])
    s.commit()
    assert s.steps_back(0) == 0


def test_a_click_on_a_propagated_slice_can_be_taken_back_to_the_propagated_mask():
    s = AnnotationSession((3, 8, 8))
    propagated = SlicePrompts(box=np.array([1.0, 1.0, 6.0, 6.0]), source="propagated")
    mask, logits = np.eye(8, dtype=bool), object()
    s.set_current_slice(2, mask, logits, propagated, score=0.7)  # no user prompts made it
    click = SlicePrompts([[4, 4]], [1])
    s.set_current_slice(2, np.ones((8, 8), bool), object(), click, score=0.9, asked=click)
    assert s.steps_back(2) == 1
    assert s.step_back(2, SlicePrompts())  # the user's only click removed: no prompts of theirs on the slice
    assert np.array_equal(s.current[2], mask) and s.current_logits[2] is logits and s.current_scores[2] == 0.7
    assert s.current_prompts[2].source == "propagated" and 2 not in s.user_slices()


def test_step_back_history_is_bounded():
    s = AnnotationSession((8, 8), max_steps_back=3)
    for k in range(6):
        p = SlicePrompts(np.arange(2 * k, dtype=float).reshape(-1, 2), np.ones(k, np.int64))
        s.set_current_slice(0, np.zeros((8, 8), bool), None, p, asked=p)
    assert s.steps_back(0) == 3


@pytest.mark.parametrize("suffix", [".tif", ".npy", ".nii.gz"])
def test_save_and_resume_session(tmp_path, suffix):
    s = AnnotationSession((3, 20, 20))
    m = disk((20, 20), 10, 10, 5)
    s.set_current_slice(1, m, prompts=SlicePrompts(points=[[10, 10], [2, 2]], labels=[1, 0], box=mask_box(m)))
    s.set_current_slice(2, m, prompts=SlicePrompts(box=mask_box(m), source="propagated"))
    s.commit(info={"model": "litemedsam"})
    labels_path, json_path = save_session(tmp_path / f"case{suffix}", s.labels, s.records_json(),
                                          {"name": "vol"}, {"name": "litemedsam"})
    assert json_path == prompts_path_for(labels_path) and json_path.name == "case.prompts.json"
    for source in (labels_path, json_path):
        loaded = load_session(source)
        np.testing.assert_array_equal(loaded.labels, s.labels)
        resumed = AnnotationSession((3, 20, 20))
        resumed.sync_labels(loaded.labels)
        resumed.load_records(loaded.records)
        rec = resumed.objects[1]
        assert rec.prompts[1].labels.tolist() == [1, 0]
        assert rec.prompts[2].source == "propagated" and rec.propagated_slices == [2]
        assert resumed.next_id() == 2


def test_pieces_committed_under_one_value_keep_every_pieces_prompts(tmp_path):
    """Separate pieces of one kind, each boxed and committed under the same value: the label holds them all, and the
    record keeps the prompts of every piece (saved and resumed), not only the last one's."""
    s = AnnotationSession((64, 64))
    pieces = [disk((64, 64), 10, 10, 4), disk((64, 64), 40, 12, 5), disk((64, 64), 30, 50, 3)]
    results = []
    for k, m in enumerate(pieces):
        s.set_current_slice(0, m, prompts=SlicePrompts(box=mask_box(m)))
        results.append(s.commit(label_id=1, info={"class": "caries", "piece": k}))
    assert [r.label_id for r in results] == [1, 1, 1]
    assert [r.n_commits for r in results] == [1, 2, 3]
    assert not any(r.correction for r in results)
    assert [r.n_added for r in results] == [int(m.sum()) for m in pieces]
    assert results[-1].n_pixels == int(sum(m.sum() for m in pieces)) == int((s.labels == 1).sum())
    rec = s.objects[1]
    assert rec.n_commits == 3 and rec.info["piece"] == 2
    assert [e["info"]["piece"] for e in rec.earlier] == [0, 1]
    assert [e["slices"]["0"]["box"] for e in rec.earlier] == [mask_box(m).tolist() for m in pieces[:2]]

    labels_path, json_path = save_session(tmp_path / "pieces.tif", s.labels, s.records_json(), {"name": "x"}, {})
    resumed = AnnotationSession((64, 64))
    resumed.load_records(load_session(json_path).records)
    assert resumed.objects[1].earlier == rec.earlier and resumed.objects[1].prompts[0].same_box(rec.prompts[0])

    # undo takes back the last piece and its record: the first two pieces' record, exactly
    assert s.undo() == 1
    assert s.objects[1].n_commits == 2 and s.objects[1].info["piece"] == 1
    assert [e["info"]["piece"] for e in s.objects[1].earlier] == [0]
    # reopening the last piece and committing it again does not record a piece twice
    assert s.reopen_last_commit() == 1
    assert s.commit().n_commits == 2 and [e["info"]["piece"] for e in s.objects[1].earlier] == [0]


def test_an_object_committed_once_is_saved_as_before():
    s = AnnotationSession((16, 16))
    m = disk((16, 16), 8, 8, 3)
    s.set_current_slice(0, m, prompts=SlicePrompts(box=mask_box(m)))
    result = s.commit()
    assert result.n_commits == 1 and result.n_added == int(m.sum())
    assert set(s.records_json()[0]) == {"id", "n_pixels", "slices", "propagated_slices", "info"}


def test_save_refuses_bad_formats_without_writing(tmp_path):
    labels = np.zeros((2, 4, 4), np.uint16)
    with pytest.raises(UserFacingError):
        save_session(tmp_path / "x.png", labels, [])  # 3D as PNG
    with pytest.raises(UserFacingError):
        save_session(tmp_path / "x.jpg", labels[0], [])
    assert list(tmp_path.iterdir()) == []


def test_an_empty_mask_comes_with_a_hint_that_says_what_to_try():
    """A prompt that segments nothing (e.g. a box around a thin vessel tree at 256 px) explains itself."""
    from types import SimpleNamespace

    import torch

    from napari_robustmedsam.annotation.prompt_decoding import segment_slice

    def predictor_returning(mask):
        def predict(**kwargs):
            return SimpleNamespace(masks=mask[None], scores=np.array([-0.1]),
                                   low_res_logits=torch.zeros(1, 1, 256, 256))
        return SimpleNamespace(predict=predict)

    frame = SimpleNamespace(original_size=(64, 64), model_size=256)
    embedding = SimpleNamespace(frame=frame)
    prompts = SlicePrompts(np.zeros((0, 2)), np.zeros(0), np.array([5.0, 5, 60, 60]))
    empty = segment_slice(predictor_returning(np.zeros((64, 64), bool)), embedding, prompts, model_name="robust-lite")
    assert "robust-lite segmented no pixel" in empty.hint and "256 px" in empty.hint and "-0.10" in empty.hint
    found = np.zeros((64, 64), bool)
    found[10:20, 10:20] = True
    assert segment_slice(predictor_returning(found), embedding, prompts).hint == ""


def test_display_name_says_what_a_fine_tuned_checkpoint_was_trained_from():
    from types import SimpleNamespace

    from napari_robustmedsam.annotation.model_info import display_name

    assert display_name(SimpleNamespace(name="litemedsam")) == "LiteMedSAM"
    tuned = SimpleNamespace(name="best.pth", metadata={
        "provenance": {"base_model": {"name": "litemedsam_robust"}}, "extra": {"training": {"kind": "best"}}})
    assert display_name(tuned) == "best.pth (fine-tuned from LiteMedSAM + robust decoder)"
    fused = SimpleNamespace(name="fused.pth", metadata={"provenance": {"base_model": {"name": "x"}}, "extra": {}})
    assert display_name(fused) == "fused.pth"  # not trained by this project: the file name alone
