"""The Modality fields of the Degrade, Sweep and Fine-tune tabs follow the image being annotated.

A DICOM image's header names its modality (MR, CT, US, ...; :func:`~napari_robustmedsam.degradations.modality.
modality_from_dicom`), so opening a CT series offers CT's artifacts without a choice. A field the user set stays as
they set it; a field at its default, or at the modality an earlier image gave it, takes the new image's (or goes
back to the default when the image names none: NIfTI, PNG, ...).
"""

from __future__ import annotations

from ..degradations.modality import modality_from_dicom
from ..io.medical import geometry_from_layer
from .annotation_layers import connect_once


def image_modality(layer) -> str | None:
    """The degradation modality the layer's source header names, or None."""
    geometry = geometry_from_layer(layer) if layer is not None else None
    return modality_from_dicom(geometry.modality if geometry is not None else None)


class ModalityFollower:
    """Keeps ``combo`` (a modality field whose default entry is ``default``) on the annotated image's modality."""

    def __init__(self, state, combo, default: str) -> None:
        self.state = state
        self.combo = combo
        self.default = default
        self._given: str | None = None  # what this follower last put in the field
        state.annotator_changed.connect(self._watch)
        if state.annotator is not None:
            self._watch(state.annotator)
            if state.annotator.image_layer is not None:  # a field made after the image was opened
                self.follow(state.annotator.image_layer)

    def _watch(self, annotator) -> None:
        if annotator is not None:
            connect_once(annotator.image_opened, self.follow)

    def follow(self, layer=None) -> None:
        current = self.combo.currentText()
        if current not in (self.default, self._given):
            return  # the user's own choice
        modality = image_modality(layer)
        target = modality if modality is not None and self.combo.findText(modality) >= 0 else self.default
        self._given = target if target != self.default else None
        if target != current:
            self.combo.setCurrentText(target)
