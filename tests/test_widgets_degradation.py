"""Live degradation preview, segment-on-degraded and the robustness sweep in a real viewer."""

from __future__ import annotations


import numpy as np
import pytest

from napari_robustmedsam.annotation.model_info import preimport_model_modules
from widget_helpers import shared_cache, shot, tight_box, wait_idle

preimport_model_modules()  # before any viewer exists (triton + Mesa GL, see its docstring)

pytestmark = pytest.mark.gui












@pytest.fixture
def annotated(make_napari_viewer, qtbot, litemedsam, tmp_path_factory):
    """Viewer + main widget on the synthetic MRI phantom with the organ segmented from a box."""
    from napari_robustmedsam.engine.embeddings import open_engine
    from napari_robustmedsam.sample_data import mri_phantom

    viewer = make_napari_viewer(show=True)
    viewer.window.resize(1400, 900)
    image, truth = mri_phantom(256, seed=0)
    layer = viewer.add_image(image, name="MRI phantom")
    _, widget = viewer.window.add_plugin_dock_widget("napari-robustmedsam", "RobustMedSAM")
    annotator = widget.annotator
    annotator.state.set_model(litemedsam, open_engine(litemedsam, cache_dir=shared_cache(tmp_path_factory)))
    assert annotator.set_image_layer(layer)
    with qtbot.waitSignal(annotator.segmented, timeout=300_000):
        annotator.add_box(tight_box(truth >= 1))
    wait_idle(qtbot)
    assert annotator.session.has_current
    return viewer, widget, image


def test_preview_layer_updates_live_and_segment_on_degraded_gives_dice(annotated, qtbot):
    viewer, widget, image = annotated
    preview = widget.preview
    widget.show_tab("degrade")  # the preview runs while its tab is shown
    assert preview.live_check.isChecked()
    with qtbot.waitSignal(preview.preview_updated, timeout=60_000):
        preview.set_settings(name="gaussian_noise", level="LQ-2", seed=1, modality="mri")
    wait_idle(qtbot)
    layer = viewer.layers["degraded"]
    first = np.asarray(layer.data).copy()
    assert first.shape == image.shape and first.dtype == image.dtype and not np.array_equal(first, image)
    assert tuple(layer.contrast_limits) == tuple(viewer.layers["MRI phantom"].contrast_limits)
    # degraded images with the box-only base model: the shipped robust head is suggested, with its figures
    assert preview.head_hint.isVisible() and "robust-lite" in preview.head_hint.text()

    # moving a control updates the same layer (debounced, in a worker)
    with qtbot.waitSignal(preview.preview_updated, timeout=60_000):
        preview.set_settings(name="rician_noise", severity=0.9)
    wait_idle(qtbot)
    second = np.asarray(viewer.layers["degraded"].data)
    assert not np.array_equal(first, second)
    assert "rician_noise severity 0.90" in preview.timing.text()
    print(f"preview latency (control change -> layer updated): {preview.last_latency * 1000:.0f} ms")
    shot(viewer, "20_degradation_preview")

    # a type list filtered by modality: MRI offers its k-space artifacts, ultrasound its speckle
    types = [preview.type_combo.itemText(i) for i in range(preview.type_combo.count())]
    assert "mri_ghosting" in types and "acoustic_shadow" not in types

    with qtbot.waitSignal(preview.compared, timeout=300_000) as blocker:
        assert preview.segment_on_degraded()
    wait_idle(qtbot)
    result = blocker.args[0]
    assert 0.0 <= result.dice <= 1.0 and result.clean_mask.any()
    assert "Dice clean vs degraded" in preview.compare_box.dice_label.text()
    assert preview.compare_box.isVisible()
    assert {"mask on clean", "mask on degraded"} <= {layer.name for layer in viewer.layers}
    print(f"segment on degraded ({result.setting}): Dice {result.dice:.3f}")
    shot(viewer, "21_segment_on_degraded")


def test_fast_preview_updates_within_the_change_once_per_set_settings(annotated, qtbot):
    """A fast degradation is shown before the control change returns (no timer, no worker), one update for all
    the changes of ``set_settings``, into the same layer and array."""
    from napari_robustmedsam.annotation.robustness import degrade_slice
    from widget_helpers import any_running

    viewer, widget, image = annotated
    preview = widget.preview
    widget.show_tab("degrade")
    qtbot.waitUntil(lambda: preview.degraded_layer is not None and not any_running(), timeout=60_000)
    layer = preview.degraded_layer
    data = layer.data
    updates = []
    preview.preview_updated.connect(updates.append)
    preview.set_settings(name="brightness", severity=0.8, seed=3)  # type, mode, severity and seed change
    assert len(updates) == 1
    assert preview.degraded_layer is layer and layer.data is data
    s = preview.settings()
    expected = degrade_slice(image, s["name"], s["level"], s["severity"], s["seed"], s["modality"])
    np.testing.assert_array_equal(np.asarray(layer.data), expected)
    assert preview.preview_modes["sync"] >= 1
    assert "Note:" not in preview.timing.text()

    # a copy that lost the image's contrast is said so under the preview (degradations.signal_loss)
    import time

    source, kind, z, clean = preview._source()
    preview._finish(source, kind, z, np.zeros_like(clean), preview.settings(), 0.001, time.perf_counter(), clean)
    assert "keeps 0% of the image's contrast" in preview.timing.text()


def test_robustness_sweep_shows_a_table(annotated, qtbot, tmp_path):
    viewer, widget, _ = annotated
    sweep = widget.sweep
    widget.show_tab("sweep")
    sweep.modality_combo.setCurrentText("mri")
    with qtbot.waitSignal(sweep.finished, timeout=300_000) as blocker:
        assert sweep.run(types=["gaussian_noise", "gaussian_blur"], levels=["LQ-3"])
    wait_idle(qtbot)
    table = blocker.args[0]
    assert table.matrix().shape == (2, 1) and np.isfinite(table.matrix()).all()
    assert sweep.table.rowCount() == 2 and sweep.table.columnCount() == 1
    assert sweep.table.item(0, 0).text() == f"{table.matrix()[0, 0]:.3f}"
    assert sweep.plot.pixmap() is not None and not sweep.plot.pixmap().isNull()
    print("sweep Dice:\n" + table.to_markdown())
    out = table.save(tmp_path / "sweep.csv")
    assert out.read_text().startswith("type,level,dice")
    shot(viewer, "22_robustness_sweep")

    # the sweep asks for prompts first when there are none
    widget.annotator.clear()
    assert sweep.run(types=["gaussian_noise"], levels=["LQ-1"]) is None
    assert "no prompts" in sweep.banner.text()
