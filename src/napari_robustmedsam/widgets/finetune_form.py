"""The form of the Fine-tune tab (:mod:`.finetune`): its rows, their help and their signals, built when the tab is
first shown."""

from __future__ import annotations

import time
from pathlib import Path

from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QVBoxLayout,
    QWidget,
)

from ._common import Banner, TaskRow, shrinkable


def default_out_dir() -> Path:
    """A new folder for each run, so that no run writes over an earlier one."""
    return Path.home() / "robustmedsam-finetune" / time.strftime("%Y%m%d-%H%M%S")

#: the preset the tab starts with (one of training.finetune.presets.PRESETS)
DEFAULT_PRESET = "quick"

LEVEL_SETS = {
    "all levels (LQ-1 .. LQ-3+)": ("LQ-1", "LQ-2", "LQ-3", "LQ-3+"),
    "mild (LQ-1, LQ-2)": ("LQ-1", "LQ-2"),
    "severe (LQ-3, LQ-3+)": ("LQ-3", "LQ-3+"),
    "none (clean images only)": (),
}
_LEVELS_HELP = ("Degradation levels of the cached degraded copies the model learns to be robust to; LQ-1 (mild) "
                "to LQ-3 (severe) of the degradation library, LQ-3+ adds the modality's domain artefacts")
_MODALITY_HELP = "Which degradations of the library the copies get (the modality of your images)"


def build_form(w, presets) -> None:
    """Create the fine-tune widget ``w``'s rows and connect them. Long on purpose: it lays the tab out in its
    on-screen order (data, recipe, run, results), and splitting it would scatter one layout over several functions."""
    help_ = presets.setting_help
    help_ = presets.setting_help
    # ---- data
    w.pairs_list = QListWidget()
    w.pairs_list.setMaximumHeight(70)
    w.pairs_list.setWordWrap(True)
    w.pairs_list.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    w.pairs_list.setToolTip("Every Labels layer that covers an image layer pixel for pixel; each labelled "
                               "slice of a volume is one training plane. Untick a pair to leave it out.")
    w.pairs_list.itemChanged.connect(lambda _item: w._schedule_estimate())
    w.refresh_button = QPushButton("Refresh")
    w.refresh_button.setToolTip("Look for labelled images again (after painting or committing)")
    w.refresh_button.clicked.connect(w.refresh_pairs)
    # ---- recipe
    w.preset_combo = shrinkable(QComboBox(), 10)
    for name, p in presets.PRESETS.items():
        w.preset_combo.addItem(name)
        w.preset_combo.setItemData(w.preset_combo.count() - 1, p.use, Qt.ItemDataRole.ToolTipRole)
    w.preset_use = QLabel()
    w.preset_use.setWordWrap(True)
    w.preset_use.setStyleSheet("color:#bbbbbb;")
    w.model_edit = QLineEdit()
    w.model_edit.setToolTip(help_("model"))
    w.budget_spin = QDoubleSpinBox()
    w.budget_spin.setRange(0, 24 * 60)
    w.budget_spin.setDecimals(1)
    w.budget_spin.setSuffix(" min")
    w.budget_spin.setSpecialValueText("no limit")
    w.budget_spin.setToolTip(help_("time_budget_s") + "; for the whole fine-tune, its folds included")
    w.epochs_spin = QSpinBox()
    w.epochs_spin.setRange(1, 1000)
    w.epochs_spin.setToolTip(help_("epochs"))
    w.steps_spin = QSpinBox()
    w.steps_spin.setRange(0, 100000)
    w.steps_spin.setSpecialValueText("one pass")
    w.steps_spin.setToolTip(help_("steps_per_epoch"))
    from ..degradations import MODALITIES

    w.modality_combo = shrinkable(QComboBox())
    w.modality_combo.addItems(list(MODALITIES))
    w.modality_combo.setCurrentText("generic")
    w.modality_combo.setToolTip(_MODALITY_HELP)
    w.levels_combo = shrinkable(QComboBox())
    w.levels_combo.addItems(list(LEVEL_SETS))
    w.levels_combo.setToolTip(_LEVELS_HELP + ". " + help_("levels"))
    w.variants_spin = QSpinBox()
    w.variants_spin.setRange(1, 20)
    w.variants_spin.setToolTip(help_("variants"))
    w._default_out = str(default_out_dir())
    w.out_edit = QLineEdit(w._default_out)
    w.out_edit.setToolTip("Folder of the run's checkpoints, logs, curve and decision.json (created)")
    w.estimate_label = QLabel("")
    w.estimate_label.setWordWrap(True)
    w.estimate_label.setToolTip("Estimated from the number of labelled planes, the preset's iterations and "
                                   "the costs measured on this machine (docs/training.md)")
    # ---- actions
    w.start_button = QPushButton("Fine-tune")
    w.start_button.clicked.connect(w.start)
    w.auto_check = QCheckBox("Use it if it is better")
    w.auto_check.setChecked(True)
    w.auto_check.setToolTip("Never worse: the fine-tuned model replaces the current one only if it scores "
                               "higher on the labels held back from training")
    w.load_button = QPushButton("Load into annotator")
    w.load_button.setEnabled(False)
    w.load_button.clicked.connect(lambda: w.load_into_annotator())
    w.back_button = QPushButton("Back to the previous model")
    w.back_button.setEnabled(False)
    w.back_button.clicked.connect(w.back_to_previous)
    w.task_row = TaskRow()
    w.plot_box = QVBoxLayout()
    w.banner = Banner()
    w.status = QLabel("")
    w.status.setWordWrap(True)
    w.table = QTableWidget(0, 5)
    w.table.setHorizontalHeaderLabels(["held-back plane", "box\nbefore", "box\nafter", "clicks\nbefore",
                                          "clicks\nafter"])
    w.table.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    w.table.setVerticalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    w.table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
    w.table.setToolTip("Dice on the labels held back from training, current model (before) and fine-tuned "
                          "model (after): a box, then the box and corrective clicks")
    w.table.verticalHeader().hide()
    w.table.hide()
    w.next_list = QListWidget()
    w.next_list.setToolTip("Unlabelled planes, the model's most uncertain first (docs/training.md says how "
                              "it is scored). Click one to go there.")
    w.next_list.itemClicked.connect(w._go_to_ranked)
    w.next_box = QGroupBox("Which image next")
    QVBoxLayout(w.next_box).addWidget(w.next_list)
    w.next_box.hide()

    layout = w.layout()
    data = QGroupBox("Labelled images")
    dl = QVBoxLayout(data)
    dl.addWidget(w.pairs_list)
    w.pairs_summary = QLabel("")
    w.pairs_summary.setWordWrap(True)
    row = QHBoxLayout()
    row.addWidget(w.pairs_summary, 1)
    row.addWidget(w.refresh_button)
    dl.addLayout(row)
    layout.addWidget(data)
    form = QFormLayout()
    form.addRow("Preset", w.preset_combo)
    form.addRow("", w.preset_use)
    form.addRow("Time budget", w.budget_spin)
    form.addRow("Epochs", w.epochs_spin)
    form.addRow("Iterations / epoch", w.steps_spin)
    more = QFormLayout()
    more.addRow("Start from", w.model_edit)
    more.addRow("Modality", w.modality_combo)
    more.addRow("Degradations", w.levels_combo)
    more.addRow("Variants / image", w.variants_spin)
    more.addRow("Output folder", w.out_edit)
    for f in (form, more):
        _label_tooltips(f)
    layout.addLayout(form)
    from superqt import QCollapsible

    w.more_settings = QCollapsible("More settings")
    inner = QWidget()
    inner.setLayout(more)
    w.more_settings.addWidget(inner)
    layout.addWidget(w.more_settings)
    layout.addWidget(w.estimate_label)
    buttons = QHBoxLayout()
    buttons.addWidget(w.start_button)
    buttons.addWidget(w.auto_check, 1)
    layout.addLayout(buttons)
    layout.addWidget(w.task_row)
    layout.addLayout(w.plot_box)
    layout.addWidget(w.banner)
    layout.addWidget(w.status)
    layout.addWidget(w.table)
    swap = QHBoxLayout()
    swap.addWidget(w.load_button)
    swap.addWidget(w.back_button)
    layout.addLayout(swap)
    layout.addWidget(w.next_box)
    layout.addStretch(1)

    w._estimate_timer = QTimer(w)
    w._estimate_timer.setSingleShot(True)
    w._estimate_timer.setInterval(300)
    w._estimate_timer.timeout.connect(w.update_estimate)
    w.preset_combo.currentTextChanged.connect(w.apply_preset)
    w.levels_combo.currentTextChanged.connect(
        lambda text: (w.variants_spin.setEnabled(bool(LEVEL_SETS[text])), w._schedule_estimate()))
    for spin in (w.epochs_spin, w.steps_spin, w.variants_spin, w.budget_spin):
        spin.valueChanged.connect(lambda _v: w._schedule_estimate())
    w.preset_combo.setCurrentText(DEFAULT_PRESET)
    w.apply_preset(DEFAULT_PRESET)
    w.refresh_pairs()
    w.viewer.layers.events.inserted.connect(w.refresh_pairs)
    w.viewer.layers.events.removed.connect(w.refresh_pairs)


def _label_tooltips(form: QFormLayout) -> None:
    """The field's help also on its name."""
    for r in range(form.rowCount()):
        label = form.itemAt(r, QFormLayout.ItemRole.LabelRole)
        field = form.itemAt(r, QFormLayout.ItemRole.FieldRole)
        if label is not None and field is not None and field.widget() is not None and label.widget() is not None:
            label.widget().setToolTip(field.widget().toolTip())
