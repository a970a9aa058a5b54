"""The annotator's label row: which value / class a commit writes, which Labels layer it writes into, and
"Start from this label" (an existing object becomes the current one, to correct it with clicks).

The logic is Qt-free in :mod:`napari_robustmedsam.annotation.label_classes` and
:meth:`~napari_robustmedsam.annotation.session.AnnotationSession.start_from_label`; this row only reads the
user's choices and hands them on.
"""

from __future__ import annotations

import numpy as np
from qtpy.QtWidgets import QComboBox, QHBoxLayout, QLineEdit, QPushButton, QVBoxLayout, QWidget

from ..annotation.label_classes import LabelClasses, mask_prompt_fn
from ..errors import UserFacingError
from ..io.medical import check_labels_fit, geometry_from_layer
from ._common import role_of, shrinkable, unwrap

OWN_LAYER = "committed objects (new layer)"


class LabelControl(QWidget):
    def __init__(self, annotator) -> None:
        super().__init__()
        self.annotator = annotator
        self.classes = LabelClasses()
        self.label_edit = QLineEdit()
        self.label_edit.setPlaceholderText("next free id; or 2, oedema, 2=oedema")
        self.label_edit.setToolTip("The label value (or class name) the next commit writes; empty: a new id per object")
        self.start_button = QPushButton("Start from label")
        self.start_button.setToolTip("The label typed here becomes the current object: click to correct it, C commits")
        self.start_button.clicked.connect(lambda: self.start_from_label())
        self.target_combo = shrinkable(QComboBox())
        self.target_combo.setToolTip("The Labels layer commits write into: the plugin's own, or one you opened")
        self.target_combo.activated.connect(lambda _i: self.use_target(self.target_combo.currentText()))
        top = QHBoxLayout()
        top.setContentsMargins(0, 0, 0, 0)
        top.addWidget(self.label_edit, 1)
        top.addWidget(self.start_button)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(top)
        layout.addWidget(self.target_combo)
        annotator.viewer.layers.events.inserted.connect(lambda _e: self.refresh())
        annotator.viewer.layers.events.removed.connect(lambda _e: self.refresh())

    # ---- target layer -------------------------------------------------------------------------------
    def _user_labels_layers(self) -> list:
        session = self.annotator.session
        out = []
        for layer in self.annotator.viewer.layers:
            layer = unwrap(layer)
            if type(layer).__name__ == "Labels" and role_of(layer) is None and session is not None \
                    and tuple(layer.data.shape) == tuple(session.shape):
                out.append(layer)
        return out

    def refresh(self) -> None:
        """List the Labels layers a commit can go into (the plugin's own first)."""
        current = self.target_combo.currentText()
        self.target_combo.blockSignals(True)
        self.target_combo.clear()
        self.target_combo.addItem(OWN_LAYER)
        for layer in self._user_labels_layers():
            self.target_combo.addItem(layer.name)
        index = self.target_combo.findText(current)
        self.target_combo.setCurrentIndex(max(0, index))
        self.target_combo.blockSignals(False)

    def use_target(self, name: str) -> bool:
        """Commit into the Labels layer ``name`` (its labels become the committed objects) or the plugin's own."""
        annotator = self.annotator
        if annotator.session is None:
            return False
        annotator.banner.clear_message()
        if name == OWN_LAYER:
            from .annotator import committed_layer_name  # the annotator module imports this one

            own = committed_layer_name(annotator.image_layer.name)
            if own in annotator.viewer.layers:
                annotator.committed_layer = unwrap(annotator.viewer.layers[own])
                annotator._sync_committed_into_session()
            else:
                annotator._ensure_layers()
            return True
        try:
            matches = [layer for layer in self._user_labels_layers() if layer.name == name]
            if not matches:
                raise UserFacingError(f"no Labels layer '{name}' of the image's shape {tuple(annotator.session.shape)}")
            layer = matches[0]
            check_labels_fit(layer.data.shape, geometry_from_layer(layer), annotator.session.shape,
                             geometry_from_layer(annotator.image_layer), what=f"the labels in '{name}'")
        except UserFacingError as err:
            annotator.banner.show_error(err)
            self.target_combo.setCurrentIndex(0)
            return False
        data = np.asarray(layer.data)
        if data.dtype.kind not in "iub" or (data.size and data.min() < 0):
            annotator.banner.show_error(UserFacingError(f"'{name}' does not hold labels >= 0; choose another layer"))
            return False
        annotator.committed_layer = layer
        annotator.session.sync_labels(data)
        self.target_combo.setCurrentText(name)
        annotator._set_status(f"Commits now go into '{name}' ({len(np.unique(data)) - 1} label value(s) in it).")
        return True

    # ---- commit and start ---------------------------------------------------------------------------
    def choice(self, session) -> tuple[int | None, dict]:
        """(label value for the next commit or None for the next free id, record info with the class name)."""
        choice = self.classes.choose(self.label_edit.text(), session.labels)
        return choice.value, ({"class": choice.name} if choice.name else {})

    def start_from_label(self, text: str | None = None) -> int:
        """Make the label typed (value or class name) the current object; return its number of slices."""
        annotator = self.annotator
        session = annotator.session
        if text is not None:
            self.label_edit.setText(str(text))
        try:
            if session is None:
                raise UserFacingError("open the annotator on an image first")
            annotator._sync_committed_into_session()
            choice = self.classes.choose(self.label_edit.text(), session.labels)
            if choice.value is None:
                raise UserFacingError("type the label value (or class name) to start from, e.g. 2")
            predictor = getattr(annotator.embeddings, "predictor", None)
            preprocessing = getattr(predictor, "preprocessing", None)
            logits_for = mask_prompt_fn(preprocessing, session.plane_shape) if preprocessing else None
            n = session.start_from_label(choice.value, logits_for)
        except UserFacingError as err:
            annotator.banner.show_error(err)
            return 0
        annotator.banner.clear_message()
        annotator._clear_prompt_layers()
        annotator._update_current_layer()
        annotator._update_enabled()
        annotator._set_status(f"Label {choice.value} is the current object ({n} slice(s)): click to correct it; "
                              "C commits it under the same value.")
        return n
