"""The "Fine-tune on my labels" widget: a 1-epoch fine-tune on the synthetic MRI phantom (GUI, xvfb)."""

from __future__ import annotations

import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

pytestmark = pytest.mark.gui


def test_widget_finetunes_the_phantom(make_napari_viewer, qtbot, tmp_path, monkeypatch):
    from napari_robustmedsam.sample_data import mri_phantom
    from napari_robustmedsam.widgets.finetune import FinetuneWidget
    from training.finetune import PromptConfig

    monkeypatch.setenv("ROBUSTMEDSAM_CACHE_DIR", str(tmp_path / "cache"))
    viewer = make_napari_viewer()
    image, labels = mri_phantom(80, seed=1)
    viewer.add_image(image, name="phantom")
    viewer.add_labels(labels.astype("uint8"), name="phantom labels")
    widget = FinetuneWidget(viewer)
    qtbot.addWidget(widget)
    assert widget.pairs() == [("phantom", "phantom labels")]
    widget.add_current_pair()
    assert widget.pairs_list.count() == 1
    widget.epochs_spin.setValue(1)
    widget.steps_spin.setValue(1)
    widget.variants_spin.setValue(1)
    widget.levels_combo.setCurrentText("mild (LQ-1, LQ-2)")
    widget.out_edit.setText(str(tmp_path / "out"))
    widget.extra_config = dict(objects_per_image=1, prompts=PromptConfig(n_steps=1), val_max_objects=1)
    steps = []
    widget._bridge.step.connect(steps.append)
    assert widget.start() is not None
    qtbot.waitUntil(lambda: widget.result is not None or widget.error is not None, timeout=600_000)
    assert widget.error is None, widget.error
    assert widget.result.stopped == "completed"
    assert (tmp_path / "out" / "best.pth").is_file() and (tmp_path / "out" / "last.pth").is_file()
    assert steps and len(widget.plot.y) == len(steps) == 1
    assert widget.load_button.isEnabled()
    with qtbot.waitSignal(widget.checkpoint_ready, timeout=5000) as blocker:
        path = widget.load_into_annotator()
    assert blocker.args == [path]
    from napari_robustmedsam.widgets._state import get_state

    state = get_state(viewer)
    qtbot.waitUntil(lambda: not state.is_loading, timeout=300_000)
    assert state.loaded is not None and state.loaded.decoder == "robust"


def test_widget_reports_empty_labels(make_napari_viewer, qtbot):
    import numpy as np

    from napari_robustmedsam.widgets.finetune import FinetuneWidget

    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((32, 32), np.float32), name="img")
    viewer.add_labels(np.zeros((32, 32), np.uint8), name="empty")
    widget = FinetuneWidget(viewer)
    qtbot.addWidget(widget)
    assert widget.start() is None
    assert "all background" in widget.banner.text()
