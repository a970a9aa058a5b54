"""The annotator's window row: a CT window preset or a custom level/width, for the display and the model.

Choosing a window stores it in the image layer's metadata (``engine.windows.WINDOW_KEY``), sets the layer's
contrast limits to it, and makes the annotator embed the slices again under it (the cache keeps each
window's embeddings apart). The image data stay in HU.
"""

from __future__ import annotations

from qtpy.QtWidgets import QComboBox, QHBoxLayout, QLineEdit, QWidget

from ..engine.windows import NO_WINDOW, PRESETS, WINDOW_KEY, Window, layer_window, parse_window
from ..errors import UserFacingError
from ._common import shrinkable, unwrap

CUSTOM = "custom (L,W)"


class WindowControl(QWidget):
    def __init__(self, annotator) -> None:
        super().__init__()
        self.annotator = annotator
        self.combo = shrinkable(QComboBox())
        self.combo.addItems([NO_WINDOW, *PRESETS, CUSTOM])
        self.combo.setToolTip("CT window (HU) the model sees and the display shows; 'none' for MRI and other images")
        self.custom = QLineEdit()
        self.custom.setPlaceholderText("L,W e.g. 40,400")
        self.custom.setToolTip("custom window: level and width in HU; press Enter to apply")
        self.custom.setMaximumWidth(110)
        self.custom.setVisible(False)
        row = QHBoxLayout(self)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.combo, 1)
        row.addWidget(self.custom)
        self.combo.currentTextChanged.connect(self._combo_changed)
        self.custom.returnPressed.connect(self._custom_entered)

    def show_layer(self, layer) -> None:
        """Show the window of a newly annotated image layer; a CT without one gets the default window."""
        layer = unwrap(layer)
        if WINDOW_KEY not in layer.metadata:
            window = layer_window(layer.metadata, layer.data)
            layer.metadata[WINDOW_KEY] = window.spec if window is not None else NO_WINDOW
            if window is not None:
                layer.contrast_limits = window.contrast_limits()
        self._show(parse_window(layer.metadata[WINDOW_KEY]))

    def _show(self, window: Window | None) -> None:
        self.combo.blockSignals(True)
        if window is None:
            self.combo.setCurrentText(NO_WINDOW)
        elif window.name in PRESETS:
            self.combo.setCurrentText(window.name)
        else:
            self.combo.setCurrentText(CUSTOM)
            self.custom.setText(window.spec)
        self.custom.setVisible(self.combo.currentText() == CUSTOM)
        self.combo.blockSignals(False)

    def _combo_changed(self, text: str) -> None:
        self.custom.setVisible(text == CUSTOM)
        if text != CUSTOM:
            self.set_window(text)
        elif self.custom.text().strip():
            self._custom_entered()

    def _custom_entered(self) -> None:
        self.set_window(self.custom.text())

    def set_window(self, spec: str | Window | None) -> bool:
        """Apply a window (preset name, ``"L,W"`` or ``"none"``) to the annotated image; errors show in the banner."""
        annotator = self.annotator
        layer = annotator.image_layer
        try:
            window = parse_window(spec)
        except UserFacingError as err:
            annotator.banner.show_error(err)
            return False
        self._show(window)
        if layer is None:
            return False
        annotator.banner.clear_message()
        layer.metadata[WINDOW_KEY] = window.spec if window is not None else NO_WINDOW
        if window is not None:
            layer.contrast_limits = window.contrast_limits()
        else:
            layer.reset_contrast_limits()
        annotator._make_embeddings()  # the model sees the new window from the next slice it encodes
        return True
