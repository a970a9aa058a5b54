"""Autosave: every commit and undo is written to a recovery folder, and a later session can restore it."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from napari_robustmedsam.annotation.autosave import KEEP_SESSIONS, Autosaver, image_key, read_entry
from napari_robustmedsam.annotation.model_info import preimport_model_modules
from widget_helpers import shared_cache, tight_box, wait_idle

preimport_model_modules()  # before any viewer exists (triton + Mesa GL, see its docstring)


def _labels():
    labels = np.zeros((32, 32), np.uint16)
    labels[4:10, 4:10] = 1
    labels[20:30, 20:30] = 2
    return labels


def test_a_session_writes_only_its_own_folder_and_finds_the_earlier_ones(tmp_path):
    key = image_key("scan", "/data/scan.nii.gz", (32, 32))
    first = Autosaver(tmp_path)
    folder = first.write(key, _labels(), [{"id": 1}], image_meta={"name": "scan"})
    entry = read_entry(folder)
    assert entry is not None and entry.n_objects == 2 and "2 object(s)" in entry.describe()
    assert first.earlier(key) == []  # its own autosave is not "earlier"
    second = Autosaver(tmp_path)
    assert second.session_name != first.session_name
    assert [e.folder for e in second.earlier(key)] == [folder]
    second.write(key, np.zeros((32, 32), np.uint16), [])
    np.testing.assert_array_equal(Autosaver.load(second.earlier(key)[0]).labels, _labels())  # untouched
    assert len(list((tmp_path / key).iterdir())) == 2


def test_empty_and_incomplete_autosaves_are_not_offered(tmp_path):
    key = image_key("scan", None, (32, 32))
    Autosaver(tmp_path).write(key, np.zeros((32, 32), np.uint16), [])
    broken = tmp_path / key / "broken"
    broken.mkdir()
    (broken / "labels.prompts.json").write_text("{not json")
    assert Autosaver(tmp_path).earlier(key) == []


def test_only_the_newest_sessions_of_an_image_are_kept(tmp_path):
    key = image_key("scan", None, (32, 32))
    for i in range(KEEP_SESSIONS + 2):
        folder = Autosaver(tmp_path).write(key, _labels(), [])
        os.utime(folder, (1000 + i, 1000 + i))
    assert len(list((tmp_path / key).iterdir())) == KEEP_SESSIONS


def test_the_image_key_follows_the_source_and_shape():
    assert image_key("a", "/x/scan.nii.gz", (3, 4)) == image_key("b", "/x/scan.nii.gz", (3, 4))
    assert image_key("a", "/x/scan.nii.gz", (3, 4)) != image_key("a", "/x/scan.nii.gz", (3, 5))
    assert image_key("a", None, (3, 4)) != image_key("b", None, (3, 4))
    assert image_key("a/b c", None, (3,)).startswith("a_b_c-")


def test_autosaves_live_in_the_user_data_folder_unless_the_cache_is_moved(monkeypatch, tmp_path):
    from napari_robustmedsam import cache_location

    monkeypatch.setenv(cache_location.CACHE_ENV, str(tmp_path))
    assert cache_location.autosave_root() == tmp_path / "autosave"
    monkeypatch.delenv(cache_location.CACHE_ENV)
    assert cache_location.autosave_root().name == "autosave"
    assert cache_location.autosave_root().parent != cache_location.user_cache_root()


class _NoAnnotatorYet:
    annotator = None
    loaded = None

    class annotator_changed:  # noqa: N801 - stands in for the state's signal
        @staticmethod
        def connect(slot):
            pass


def test_a_write_that_ends_after_its_panel_closed_still_writes_the_newest_state(qtbot, tmp_path):
    """The viewer may close right after a commit: the write finishes into a deleted panel. It must not raise
    into the event loop (pytest-qt fails the test if it does), and the state that was waiting is still written."""
    from qtpy import sip

    from napari_robustmedsam.widgets.autosave_control import AutosaveControl

    control = AutosaveControl(_NoAnnotatorYet(), restore_with=lambda path: False)
    saver = Autosaver(tmp_path)
    first, newest = _labels(), _labels() * 2
    control._pending = (saver, "scan", first, [{"id": 1}], {})
    control._write_next()
    control._pending = (saver, "scan", newest, [{"id": 2}], {})
    sip.delete(control)
    wait_idle(qtbot)
    assert not control._writing
    folder = saver.folder_for("scan")
    assert read_entry(folder) is not None
    assert np.array_equal(np.load(folder / "labels.npy"), newest)


def _box_then_commit(annotator, qtbot, mask) -> int | None:
    """Box the object, wait for its mask, commit it, and wait for the autosave that follows."""
    with qtbot.waitSignal(annotator.segmented, timeout=300_000):
        annotator.add_box(tight_box(mask))
    wait_idle(qtbot)
    label_id = annotator.commit()
    wait_idle(qtbot)
    return label_id


@pytest.mark.gui
def test_commits_are_autosaved_and_a_new_session_restores_them(make_napari_viewer, litemedsam, qtbot, tmp_path,
                                                               tmp_path_factory):
    from napari_robustmedsam.engine.embeddings import open_engine
    from napari_robustmedsam.sample_data import mri_phantom

    viewer = make_napari_viewer(show=True)
    _, widget = viewer.window.add_plugin_dock_widget("napari-robustmedsam", "RobustMedSAM")
    widget.annotator.state.set_model(litemedsam, open_engine(litemedsam, cache_dir=shared_cache(tmp_path_factory)))
    control = widget.export.autosave
    control.autosaver = Autosaver(tmp_path / "autosave")
    image, truth = mri_phantom(256, seed=0)
    annotator = widget.annotator
    annotator.set_image_layer(viewer.add_image(image, name="phantom"))
    assert not control.restore_button.isEnabled()
    assert _box_then_commit(annotator, qtbot, truth == 2) == 1
    folder = next((tmp_path / "autosave").glob("*/*"))
    meta = json.loads((folder / "labels.prompts.json").read_text())
    assert meta["objects"][0]["id"] == 1 and meta["image"]["name"] == "phantom" and meta["model"]["name"] == "litemedsam"
    committed = np.asarray(annotator.committed_layer.data).copy()
    np.testing.assert_array_equal(np.load(folder / "labels.npy"), committed)
    assert "Autosaved" in control.status.text()

    # a correction painted straight into the committed objects is autosaved once the painting pauses
    spot = tuple(int(v) for v in np.argwhere(committed == 0)[0])
    annotator.committed_layer.paint(spot, 1)  # a brush dab (the layer's brush size) at the image's corner
    committed = np.asarray(annotator.committed_layer.data).copy()
    assert committed[spot] == 1
    qtbot.waitUntil(lambda: np.load(folder / "labels.npy")[spot] == 1 and not control._writing, timeout=30_000)
    np.testing.assert_array_equal(np.load(folder / "labels.npy"), committed)

    # napari closed without saving; a new session opens the same image and restores the commit
    control.autosaver = Autosaver(tmp_path / "autosave")
    for name in [layer.name for layer in viewer.layers]:
        viewer.layers.remove(name)
    annotator.set_image_layer(viewer.add_image(image, name="phantom"))
    assert not np.asarray(annotator.committed_layer.data).any()
    assert control.restore_button.isEnabled() and "1 object(s)" in annotator.status.text()
    assert control.restore()
    np.testing.assert_array_equal(np.asarray(annotator.committed_layer.data), committed)
    assert annotator.session.objects[1].prompts[0].box is not None

    # the new session's commits and undos go to its own folder; the first session's autosave stays
    annotator.clear()
    assert _box_then_commit(annotator, qtbot, truth >= 1) == 2
    own = control.autosaver.folder_for(folder.parent.name)
    assert set(np.unique(np.load(own / "labels.npy"))) == {0, 1, 2}
    assert annotator.undo() == 2
    wait_idle(qtbot)
    assert set(np.unique(np.load(own / "labels.npy"))) == {0, 1}
    np.testing.assert_array_equal(np.load(folder / "labels.npy"), committed)

    # restoring over committed objects replaces them but loses nothing: U brings them back, and they are kept on
    # disk as an autosave of their own (the session's own folder is written over by its next commit)
    assert _box_then_commit(annotator, qtbot, truth >= 1) == 2
    before = np.asarray(annotator.committed_layer.data).copy()
    assert control.restore()
    np.testing.assert_array_equal(np.asarray(annotator.committed_layer.data), committed)
    assert "replaced the 2 object(s)" in widget.export.status.text() and "U brings them back" in widget.export.status.text()
    kept = control.autosaver.earlier(folder.parent.name)[0]
    np.testing.assert_array_equal(np.load(kept.folder / "labels.npy"), before)
    assert kept.folder != folder and read_entry(folder) is not None
    assert annotator.undo() == 0 and "Undid the resume" in annotator.status.text()
    np.testing.assert_array_equal(np.asarray(annotator.committed_layer.data), before)
    assert annotator.session.objects[2].prompts[0].box is not None
    assert annotator.undo() == 2  # and the commit before the resume is still undoable
    wait_idle(qtbot)

    # a full disk: the commit stands, the panel says the autosave failed and what to do
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    control.autosaver.write = full_disk
    annotator.clear()
    assert _box_then_commit(annotator, qtbot, truth >= 1) == 2
    assert "Autosave failed" in control.status.text() and "No space left" in control.status.text()
    assert "Save labels" in control.status.text()
    assert annotator.undo() == 2
    wait_idle(qtbot)

    # switched off: nothing is written
    control.check.setChecked(False)
    control.autosaver = Autosaver(tmp_path / "autosave-off")
    _box_then_commit(annotator, qtbot, truth >= 1)
    assert not (tmp_path / "autosave-off").exists()
