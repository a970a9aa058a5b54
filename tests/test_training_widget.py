"""The "Fine-tune on my labels" tab (GUI, xvfb): its form, the labelled layers it finds, and the whole loop from
napari layers only: label 10 slices of a small volume, fine-tune, see the never-worse decision, load the result and
segment the next slice with it. Screenshot: tests/artifacts/finetune_tab.png (copied to docs/images)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from widget_helpers import dice, shot, tight_box, wait_idle  # noqa: E402

pytestmark = pytest.mark.gui


def test_the_tab_offers_the_presets_with_help_generated_from_the_settings(make_napari_viewer, qtbot, tmp_path,
                                                                           monkeypatch):
    from napari_robustmedsam.sample_data import mri_phantom, mri_phantom_volume
    from napari_robustmedsam.widgets._common import mark
    from napari_robustmedsam.widgets.main_widget import RobustMedSAMWidget
    from training.finetune.presets import PRESETS, preset_config, setting_help

    monkeypatch.setenv("ROBUSTMEDSAM_CACHE_DIR", str(tmp_path))
    viewer = make_napari_viewer()
    _, dock = viewer.window.add_plugin_dock_widget("napari-robustmedsam", "RobustMedSAM")
    assert isinstance(dock, RobustMedSAMWidget)
    dock.annotator.prefetch_check.setChecked(False)  # no model is needed here
    dock.show_tab("finetune")
    assert dock.tabs.tabText(dock.tabs.currentIndex()) == "Fine-tune"
    tab = dock.finetune
    assert [tab.preset_combo.itemText(i) for i in range(tab.preset_combo.count())] == list(PRESETS)
    for name in ("robust-lite", "pge-lite-fast", "quick"):
        tab.preset_combo.setCurrentText(name)
        assert tab.preset_use.text() == PRESETS[name].use
        cfg = preset_config(name)
        assert tab.epochs_spin.value() == cfg.epochs and tab.model_edit.text() == cfg.model
        assert tab.config().head == cfg.head and tab.config().batch_size == cfg.batch_size
    assert tab.epochs_spin.toolTip() == setting_help("epochs") and tab.model_edit.toolTip() == setting_help("model")
    assert tab.variants_spin.toolTip() == setting_help("variants")
    assert tab.budget_spin.toolTip().startswith(setting_help("time_budget_s"))
    tab.preset_combo.setCurrentText("quick")

    # every Labels layer matching an image is found: a 2D pair, a volume's labelled slices, the committed layer
    image2d, truth2d = mri_phantom(64, seed=3)
    viewer.add_image(image2d, name="slice")
    viewer.add_labels(truth2d, name="slice labels")
    volume, truth = mri_phantom_volume(12, 64, seed=1)
    labels = truth.copy()
    labels[10:] = 0
    vol = viewer.add_image(volume, name="vol")
    viewer.add_labels(labels, name="my labels")
    viewer.add_labels(np.zeros((5, 7), np.uint8), name="unrelated")  # matches no image
    current = mark(viewer.add_labels(truth, name="current object (test)"), "current")  # a prompt layer: not labels
    assert dock.annotator.image_layer is vol  # a newly opened image is the target: its committed layer exists
    committed = dock.annotator.committed_layer
    assert committed.name == "committed objects (vol)"
    data = np.asarray(committed.data).copy()
    data[11] = truth[11]
    committed.data = data
    tab.refresh_pairs()
    found = {(p.image.name, p.labels.name): p.labelled_planes for p in tab.pairs()}
    assert found == {("slice", "slice labels"): 1, ("vol", "my labels"): 10, ("vol", "committed objects (vol)"): 1}
    assert current.name not in tab.pairs_list.item(0).text()
    items, _ = tab.collect()
    assert len(items) == 12 and "vol+my labels/z009" in {it.key for it in items}
    from napari_robustmedsam.widgets.finetune_layers import count_planes_to_rank, planes_to_rank

    # which image next: the volume's slice labelled in no layer (10), not the ones labelled in either layer;
    # a 2D image of the labelled 2D image's size without labels
    viewer.add_image(mri_phantom(64, seed=4)[0], name="unlabelled slice")
    tab.refresh_pairs()
    ranked = planes_to_rank(viewer, tab.pairs())
    assert [(p.layer, p.z) for p in ranked] == [("vol", 10), ("unlabelled slice", None)]
    assert count_planes_to_rank(viewer, tab.pairs()) == 2
    from qtpy.QtCore import Qt

    tab.pairs_list.item(0).setCheckState(Qt.CheckState.Unchecked)
    assert len(tab.collect()[0]) == 11

    est = tab.update_estimate()
    assert est is not None and est.iterations > 0 and est.seconds > 0
    assert tab.estimate_label.text().startswith("Estimated time: about")
    assert "held back" in tab.estimate_label.text()


def test_the_loop_from_napari_layers_label_finetune_decide_load_segment(make_napari_viewer, qtbot, tmp_path,
                                                                        monkeypatch):
    """10 labelled slices of a small volume -> fine-tune in the tab -> never-worse decision shown and saved ->
    load into the annotator -> the next slice is segmented by the fine-tuned model."""
    from napari_robustmedsam.checkpoints import load_model
    from napari_robustmedsam.sample_data import mri_phantom_volume
    from napari_robustmedsam.widgets._state import get_state
    from training.finetune import PromptConfig

    monkeypatch.setenv("ROBUSTMEDSAM_CACHE_DIR", str(tmp_path / "cache"))
    viewer = make_napari_viewer(show=True)
    viewer.window.resize(1500, 950)
    _, dock = viewer.window.add_plugin_dock_widget("napari-robustmedsam", "RobustMedSAM")
    dock.annotator.prefetch_check.setChecked(False)  # only the slices used are embedded: the test stays short
    volume, truth = mri_phantom_volume(12, 96, seed=1)
    layer = viewer.add_image(volume, name="MRI volume")
    labels = np.where(np.arange(12)[:, None, None] < 10, truth, 0).astype(np.uint8)
    viewer.add_labels(labels, name="MRI volume labels")  # the user's 10 labelled slices
    state = get_state(viewer)
    state.ensure_model(lambda loaded: None)  # the default model, as after launch
    qtbot.waitUntil(lambda: state.loaded is not None, timeout=300_000)
    wait_idle(qtbot)
    before = state.loaded

    dock.show_tab("finetune")
    tab = dock.finetune
    tab.refresh_pairs()
    assert [p.labelled_planes for p in tab.pairs()] == [10]
    tab.preset_combo.setCurrentText("quick")
    tab.epochs_spin.setValue(1)
    tab.steps_spin.setValue(3)
    tab.levels_combo.setCurrentText("none (clean images only)")
    tab.out_edit.setText(str(tmp_path / "run"))
    tab.extra_config = dict(objects_per_image=1, prompts=PromptConfig(n_steps=1), val_max_objects=1)
    steps, validations = [], []
    tab._bridge.step.connect(steps.append)
    tab._bridge.epoch.connect(validations.append)
    assert tab.start() is not None
    qtbot.waitUntil(lambda: tab.result is not None or tab.error is not None, timeout=1_800_000)  # a loaded CI box
    assert tab.error is None, tab.error
    res = tab.result
    assert res.stopped == "completed" and res.plan.mode == "hold-out" and len(res.plan.held_back) == 2
    # the live curve: every iteration's loss, the held-back Dice before training (x = 0) and after
    assert len(steps) == 3 and tab.plot.x == [1, 2, 3]
    xs = tab.plot.dice["val_dice_clean_box"][0]
    assert xs == [0, 3] and len(validations) == 2
    # the decision, its numbers, the table, and the checkpoint's metadata
    d = res.decision
    assert d is not None and d.current_model == "litemedsam" and len(d.rows) == 2
    assert tab.banner.text().startswith(d.summary()) and f"{d.candidate_score:.3f} vs {d.current_score:.3f}" in d.summary()
    assert tab.table.isVisibleTo(tab) and tab.table.rowCount() == 3
    saved = load_model(str(res.checkpoint), device="cpu").metadata["extra"]["never_worse"]
    assert saved["swapped"] == d.swapped and saved["candidate_score"] == pytest.approx(d.candidate_score)
    # which image next: the two unlabelled slices, ranked, a click goes there
    assert tab.next_box.isVisibleTo(tab) and tab.next_list.count() == 2
    assert {r.z for r in res.ranking} == {10, 11}
    tab._go_to_ranked(tab.next_list.item(0))
    assert dock.annotator.current_z() == res.ranking[0].z

    # load: at once if it won, else by hand ("Load anyway"); then "Back to the previous model" is offered
    if not d.swapped:
        assert tab.load_button.text().startswith("Load anyway")
        tab.load_into_annotator()
    qtbot.waitUntil(lambda: not state.is_loading and state.loaded is not before, timeout=300_000)
    assert state.loaded.checkpoint_path.resolve() == res.checkpoint.resolve() and tab.back_button.isEnabled()
    wait_idle(qtbot)
    shot(viewer, "finetune_tab")

    # segment the next slice with the fine-tuned model
    annotator = dock.annotator
    assert annotator.image_layer is layer
    annotator.set_slice(10)
    with qtbot.waitSignal(annotator.segmented, timeout=300_000):
        annotator.add_box(tight_box(truth[10] > 0), z=10)
    wait_idle(qtbot)
    assert annotator.state.loaded.checkpoint_path.resolve() == res.checkpoint.resolve()
    assert dice(annotator.session.current[10], truth[10] > 0) > 0.8

    assert tab.back_to_previous() == "litemedsam"
    qtbot.waitUntil(lambda: not state.is_loading and state.loaded.name == "litemedsam", timeout=300_000)

    # a fine-tune robust to degradations (the tab's default levels) is also judged on degraded copies: one table row
    # per plane and condition, and a mean row per condition
    from training.finetune.never_worse import PlaneScore, decide, score_key

    def scores(value):
        return {score_key(k, c): PlaneScore(k, value, value, 1, condition=c)
                for c in ("clean", "LQ-3") for k in ("z001", "z002")}

    tab._fill_table(decide(scores(0.8), scores(0.9), mode="hold-out", current_model="m", candidate_path="x"))
    names = [tab.table.item(r, 0).text() for r in range(tab.table.rowCount())]
    assert names == ["z001", "z002", "z001 @ LQ-3", "z002 @ LQ-3", "mean", "mean @ LQ-3"]


def test_the_tab_says_what_to_do_without_labels(make_napari_viewer, qtbot):
    from napari_robustmedsam.widgets.finetune import FinetuneWidget

    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((32, 32), np.float32), name="img")
    viewer.add_labels(np.zeros((32, 32), np.uint8), name="empty")
    widget = FinetuneWidget(viewer)
    qtbot.addWidget(widget)
    assert not widget.built  # built when first shown
    widget.ensure_built()
    assert widget.pairs() == []
    assert widget.start() is None
    assert "no labelled image" in widget.banner.text() and "Annotate tab" in widget.banner.text()


def test_a_run_never_writes_over_an_earlier_run(make_napari_viewer, qtbot, tmp_path):
    from napari_robustmedsam.widgets.finetune import FinetuneWidget

    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((32, 32), np.float32), name="img")
    labels = np.zeros((32, 32), np.uint8)
    labels[8:20, 8:20] = 1
    viewer.add_labels(labels, name="img labels")
    widget = FinetuneWidget(viewer).ensure_built()
    qtbot.addWidget(widget)
    earlier = tmp_path / "run"
    earlier.mkdir()
    (earlier / "last.pth").write_bytes(b"an earlier result")
    widget.out_edit.setText(str(earlier))
    assert widget.start() is None
    assert "already exists" in widget.banner.text()
    assert (earlier / "last.pth").read_bytes() == b"an earlier result"
