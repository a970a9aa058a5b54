"""Robustness sweep: the annotator's prompts over degradation types x levels, as a table and a heat map.

Each cell is the Dice between the mask the prompts give on the clean slice and on the degraded slice, so
a user sees, before trusting a mask, how much it would change under realistic artifacts.
"""

from __future__ import annotations

import numpy as np
from psygnal import Signal as PSignal
from qtpy.QtCore import Qt
from qtpy.QtGui import QBrush, QColor, QPixmap
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGridLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ..annotation.robustness import SweepTable, robustness_sweep, sweep_types
from ..annotation.session import SlicePrompts
from ..errors import UserFacingError
from ._common import Banner, TaskRow, run_task, shrinkable
from ._state import get_state
from .modality_follower import ModalityFollower

ALL_MODALITIES = "(all types)"


def _dice_color(value: float) -> QColor:
    """Red (0) -> yellow (0.5) -> green (1)."""
    v = float(np.clip(value, 0, 1))
    r = int(220 if v < 0.5 else 220 * (1 - v) * 2)
    g = int(200 * min(1.0, v * 2))
    return QColor(r, g, 40)


class RobustnessSweep(QWidget):
    finished = PSignal(object)  # SweepTable

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        from ..degradations import LEVELS, MODALITIES

        self.viewer = napari_viewer
        self.state = get_state(napari_viewer)
        self.setObjectName("robustmedsam-robustness-sweep")
        self.table_result: SweepTable | None = None

        self.modality_combo = shrinkable(QComboBox())
        self.modality_combo.addItems([ALL_MODALITIES, *MODALITIES])
        self.modality_combo.currentTextChanged.connect(self._update_count)
        self.modality_follower = ModalityFollower(self.state, self.modality_combo, ALL_MODALITIES)
        self.level_checks = {}
        levels_row = QGridLayout()
        for i, level in enumerate(LEVELS):
            check = QCheckBox(level)
            check.setChecked(level != "LQ-3+")
            check.toggled.connect(self._update_count)
            self.level_checks[level] = check
            levels_row.addWidget(check, i // 2, i % 2)
        self.seed_spin = QSpinBox()
        self.seed_spin.setRange(0, 2**31 - 1)
        self.count_label = QLabel("")
        self.count_label.setWordWrap(True)
        self.count_label.setStyleSheet("color:#9aa;")
        self.run_button = QPushButton("Run robustness sweep")
        self.run_button.clicked.connect(lambda: self.run())
        self.task_row = TaskRow()
        self.banner = Banner()
        self.summary = QLabel("")
        self.summary.setWordWrap(True)
        self.table = QTableWidget()
        self.table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        self.table.setMinimumHeight(160)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        self.table.hide()
        self.plot = QLabel()
        self.plot.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.plot.hide()
        self.save_button = QPushButton("Save table (CSV / JSON)…")
        self.save_button.clicked.connect(self._save_dialog)
        self.save_button.setEnabled(False)

        form = QFormLayout()
        form.addRow("Modality", self.modality_combo)
        form.addRow("Levels", levels_row)
        form.addRow("Seed", self.seed_spin)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.count_label)
        layout.addWidget(self.run_button)
        layout.addWidget(self.task_row)
        layout.addWidget(self.banner)
        layout.addWidget(self.summary)
        layout.addWidget(self.table)
        layout.addWidget(self.plot)
        layout.addWidget(self.save_button)
        layout.addStretch(1)
        self._update_count()

    @property
    def modality(self) -> str | None:
        text = self.modality_combo.currentText()
        return None if text == ALL_MODALITIES else text

    def levels(self) -> list[str]:
        return [lvl for lvl, check in self.level_checks.items() if check.isChecked()]

    def _update_count(self, *_):
        try:
            n = len(sweep_types(self.modality)) * len(self.levels())
        except Exception:
            n = 0
        self.count_label.setText(f"{n} settings; each needs one encoder pass on the degraded slice.")

    def run(self, types: list[str] | None = None, levels: list[str] | None = None):
        """Run the sweep in a worker (progress + cancel). ``types``/``levels`` default to the controls."""
        annotator = self.state.annotator
        self.banner.clear_message()
        try:
            if annotator is None or annotator.session is None:
                raise UserFacingError("open the annotator on an image and segment an object first")
            z = annotator.current_z()
            prompts = annotator.session.current_prompts.get(z)
            if prompts is None or prompts.end or prompts.is_empty:
                prompts = annotator.slice_prompts(z)
            if prompts.is_empty:
                raise UserFacingError(f"no prompts on slice {z}: draw a box or click points in the annotator first")
            levels = list(levels) if levels is not None else self.levels()
            if not levels:
                raise UserFacingError("tick at least one level")
            if "LQ-3+" in levels and self.modality is None:
                raise UserFacingError("LQ-3+ adds the modality's domain artifacts: choose a modality")
            image = annotator.embeddings.slice_image(z) if annotator.embeddings is not None else None
        except UserFacingError as err:
            self.banner.show_error(err)
            return None
        prompts = SlicePrompts(prompts.points, prompts.labels, prompts.box, "user")
        modality, seed = self.modality, int(self.seed_spin.value())
        self.run_button.setEnabled(False)

        def start(loaded):
            embeddings = annotator.embeddings
            predictor = embeddings.predictor
            img = image if image is not None else embeddings.slice_image(z)

            def work(handle):
                return robustness_sweep(
                    predictor, img, prompts, types=types, levels=levels, modality=modality, seed=seed,
                    clean_embedding=embeddings.get(z), box_primary=bool(loaded.box_primary),
                    progress=handle.report, is_cancelled=handle.is_cancelled,
                )

            def done(table):
                self.run_button.setEnabled(True)
                self.show_table(table)
                self.finished.emit(table)

            def failed(err, tb):
                self.run_button.setEnabled(True)
                self.banner.show_error(err)

            self._handle = run_task(work, done, failed, name="sweep", row=self.task_row)

        def not_loaded(err, tb):
            self.run_button.setEnabled(True)
            self.banner.show_error(err)

        self.state.ensure_model(start, not_loaded, row=self.task_row)
        return True

    def show_table(self, table: SweepTable) -> None:
        self.table_result = table
        m = table.matrix("dice")
        self.table.setRowCount(len(table.types))
        self.table.setColumnCount(len(table.levels))
        self.table.setHorizontalHeaderLabels(table.levels)
        self.table.setVerticalHeaderLabels(table.types)
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                v = m[i, j]
                item = QTableWidgetItem("-" if np.isnan(v) else f"{v:.3f}")
                item.setTextAlignment(Qt.AlignmentFlag.AlignCenter)
                if np.isfinite(v):
                    item.setBackground(QBrush(_dice_color(v)))
                    item.setForeground(QBrush(QColor("black")))
                self.table.setItem(i, j, item)
        self.table.show()
        pm = QPixmap()
        pm.loadFromData(table.plot_png(width_px=380))
        self.plot.setPixmap(pm)
        self.plot.show()
        means = ", ".join(f"{k} {v:.3f}" for k, v in table.mean_by_level().items())
        worst = "; ".join(f"{r['type']} {r['level']} {r['dice']:.3f}" for r in table.worst(3))
        self.summary.setText(f"Mean Dice (degraded vs clean mask) by level: {means}.<br>Least robust: {worst}.")
        self.save_button.setEnabled(True)

    def _save_dialog(self) -> None:
        if self.table_result is None:
            return
        path, _ = QFileDialog.getSaveFileName(self, "Save sweep table", "robustness_sweep.csv",
                                              "CSV (*.csv);;JSON (*.json)")
        if path:
            try:
                self.table_result.save(path, overwrite=True)  # the file dialog asked before replacing
                self.banner.show_message(f"Saved {path}", "info")
            except (OSError, UserFacingError) as err:
                self.banner.show_error(err if isinstance(err, UserFacingError) else UserFacingError(str(err)))
