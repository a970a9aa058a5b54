"""Model panel: choose a registry model or a checkpoint file and a device; show what was loaded."""

from __future__ import annotations

import html

from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from ..annotation.model_info import describe_model, display_name, registry_rows
from ..device import DEVICE_CHOICES
from ..models.registry import DEFAULT_MODEL, MODELS
from ._common import Banner, TaskRow, shrinkable
from ._state import get_state

CHECKPOINT_FILTER = "Checkpoints (*.pth *.pt *.ckpt *.bin *.tar *.pkl);;All files (*)"


class ModelPanel(QWidget):
    """Registry model or checkpoint (fused, RobustMedSAM release, micro_sam, ...) + device -> Load."""

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.state = get_state(napari_viewer)
        self.setObjectName("robustmedsam-model-panel")

        self.model_combo = shrinkable(QComboBox())
        self.model_combo.setEditable(True)
        for name, spec in MODELS.items():
            self.model_combo.addItem(name)
            self.model_combo.setItemData(self.model_combo.count() - 1, spec.description, 3)  # tooltip role
        self.model_combo.setCurrentText(DEFAULT_MODEL)
        self.model_combo.setToolTip("A registry model name, or the path of a checkpoint file")
        self.choice_help = QLabel()  # when to use the chosen model, and its licence
        self.choice_help.setWordWrap(True)
        self.choice_help.setObjectName("robustmedsam-model-choice-help")
        self.model_combo.currentTextChanged.connect(self._show_choice_help)
        self._show_choice_help(self.model_combo.currentText())
        self.browse_button = QPushButton("File…")
        self.browse_button.setToolTip("Choose a checkpoint file (SAM, MedSAM, LiteMedSAM, RobustSAM, fused, micro_sam)")
        self.browse_button.clicked.connect(self._browse)
        self.device_combo = shrinkable(QComboBox())
        self.device_combo.addItems(DEVICE_CHOICES)
        self.load_button = QPushButton("Load model")
        self.load_button.clicked.connect(lambda: self.load())
        self.task_row = TaskRow()
        self.banner = Banner()
        self.info = QLabel("No model loaded yet: the embedded LiteMedSAM is loaded on first use.")
        self.info.setWordWrap(True)

        form = QFormLayout()
        source_row = QHBoxLayout()
        source_row.addWidget(self.model_combo, 1)
        source_row.addWidget(self.browse_button)
        form.addRow("Model", source_row)
        form.addRow("", self.choice_help)
        form.addRow("Device", self.device_combo)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.load_button)
        layout.addWidget(self.task_row)
        layout.addWidget(self.banner)
        layout.addWidget(self.info)
        layout.addStretch(1)

        self.state.model_changed.connect(self._show_model)
        self.state.model_loading.connect(self._on_loading)
        if self.state.loaded is not None:
            self._show_model(self.state.loaded)

    # ---- actions --------------------------------------------------------------------------------
    def _browse(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Choose a checkpoint", "", CHECKPOINT_FILTER)
        if path:
            self.model_combo.setCurrentText(path)

    def load(self, source: str | None = None, device: str | None = None):
        """Load ``source`` (default: the combo box text) on ``device``; errors show in the panel."""
        if source is not None:
            self.model_combo.setCurrentText(str(source))
        if device is not None:
            self.device_combo.setCurrentText(device)
        text = self.model_combo.currentText().strip() or DEFAULT_MODEL
        self.banner.clear_message()
        self.load_button.setEnabled(False)
        return self.state.load_model(text, self.device_combo.currentText(), row=self.task_row,
                                     on_done=self._loaded, on_error=self._failed)

    def _show_choice_help(self, text: str) -> None:
        rows = dict(registry_rows(text.strip()))
        if not rows:
            self.choice_help.setText("")
            return
        use = f"Use it for: {html.escape(rows['use it for'])}. " if rows.get("use it for") else ""
        self.choice_help.setText(f"<small>{use}Licence: {html.escape(rows['licence'])}</small>")

    def _on_loading(self, source: str) -> None:
        self.info.setText(f"Loading {html.escape(source)}…")

    def _loaded(self, loaded) -> None:
        self.load_button.setEnabled(True)

    def _failed(self, err, tb) -> None:
        self.load_button.setEnabled(True)
        self.banner.show_error(err)
        if self.state.loaded is not None:
            self._show_model(self.state.loaded, note="still using the previous model")
        else:
            self.info.setText("No model loaded.")

    def _show_model(self, loaded, note: str = "") -> None:
        rows = describe_model(loaded)
        cells = "".join(
            f"<tr><td style='color:#9aa; padding-right:6px'>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>"
            for k, v in rows
        )
        head = f"<b>Loaded: {html.escape(display_name(loaded))}</b>" + (f" ({html.escape(note)})" if note else "")
        self.info.setText(f"{head}<table>{cells}</table>")
        self.load_button.setEnabled(True)
