""""Fine-tune on my labels": the fine-tune tab of the main dock (also its own npe2 widget).

It trains on every Labels layer of the viewer that matches an image layer (:mod:`.finetune_layers`: 2D images and
the labelled slices of volumes, the annotator's committed objects included), with a recipe of
:mod:`training.finetune.presets` (the presets of ``python -m training.fit``), and says how long it will take
before it starts (:mod:`training.finetune.time_estimate`). During the run: progress, Cancel, and a live curve of
the loss and of the held-back Dice. At the end the never-worse check (:mod:`training.finetune.never_worse`) decides
whether the fine-tuned model replaces the current one; the decision, its numbers and a before / after table are
shown, "Load into annotator" and "Back to the previous model" swap models by hand, and the unlabelled planes are
ranked by the model's uncertainty ("Which image next", :mod:`training.finetune.next_image`).

The run itself is :class:`training.finetune.user_run.UserFinetune`; nothing here trains or scores.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
from qtpy.QtCore import QObject, Qt, QTimer, Signal
from qtpy.QtWidgets import QListWidgetItem, QTableWidgetItem, QVBoxLayout, QWidget

from ._common import run_task
from .finetune_form import LEVEL_SETS, build_form, default_out_dir
from .finetune_layers import count_planes_to_rank, find_pairs, planes_to_rank



def _training():
    # training imports torch: only when the tab is built, after preimport_model_modules has kept triton out of an
    # already running napari (its LLVM must not load after the GL context: Mesa crash)
    from ..annotation.model_info import preimport_model_modules

    preimport_model_modules(block_triton=True)
    from training.finetune import presets

    return presets


class _Bridge(QObject):
    step = Signal(object)  # per-iteration info dict, emitted from the worker thread (queued to the GUI)
    epoch = Signal(object)  # per-validation row


class FinetuneWidget(QWidget):
    """Fine-tune the model on the labels painted in the viewer; keep it only if it is better (see the module doc)."""

    #: emitted with the path of the fine-tuned checkpoint when it is loaded into the annotator
    checkpoint_ready = Signal(str)

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.setObjectName("robustmedsam-finetune")
        self.result = None  # UserRunResult of the last run
        self.error: BaseException | None = None
        self.handle = None
        self.previous_model: str | None = None  # what "Back to the previous model" loads
        self.extra_config: dict = {}  # TrainConfig fields set on top of the form (tests, power users)
        self.estimate = None
        self._bridge = _Bridge()
        self._bridge.step.connect(self._on_step)
        self._bridge.epoch.connect(self._on_epoch)
        self.plot = None
        self.built = False
        QVBoxLayout(self)

    def ensure_built(self) -> "FinetuneWidget":
        """Build the form. Why not in __init__: the training package (torch, the degradation library) takes about
        a second to import, and the main dock must open without that pause; the tab is built when first shown."""
        if not self.built:
            self.built = True
            self._build()
        return self

    def _build(self) -> None:
        from ._state import get_state
        from .modality_follower import ModalityFollower

        self._presets = _training()
        build_form(self, self._presets)
        self.modality_follower = ModalityFollower(get_state(self.viewer), self.modality_combo, "generic")

    # ---- the curve (matplotlib is imported when the tab is first shown)
    def ensure_plot(self):
        if self.plot is None:
            from .finetune_plot import FinetunePlot

            self.plot = FinetunePlot()
            self.plot_box.addWidget(self.plot)
        return self.plot

    def showEvent(self, event) -> None:  # noqa: N802 - Qt API
        self.ensure_built().ensure_plot()
        super().showEvent(event)

    # ---- data --------------------------------------------------------------------------------------
    def refresh_pairs(self, event=None) -> None:
        """List every labelled (image, Labels) pair of the viewer; the ones unticked stay unticked."""
        self.ensure_built()
        unticked = {self.pairs_list.item(i).text() for i in range(self.pairs_list.count())
                    if self.pairs_list.item(i).checkState() != Qt.CheckState.Checked}
        self._pairs = find_pairs(self.viewer)
        self.pairs_list.blockSignals(True)
        self.pairs_list.clear()
        for pair in self._pairs:
            item = QListWidgetItem(pair.title)
            item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
            item.setCheckState(Qt.CheckState.Unchecked if pair.title in unticked else Qt.CheckState.Checked)
            self.pairs_list.addItem(item)
        self.pairs_list.blockSignals(False)
        planes = sum(p.labelled_planes for p in self._pairs)
        self.pairs_summary.setText(f"{planes} labelled plane(s) in {len(self._pairs)} Labels layer(s)" if self._pairs
                                   else "no Labels layer matches an image yet: label a few images or slices "
                                   "(Annotate tab, C commits) or open your label files")
        self._schedule_estimate()

    def pairs(self):
        """The ticked (image, Labels) pairs."""
        self.ensure_built()
        return [p for i, p in enumerate(self._pairs)
                if i < self.pairs_list.count() and self.pairs_list.item(i).checkState() == Qt.CheckState.Checked]

    def collect(self):
        """The training planes of the ticked pairs (training.finetune TrainItems) and the notices."""
        from training.finetune import TrainingError, items_from_arrays

        pairs = self.pairs()
        if not pairs:
            raise TrainingError("no labelled image: label a few images or slices first (Annotate tab, C commits an "
                                "object), or open a Labels layer that matches an image")
        names = [p.image.name if sum(q.image is p.image for q in pairs) == 1 else f"{p.image.name}+{p.labels.name}"
                 for p in pairs]
        notices: list[str] = []
        items = items_from_arrays([np.asarray(p.image.data) for p in pairs], [np.asarray(p.labels.data) for p in pairs],
                                  names=names, modality=self.modality_combo.currentText(), notices=notices)
        return items, notices

    # ---- recipe --------------------------------------------------------------------------------------
    @property
    def preset_name(self) -> str:
        return self.preset_combo.currentText()

    def apply_preset(self, name: str) -> None:
        """Show the preset's sentence and put its values in the fields."""
        p = self._presets.PRESETS[name]
        s = p.settings
        self.preset_use.setText(p.use)
        self.preset_combo.setToolTip(p.use)
        defaults = self._presets.preset_config(name)
        self.model_edit.setText(str(defaults.model))
        self.epochs_spin.setValue(int(defaults.epochs))
        self.steps_spin.setValue(int(defaults.steps_per_epoch or 0))
        self.variants_spin.setValue(int(defaults.variants))
        self.budget_spin.setValue((s.get("time_budget_s") or 0) / 60.0)
        self._schedule_estimate()

    def config(self):
        """The run's settings: the chosen preset with the form's values on top (and :attr:`extra_config`)."""
        levels = LEVEL_SETS[self.levels_combo.currentText()]
        settings = dict(
            model=self.model_edit.text().strip() or self._presets.preset(self.preset_name).settings.get(
                "model", "litemedsam_robust"),
            epochs=self.epochs_spin.value(),
            steps_per_epoch=self.steps_spin.value() or None,
            variants=self.variants_spin.value() if levels else 0,
            levels=levels or ("LQ-1",),
            time_budget_s=self.budget_spin.value() * 60.0 or None,
            progress_bar=False,
        )
        if not levels:
            settings["p_identity"] = 1.0  # clean images only: every "degraded" branch is the clean image
        cfg = self._presets.preset_config(self.preset_name, **settings)
        return dataclasses.replace(cfg, **self.extra_config) if self.extra_config else cfg

    def current_model_source(self) -> str:
        """What the annotator uses now (registry name or checkpoint), as load_model takes it."""
        from ..models.registry import DEFAULT_MODEL, MODELS
        from ._state import get_state

        loaded = get_state(self.viewer).loaded
        if loaded is None:
            return DEFAULT_MODEL
        if loaded.name in MODELS or loaded.checkpoint_path is None:
            return loaded.name
        return str(loaded.checkpoint_path)

    def _schedule_estimate(self) -> None:
        self._estimate_timer.start()

    def update_estimate(self):
        """The time estimate of a run with the current data and settings, shown above the Fine-tune button."""
        from training.finetune.never_worse import plan_holdout
        from training.finetune.time_estimate import estimate, known_costs

        try:
            items, _ = self.collect()
            cfg = self.config()
        except Exception as err:  # noqa: BLE001 - nothing to estimate yet; the reason is shown on Start
            self.estimate = None
            self.estimate_label.setText("Estimated time: - (" + str(err).split(":")[0] + ")")
            return None
        plan = plan_holdout(items, self._presets.preset(self.preset_name).val_fraction, cfg.seed)
        n_rank = min(count_planes_to_rank(self.viewer, self.pairs()), _max_ranked())
        self.estimate = estimate(plan, cfg, known_costs(self.preset_name), rank_planes=n_rank)
        self.estimate_label.setText(f"Estimated time: {self.estimate.text()}. {plan.describe()}.")
        return self.estimate

    # ---- the run -----------------------------------------------------------------------------------------
    def start(self):
        """Start the fine-tune in a worker; returns the task handle (None if the inputs are wrong)."""
        self.ensure_built()
        from training.finetune.user_run import UserFinetune

        self.banner.clear_message()
        self.result, self.error = None, None
        from training.finetune.run_io import check_run_outputs

        if self.out_edit.text() == self._default_out and Path(self._default_out).exists():
            self._default_out = str(default_out_dir())  # each run its own folder: an earlier result stays
            self.out_edit.setText(self._default_out)
        try:
            items, notices = self.collect()
            cfg = self.config()
            ranked = planes_to_rank(self.viewer, self.pairs(), self.modality_combo.currentText())
            out = check_run_outputs(Path(self.out_edit.text()).expanduser())  # never over an earlier run
        except Exception as err:  # noqa: BLE001 - shown in the widget
            self.banner.show_error(err)
            return None
        self.update_estimate()
        run = UserFinetune(cfg, items, out, preset_name=self.preset_name, current_model=self.current_model_source(),
                           hold_back_fraction=self._presets.preset(self.preset_name).val_fraction,
                           device=cfg.device, notices=notices, rank=ranked)
        self.ensure_plot().clear()
        self.table.hide()
        self.next_box.hide()
        self.start_button.setEnabled(False)
        self.load_button.setEnabled(False)
        self.status.setText(run.plan.describe())
        self._t0 = time.perf_counter()
        bridge = self._bridge

        def work(handle):
            run.on_step, run.on_epoch = bridge.step.emit, bridge.epoch.emit
            run.progress, run.cancel = handle.report, handle.is_cancelled
            return run.run()

        self.handle = run_task(work, self._done, self._failed, name="fine-tuning", row=self.task_row)
        return self.handle

    def _on_step(self, info: dict) -> None:
        plot = self.ensure_plot()
        if not plot.boundaries or plot.boundaries[-1][1] != info.get("run"):
            plot.mark_run(int(info["x"]) - 1, str(info.get("run")))
        plot.add(int(info["x"]), float(info["loss"]))
        self.status.setText(f"{info.get('run')}: iteration {info['global_step']}, loss {info['loss']:.3f} "
                            f"({time.perf_counter() - self._t0:.0f} s so far)")

    def _on_epoch(self, row: dict) -> None:
        self.ensure_plot().add_validation(int(row.get("x", 0)), row)

    def _done(self, result) -> None:
        self.result = result
        self.start_button.setEnabled(True)
        decision = result.decision
        self.load_button.setEnabled(result.checkpoint is not None)
        self.load_button.setText(load_button_text(decision))
        if result.stopped in ("cancelled", "interrupted", "nan"):
            self.banner.show_message(f"{result.stopped}: {result.message} The current model is kept.", "warning")
            return
        if decision is not None:
            used = decision.swapped and self.auto_check.isChecked()
            text = decision.summary() + (" It is now used; Back to the previous model undoes that." if used else "")
            self.banner.show_message(text, "hint" if decision.swapped else "warning")
            self._fill_table(decision)
        self.status.setText(f"done in {result.seconds:.0f} s; checkpoint {result.checkpoint}")
        self._fill_ranking(result.ranking)
        QTimer.singleShot(0, self.show_results)
        if decision is not None and decision.swapped and self.auto_check.isChecked():
            self.load_into_annotator()

    def show_results(self) -> None:
        """Scroll the tab (inside the dock's scroll area) so that the decision and the table are in view."""
        from qtpy.QtWidgets import QScrollArea

        parent = self.parentWidget()
        while parent is not None and not isinstance(parent, QScrollArea):
            parent = parent.parentWidget()
        if parent is not None:
            parent.ensureWidgetVisible(self.next_box if self.next_box.isVisible() else self.table, 0, 0)
            parent.ensureWidgetVisible(self.banner, 0, 0)

    def _failed(self, err, tb) -> None:
        self.error = err
        self.start_button.setEnabled(True)
        self.banner.show_error(err)

    def _fill_table(self, decision) -> None:
        from training.finetune.never_worse import CLEAN, score_key

        rows = decision.rows
        # one row per held-back plane and judged condition (as labelled, then its degraded copies), named as the
        # judge keys them, and a mean row per condition
        row_conditions = [row.get("condition", CLEAN) for row in rows]  # decisions saved before conditions: clean
        conditions = list(dict.fromkeys(row_conditions))
        self.table.setRowCount(len(rows) + len(conditions))
        keys = ("box_before", "box_after", "clicks_before", "clicks_after")
        for r, (row, condition) in enumerate(zip(rows, row_conditions)):
            self.table.setItem(r, 0, QTableWidgetItem(score_key(str(row["plane"]), condition)))
            for c, key in enumerate(keys, start=1):
                self.table.setItem(r, c, QTableWidgetItem(f"{row[key]:.3f}"))
        for m, condition in enumerate(conditions, start=len(rows)):
            chosen = [row for row, rc in zip(rows, row_conditions) if rc == condition]
            self.table.setItem(m, 0, QTableWidgetItem(score_key("mean", condition)))
            for c, key in enumerate(keys, start=1):
                self.table.setItem(m, c, QTableWidgetItem(f"{np.mean([row[key] for row in chosen]):.3f}"))
        from qtpy.QtWidgets import QHeaderView

        header = self.table.horizontalHeader()
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        for c in range(1, 5):
            header.setSectionResizeMode(c, QHeaderView.ResizeMode.ResizeToContents)
        self.table.resizeRowsToContents()
        rows_px = sum(self.table.rowHeight(r) for r in range(self.table.rowCount()))
        self.table.setFixedHeight(rows_px + header.sizeHint().height() + 2 * self.table.frameWidth() + 2)
        self.table.setVisible(bool(rows))

    def _fill_ranking(self, ranking) -> None:
        self.next_list.clear()
        for r in ranking:
            item = QListWidgetItem(f"{r.key}   uncertainty {r.uncertainty:.2f}")
            item.setData(Qt.ItemDataRole.UserRole, (r.layer, r.z))
            item.setToolTip(f"1 - Dice(clean, degraded) {r.disagreement:.2f}; 1 - predicted IoU {r.doubt:.2f}")
            self.next_list.addItem(item)
        self.next_list.setMaximumHeight(min(160, 22 * max(1, len(ranking)) + 6))
        self.next_box.setVisible(bool(ranking))

    def _go_to_ranked(self, item: QListWidgetItem) -> None:
        """Show the ranked plane: its image becomes the annotator's, on that slice."""
        from ._state import get_state
        from .annotation_layers import show_slice

        name, z = item.data(Qt.ItemDataRole.UserRole)
        if name not in self.viewer.layers:
            self.banner.show_error(f"the layer {name!r} is no longer open")
            return
        layer = self.viewer.layers[name]
        annotator = get_state(self.viewer).annotator
        if annotator is not None:
            annotator.set_image_layer(layer)
        if z is not None:
            show_slice(self.viewer, layer, int(z))

    # ---- swapping models -----------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path | None:
        return None if self.result is None else self.result.checkpoint

    def load_into_annotator(self) -> str | None:
        """Make the fine-tuned checkpoint the plugin's current model (hot swap through the shared plugin state);
        remembers the model it replaces for "Back to the previous model". Returns the checkpoint path."""
        path = self.checkpoint_path
        if path is None:
            self.banner.show_error("no fine-tuned checkpoint yet")
            return None
        self.previous_model = self.current_model_source()
        self._load(str(path))
        self.checkpoint_ready.emit(str(path))
        self.back_button.setEnabled(True)
        return str(path)

    def back_to_previous(self) -> str | None:
        """Load the model that was current before the fine-tuned one."""
        if self.previous_model is None:
            return None
        source, self.previous_model = self.previous_model, None
        self._load(source)
        self.back_button.setEnabled(False)
        self.status.setText(f"back to {source}")
        return source

    def _load(self, source: str) -> None:
        from ._state import get_state

        get_state(self.viewer).load_model(source, "auto", row=self.task_row,
                                          on_error=lambda err, tb: self.banner.show_error(err))


def _max_ranked() -> int:
    from training.finetune.next_image import MAX_RANKED

    return MAX_RANKED


def load_button_text(decision) -> str:
    """What loading the candidate means after the decision: a kept candidate either scored lower, or higher by less
    than the gain a swap needs (never_worse.MIN_GAIN)."""
    if decision is None or decision.swapped:
        return "Load into annotator"
    if decision.delta is not None and decision.delta > 0:
        return "Load anyway (its gain is too small)"
    return "Load anyway (it scored lower)"
