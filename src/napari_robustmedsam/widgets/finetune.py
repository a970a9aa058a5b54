""""Fine-tune on my labels": train the robust decoder on the image / Labels layers of the viewer.

Pick one or more (image layer, Labels layer) pairs (2D images, or volumes whose labelled slices are used),
the number of epochs and the degradation set (modality + levels); training runs in napari's thread worker
(progress bar, live loss curve, Cancel = stop after the current iteration with a resumable checkpoint).
At the end "Load into annotator" loads the fine-tuned checkpoint as the current model of the plugin (the
model panel / annotator pick it up through the shared plugin state) and emits :attr:`FinetuneWidget.
checkpoint_ready` with the checkpoint path.

The training itself is :mod:`training.finetune` (the same code as ``python -m training.fit``).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
from qtpy.QtCore import QObject, Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ._common import Banner, TaskRow, role_of, run_task, unwrap

#: the recipe of :mod:`training.finetune.presets` the panel starts from (its own choices go on top)
WIDGET_PRESET_NAME = "quick"


def widget_preset():
    # training imports torch: it is imported when the panel opens, not when napari lists the plugin's widgets,
    # and after preimport_model_modules has kept triton out of an already running napari (see start())
    from training.finetune.presets import PRESETS

    return PRESETS[WIDGET_PRESET_NAME]

LEVEL_SETS = {
    "all levels (LQ-1 .. LQ-3+)": ("LQ-1", "LQ-2", "LQ-3", "LQ-3+"),
    "mild (LQ-1, LQ-2)": ("LQ-1", "LQ-2"),
    "severe (LQ-3, LQ-3+)": ("LQ-3", "LQ-3+"),
    "none (clean images only)": (),
}


def default_out_dir() -> Path:
    return Path.home() / "robustmedsam-finetune" / time.strftime("%Y%m%d-%H%M%S")


class _Bridge(QObject):
    step = Signal(object)  # per-iteration info dict, emitted from the worker thread (queued to the GUI)
    epoch = Signal(object)


class LossPlot(QWidget):
    """A small live loss curve (matplotlib in Qt)."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.figure = Figure(figsize=(3.6, 1.8), tight_layout=True)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.ax = self.figure.add_subplot(111)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.canvas)
        self.x: list[int] = []
        self.y: list[float] = []
        self.clear()

    def clear(self) -> None:
        self.x, self.y = [], []
        self.ax.clear()
        self.ax.set_xlabel("iteration", fontsize=7)
        self.ax.set_ylabel("loss", fontsize=7)
        self.ax.tick_params(labelsize=6)
        self.canvas.draw_idle()

    def add(self, step: int, loss: float) -> None:
        self.x.append(step)
        self.y.append(loss)
        self.ax.clear()
        self.ax.plot(self.x, self.y, lw=1)
        self.ax.set_xlabel("iteration", fontsize=7)
        self.ax.set_ylabel("loss", fontsize=7)
        self.ax.tick_params(labelsize=6)
        self.canvas.draw_idle()


class FinetuneWidget(QWidget):
    """Fine-tune the (lite) robust decoder on the labels painted in the viewer."""

    #: emitted with the path of the fine-tuned checkpoint when the user loads it (or calls load_into_annotator)
    checkpoint_ready = Signal(str)

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        from ..degradations import MODALITIES

        preset = widget_preset()
        self.viewer = napari_viewer
        self.setObjectName("robustmedsam-finetune")
        self.result = None  # TrainResult of the last run
        self.error: BaseException | None = None
        self.handle = None
        self._bridge = _Bridge()
        self._bridge.step.connect(self._on_step)
        self._bridge.epoch.connect(self._on_epoch)

        self.image_combo = QComboBox()
        self.labels_combo = QComboBox()
        self.add_pair_button = QPushButton("Add pair")
        self.add_pair_button.clicked.connect(self.add_current_pair)
        self.pairs_list = QListWidget()
        self.pairs_list.setMaximumHeight(70)
        self.pairs_list.setToolTip("image / Labels pairs to train on (the selected pair is used when the list is empty)")
        self.remove_pair_button = QPushButton("Remove")
        self.remove_pair_button.clicked.connect(self._remove_pair)
        self.model_edit = QLineEdit(preset.settings["model"])
        self.model_edit.setToolTip("registry name or checkpoint to start from (its encoders stay frozen)")
        self.epochs_spin = QSpinBox()
        self.epochs_spin.setRange(1, 1000)
        self.epochs_spin.setValue(preset.settings["epochs"])
        self.steps_spin = QSpinBox()
        self.steps_spin.setRange(0, 100000)
        self.steps_spin.setValue(0)
        self.steps_spin.setSpecialValueText("one pass")
        self.modality_combo = QComboBox()
        self.modality_combo.addItems(list(MODALITIES))
        self.modality_combo.setCurrentText("generic")
        self.levels_combo = QComboBox()
        self.levels_combo.addItems(list(LEVEL_SETS))
        self.variants_spin = QSpinBox()
        self.variants_spin.setRange(1, 20)
        self.variants_spin.setValue(preset.settings["variants"])
        self.consistency_check = QCheckBox("consistency losses (RobustSAM)")
        self.consistency_check.setChecked(True)
        self.out_edit = QLineEdit(str(default_out_dir()))
        self.start_button = QPushButton("Fine-tune")
        self.start_button.clicked.connect(self.start)
        self.load_button = QPushButton("Load into annotator")
        self.load_button.setEnabled(False)
        self.load_button.clicked.connect(self.load_into_annotator)
        self.task_row = TaskRow()
        self.plot = LossPlot()
        self.banner = Banner()
        self.status = QLabel("")
        self.status.setWordWrap(True)

        self._lay_out()

        # small-run settings used by the worker (tests and power users may change them)
        self.extra_config: dict = {}
        self._refresh_layers()
        self.viewer.layers.events.inserted.connect(self._refresh_layers)
        self.viewer.layers.events.removed.connect(self._refresh_layers)

    def _lay_out(self) -> None:
        """The settings in a form (one row each, in the order of a run's recipe), then the buttons, the progress,
        the loss plot and the messages."""
        form = QFormLayout()
        form.addRow("Image", self.image_combo)
        row = QHBoxLayout()
        row.addWidget(self.labels_combo, 1)
        row.addWidget(self.add_pair_button)
        form.addRow("Labels", row)
        prow = QHBoxLayout()
        prow.addWidget(self.pairs_list, 1)
        prow.addWidget(self.remove_pair_button)
        form.addRow("Pairs", prow)
        form.addRow("Start from", self.model_edit)
        form.addRow("Epochs", self.epochs_spin)
        form.addRow("Iterations / epoch", self.steps_spin)
        form.addRow("Modality", self.modality_combo)
        form.addRow("Degradations", self.levels_combo)
        form.addRow("Variants / image", self.variants_spin)
        form.addRow("", self.consistency_check)
        form.addRow("Output folder", self.out_edit)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        buttons = QHBoxLayout()
        buttons.addWidget(self.start_button)
        buttons.addWidget(self.load_button)
        layout.addLayout(buttons)
        layout.addWidget(self.task_row)
        layout.addWidget(self.plot)
        layout.addWidget(self.banner)
        layout.addWidget(self.status)
        layout.addStretch(1)

    # ---- layers -----------------------------------------------------------------------------------
    def _layers(self, kind: str) -> list:
        from napari.layers import Image, Labels

        cls = Image if kind == "image" else Labels
        return [unwrap(layer) for layer in self.viewer.layers if isinstance(unwrap(layer), cls) and role_of(layer) is None]

    def _refresh_layers(self, event=None) -> None:
        for combo, kind in ((self.image_combo, "image"), (self.labels_combo, "labels")):
            current = combo.currentText()
            combo.blockSignals(True)
            combo.clear()
            combo.addItems([layer.name for layer in self._layers(kind)])
            if current:
                combo.setCurrentText(current)
            combo.blockSignals(False)

    def add_current_pair(self) -> None:
        image, labels = self.image_combo.currentText(), self.labels_combo.currentText()
        if not image or not labels:
            self.banner.show_error("choose an image layer and a Labels layer first")
            return
        text = f"{image}  ↔  {labels}"
        if not any(self.pairs_list.item(i).text() == text for i in range(self.pairs_list.count())):
            self.pairs_list.addItem(text)

    def _remove_pair(self) -> None:
        for item in self.pairs_list.selectedItems():
            self.pairs_list.takeItem(self.pairs_list.row(item))

    def pairs(self) -> list[tuple[str, str]]:
        out = [tuple(self.pairs_list.item(i).text().split("  ↔  ")) for i in range(self.pairs_list.count())]
        if not out and self.image_combo.currentText() and self.labels_combo.currentText():
            out = [(self.image_combo.currentText(), self.labels_combo.currentText())]
        return out

    # ---- training -------------------------------------------------------------------------------------
    def _collect(self):
        from training.finetune import items_from_arrays

        pairs = self.pairs()
        if not pairs:
            raise ValueError("add at least one image / Labels pair")
        names = {layer.name: layer for layer in self._layers("image") + self._layers("labels")}
        images, labels, keys = [], [], []
        for image_name, labels_name in pairs:
            if image_name not in names or labels_name not in names:
                raise ValueError(f"layer {image_name!r} or {labels_name!r} no longer exists")
            images.append(np.asarray(names[image_name].data))
            labels.append(np.asarray(names[labels_name].data))
            keys.append(image_name if len(pairs) == 1 else f"{image_name}+{labels_name}")
        notices: list[str] = []
        items = items_from_arrays(images, labels, names=keys, modality=self.modality_combo.currentText(),
                                  notices=notices)
        return items, notices

    def config(self):
        """The run's settings: the "quick" preset (:mod:`training.finetune.presets`) with the panel's choices."""
        levels = LEVEL_SETS[self.levels_combo.currentText()]
        settings = dict(
            model=self.model_edit.text().strip() or widget_preset().settings["model"],
            epochs=self.epochs_spin.value(),
            steps_per_epoch=self.steps_spin.value() or None,
            variants=self.variants_spin.value() if levels else 0,
            levels=levels or ("LQ-1",),
        )
        if not levels:
            settings["p_identity"] = 1.0  # clean images only: every "degraded" branch is the clean image
        if not self.consistency_check.isChecked():
            settings.update(feature=0.0, token=0.0)
        from training.finetune.presets import preset_config

        cfg = preset_config(WIDGET_PRESET_NAME, **settings)
        return dataclasses.replace(cfg, **self.extra_config) if self.extra_config else cfg
    def start(self):
        """Start fine-tuning in a worker; returns the task handle (None if the inputs are wrong)."""
        from ..annotation.model_info import preimport_model_modules

        preimport_model_modules(block_triton=True)  # triton's LLVM must not load after the GL context (Mesa crash)
        from training.finetune import Trainer, split_items

        self.banner.clear_message()
        self.result = None
        self.error = None
        try:
            items, notices = self._collect()
            cfg = self.config()
        except Exception as err:  # noqa: BLE001 - shown in the widget
            self.banner.show_error(err)
            return None
        train, val = split_items(items, widget_preset().val_fraction, seed=cfg.seed, notices=notices)
        out = Path(self.out_edit.text()).expanduser()
        self.plot.clear()
        self.start_button.setEnabled(False)
        self.load_button.setEnabled(False)
        self.status.setText(f"training on {len(train)} image(s), validating on {len(val)}" +
                            ("".join(f"; {n}" for n in notices)))
        bridge = self._bridge

        def work(handle):
            trainer = Trainer(cfg, out, train, val, progress=handle.report, cancel=handle.is_cancelled,
                              on_step=bridge.step.emit, on_epoch=bridge.epoch.emit, notices=notices)
            return trainer.run()

        self.handle = run_task(work, self._done, self._failed, name="fine-tuning", row=self.task_row)
        return self.handle

    def _on_step(self, info: dict) -> None:
        self.plot.add(int(info["global_step"]), float(info["loss"]))

    def _on_epoch(self, row: dict) -> None:
        parts = [f"epoch {row.get('epoch')}"]
        for key in ("val_dice_clean_box", "val_dice_degraded_box", "val_dice_degraded_points3"):
            if row.get(key) is not None:
                parts.append(f"{key.replace('val_dice_', '')} {row[key]:.3f}")
        self.status.setText(", ".join(parts))

    def _done(self, result) -> None:
        self.result = result
        self.start_button.setEnabled(True)
        ok = result.best is not None or result.last is not None
        self.load_button.setEnabled(ok)
        text = f"{result.stopped}: checkpoints in {result.out_dir}"
        if result.message:
            text += f" ({result.message})"
        self.banner.show_message(text, "warning" if result.stopped in ("nan", "cancelled", "interrupted") else "hint")

    def _failed(self, err, tb) -> None:
        self.error = err
        self.start_button.setEnabled(True)
        self.banner.show_error(err)

    @property
    def checkpoint_path(self) -> Path | None:
        if self.result is None:
            return None
        return self.result.best or self.result.last

    def load_into_annotator(self) -> str | None:
        """Make the fine-tuned checkpoint the plugin's current model (hot swap through the shared plugin state)
        and emit :attr:`checkpoint_ready`. Returns the checkpoint path."""
        path = self.checkpoint_path
        if path is None:
            self.banner.show_error("no fine-tuned checkpoint yet")
            return None
        self.checkpoint_ready.emit(str(path))
        try:
            from ._state import get_state

            get_state(self.viewer).load_model(str(path), "auto", row=self.task_row,
                                              on_error=lambda err, tb: self.banner.show_error(err))
        except Exception as err:  # noqa: BLE001 - the annotator integration is optional
            self.banner.show_error(err)
        return str(path)
