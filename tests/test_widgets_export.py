"""Export / resume of an annotation session, the image-series workflow, and the launcher's image choice."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from napari_robustmedsam.annotation.model_info import preimport_model_modules
from widget_helpers import shared_cache, tight_box, wait_idle

preimport_model_modules()  # before any viewer exists (triton + Mesa GL, see its docstring)











@pytest.fixture
def plugin(make_napari_viewer, litemedsam, tmp_path_factory):
    from napari_robustmedsam.engine.embeddings import open_engine

    viewer = make_napari_viewer(show=True)
    viewer.window.resize(1400, 900)
    _, widget = viewer.window.add_plugin_dock_widget("napari-robustmedsam", "RobustMedSAM")
    widget.annotator.state.set_model(litemedsam, open_engine(litemedsam, cache_dir=shared_cache(tmp_path_factory)))
    return viewer, widget


@pytest.mark.gui
def test_save_labels_and_prompts_then_resume(plugin, qtbot, tmp_path):
    from napari_robustmedsam.sample_data import mri_phantom

    viewer, widget = plugin
    image, truth = mri_phantom(256, seed=0)
    layer = viewer.add_image(image, name="phantom")
    annotator = widget.annotator
    annotator.set_image_layer(layer)
    with qtbot.waitSignal(annotator.segmented, timeout=300_000):
        annotator.add_box(tight_box(truth >= 1))
    wait_idle(qtbot)
    annotator.commit()
    saved = widget.export.save(tmp_path / "out" / "phantom.tif")
    assert saved is not None
    labels_path, json_path = saved
    meta = json.loads(json_path.read_text())
    assert meta["format"] == "napari-robustmedsam-session" and meta["model"]["name"] == "litemedsam"
    assert meta["objects"][0]["id"] == 1 and meta["objects"][0]["slices"]["0"]["box"] is not None
    assert "Saved 1 object" in widget.export.status.text()

    # resume on a fresh copy of the image: the labels and prompts come back, new objects get new ids
    annotator.set_image_layer(viewer.add_image(image, name="phantom again"))
    assert not np.asarray(annotator.committed_layer.data).any()
    assert widget.export.load(json_path)
    np.testing.assert_array_equal(np.asarray(annotator.committed_layer.data) > 0,
                                  np.asarray(viewer.layers["committed objects (phantom)"].data) > 0)
    assert annotator.session.objects[1].prompts[0].box is not None
    assert annotator.session.next_id() == 2

    # a file of the wrong shape is a visible error and changes nothing
    np.save(tmp_path / "wrong.npy", np.zeros((5, 5), np.uint16))
    assert not widget.export.load(tmp_path / "wrong.npy")
    assert "shape" in widget.export.banner.text()


@pytest.mark.gui
def test_image_series_saves_and_resumes_per_image(plugin, qtbot, tmp_path):
    import imageio.v3 as iio

    from napari_robustmedsam.sample_data import mri_phantom

    viewer, widget = plugin
    folder = tmp_path / "series"
    folder.mkdir()
    truths = []
    for i in range(2):
        image, truth = mri_phantom(128, seed=i)
        iio.imwrite(folder / f"img{i}.png", (image / image.max() * 255).astype(np.uint8))
        truths.append(truth >= 1)
    series = widget.series
    assert series.open_folder(folder)
    assert series.embed_all()  # both images, in a worker, into the disk cache
    wait_idle(qtbot)
    assert "Embedded" in series.status.text()
    annotator = widget.annotator
    assert annotator.image_layer.name == "series image"
    with qtbot.waitSignal(annotator.segmented, timeout=300_000):
        annotator.add_box(tight_box(truths[0]))
    wait_idle(qtbot)
    annotator.commit()
    assert series.go(1)  # saves img0 and opens img1
    assert (folder / "annotations" / "img0.tif").exists() and (folder / "annotations" / "img0.prompts.json").exists()
    assert not np.asarray(annotator.committed_layer.data).any()  # a new image starts empty
    assert series.go(0)  # back: resumed from the saved labels
    assert np.asarray(annotator.committed_layer.data).any()
    assert "resumed img0.tif" in series.status.text()


def test_launcher_finds_shared_data_and_falls_back_to_the_phantom(tmp_path, monkeypatch):
    from napari_robustmedsam import launch

    monkeypatch.delenv("ROBUSTMEDSAM_SHARED_DATA", raising=False)
    (tmp_path / "shared" / "data" / "medseg" / "hc18_fetal_head_us" / "images").mkdir(parents=True)
    nested = tmp_path / "a" / "b"
    nested.mkdir(parents=True)
    assert launch.find_shared_data(nested) == tmp_path / "shared" / "data"
    assert launch.default_image(tmp_path / "shared" / "data") is None  # no images there
    args = launch.parse_args(["--phantom"])
    image, kwargs, modality, source = launch._load_image(args)
    assert image.shape == (256, 256) and kwargs["name"] == "MRI phantom" and modality == "mri"
    with pytest.raises(SystemExit):
        launch.parse_args(["--image", "a.png", "--volume", "b.tif"])


def test_launcher_uses_a_real_image_when_present(shared_data, monkeypatch):
    from napari_robustmedsam import launch

    monkeypatch.setenv("ROBUSTMEDSAM_SHARED_DATA", str(shared_data))
    image, kwargs, modality, source = launch._load_image(launch.parse_args([]))
    assert kwargs["name"].startswith("hc18_fetal_head_us/") and modality == "ultrasound" and Path(source).exists()


def _view_box(viewer):
    """(y0, x0, y1, x1) of the world region the canvas shows."""
    camera = viewer.scene.camera
    h, w = viewer.canvas.size
    cy, cx = camera.center[-2:]
    return cy - h / 2 / camera.zoom, cx - w / 2 / camera.zoom, cy + h / 2 / camera.zoom, cx + w / 2 / camera.zoom


def _assert_whole_image_shown(viewer, layer):
    from qtpy.QtWidgets import QApplication

    for _ in range(5):
        QApplication.processEvents()
    vy0, vx0, vy1, vx1 = _view_box(viewer)
    lo, hi = np.asarray(layer.extent.world, dtype=float)[:, -2:]
    (iy0, ix0), (iy1, ix1) = lo - 0.5, hi + 0.5  # data extent (pixel centres) +- half a pixel
    tol = 1e-3
    assert vy0 <= iy0 + tol and vx0 <= ix0 + tol and iy1 <= vy1 + tol and ix1 <= vx1 + tol, (
        f"image {iy0, ix0, iy1, ix1} not inside the canvas view {vy0, vx0, vy1, vx1}")
    fill = max((iy1 - iy0) / (vy1 - vy0), (ix1 - ix0) / (vx1 - vx0))
    assert fill > 0.85, f"the image fills only {fill:.0%} of the canvas"


@pytest.mark.gui
def test_launcher_shows_the_whole_image_and_keeps_it_fitted(monkeypatch):
    """The launcher's view: the whole image inside the canvas once the window is laid out, fitted again when
    the canvas changes size, and left alone once the user zoomed (the --screenshot bug: zoomed in, cropped)."""
    from conftest import shared_data_dir
    from qtpy.QtWidgets import QApplication

    from napari_robustmedsam import launch

    shared = shared_data_dir()
    if (shared / "medseg").is_dir():
        monkeypatch.setenv("ROBUSTMEDSAM_SHARED_DATA", str(shared))  # a non-square real image (hc18: 800 x 540)
        argv = ["--no-embed"]
    else:
        argv = ["--no-embed", "--phantom"]
    ready = launch.setup(launch.parse_args(argv))
    assert not isinstance(ready, int)
    viewer, startup, fit = ready
    try:
        _wait_until(lambda: startup.ready)
        layer = startup.widget.annotator.image_layer
        _assert_whole_image_shown(viewer, layer)
        viewer.window.resize(1100, 700)  # e.g. a re-wrapped panel or the user resizing the window
        _assert_whole_image_shown(viewer, layer)
        camera = viewer.scene.camera
        camera.zoom = camera.zoom * 3  # the user zooms in: the launcher must not undo it
        zoom = camera.zoom
        viewer.window.resize(1300, 850)
        for _ in range(5):
            QApplication.processEvents()
        assert camera.zoom == pytest.approx(zoom)
        assert fit() is False
    finally:
        viewer.close()


def _wait_until(condition, timeout_s: float = 600.0) -> None:
    import time

    from qtpy.QtWidgets import QApplication

    end = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < end, "timed out"
        QApplication.processEvents()
        time.sleep(0.02)


@pytest.mark.gui
def test_launcher_paints_first_and_prepares_model_and_drawing_code_in_workers(monkeypatch):
    """The window is handed to Qt before the model is loaded and before napari's numba code is compiled; both
    run off the GUI thread, and the plugin is docked, with the model, once they are done."""
    import threading

    from napari_robustmedsam import launch
    from napari_robustmedsam.widgets import warmup
    from napari_robustmedsam.widgets._state import get_state

    threads = []
    real_warm = warmup.warm_napari_numba
    monkeypatch.setattr(warmup, "warm_napari_numba", lambda: threads.append(threading.current_thread()) or real_warm())
    viewer, startup, _ = launch.setup(launch.parse_args(["--phantom"]))
    try:
        assert not startup.ready and startup.widget.annotator.image_layer is None  # docked, layers not yet made
        assert get_state(viewer).is_loading, "the model must load in a worker, not before the window paints"
        assert "Loading the model" in viewer.status
        assert "Loading the model" in startup.widget.annotator.status.text()
        _wait_until(lambda: startup.ready)
        assert threads and threads[0] is not threading.main_thread()
        assert startup.widget.annotator.image_layer is not None and get_state(viewer).loaded is not None
        assert startup.seconds["layers ready"] >= startup.seconds["drawing code ready"]  # made ahead, in steps
        assert "Loading the model" not in viewer.status
        from napari_robustmedsam.widgets._common import any_task_running

        _wait_until(lambda: not any_task_running())
        assert startup.widget.annotator.embeddings.n_ready == 1
    finally:
        viewer.close()


def test_sample_data_and_writer(tmp_path):
    from napari_robustmedsam.io import read_image
    from napari_robustmedsam.widgets.npe2_hooks import sample_phantom_2d, sample_phantom_3d, write_labels

    (img, meta, kind), (labels, _, lkind) = sample_phantom_2d()
    assert img.shape == (256, 256) and kind == "image" and lkind == "labels"
    (vol, _, _), _ = sample_phantom_3d()
    assert vol.ndim == 3
    out = write_labels(str(tmp_path / "l.nii.gz"), labels, {})
    np.testing.assert_array_equal(read_image(out[0]), labels)


@pytest.mark.gui
def test_the_app_starts_without_third_party_warnings(tmp_path):
    """The launcher's normal path (model load, numba warm-up, embedding, screenshot) prints no warning: timm's
    deprecation FutureWarnings used to appear in the middle of the output."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "ROBUSTMEDSAM_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("PYTHONWARNINGS", None)  # Python's default filters, as a user runs it (FutureWarnings are shown)
    result = subprocess.run(
        [sys.executable, "-m", "napari_robustmedsam.launch", "--phantom",
         "--screenshot", str(tmp_path / "shot.png")],
        capture_output=True, text=True, env=env, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "shot.png").is_file()
    assert "Warning" not in result.stderr, result.stderr[-2000:]


def test_series_tab_sends_a_folder_that_is_one_dicom_volume_to_file_open(tmp_path):
    from medical_fixtures import synthetic_hu, write_dicom_series

    from napari_robustmedsam.errors import UserFacingError
    from napari_robustmedsam.widgets.image_series import list_series

    volume = tmp_path / "CT_series"
    write_dicom_series(volume, synthetic_hu((4, 32, 32)))
    with pytest.raises(UserFacingError, match=r"one DICOM series of 4 slices, a volume: open it with File > Open"):
        list_series(volume)
    for f in volume.iterdir():  # as many scanners write them: no suffix
        f.rename(f.with_suffix(""))
    with pytest.raises(UserFacingError, match="DICOM files without a file suffix"):
        list_series(volume)
    separate = tmp_path / "xrays"  # one image per series (radiographs): a series of images, as the tab expects
    for i in range(2):
        write_dicom_series(separate / f"s{i}", synthetic_hu((1, 32, 32), seed=i))
        (separate / f"s{i}").iterdir().__next__().rename(separate / f"x{i}.dcm")
    assert [p.name for p in list_series(separate)] == ["x0.dcm", "x1.dcm"]
