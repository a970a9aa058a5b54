"""Export / resume: save the committed labels with the prompts used, and load them back."""

from __future__ import annotations

import html
from pathlib import Path

from qtpy.QtWidgets import QFileDialog, QHBoxLayout, QLabel, QPushButton, QVBoxLayout, QWidget

from ..annotation.export import load_session, save_session
from ..errors import UserFacingError
from ..io.medical import check_labels_fit, geometry_from_layer
from ._common import Banner
from ._state import get_state
from .autosave_control import AutosaveControl
from .session_snapshot import session_snapshot

SAVE_FILTER = ("NIfTI (*.nii.gz);;NRRD (*.nrrd);;MetaImage (*.mha);;DICOM-SEG, DICOM series only (*.dcm);;"
               "TIFF (*.tif);;NumPy (*.npy);;PNG, 2D only (*.png)")
LOAD_FILTER = ("Sessions and labels (*.prompts.json *.tif *.tiff *.npy *.nii.gz *.nii *.nrrd *.nhdr *.mha *.mhd *.png);;"
               "All files (*)")


class ExportPanel(QWidget):
    def __init__(self, napari_viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.state = get_state(napari_viewer)
        self.setObjectName("robustmedsam-export")
        self.save_button = QPushButton("Save labels + prompts…")
        self.save_button.setToolTip("Writes the labels (TIFF/NPY/NIfTI/PNG) and <name>.prompts.json next to it")
        self.save_button.clicked.connect(self._save_dialog)
        self.load_button = QPushButton("Resume session…")
        self.load_button.setToolTip("Load labels (+ their .prompts.json) into the committed objects")
        self.load_button.clicked.connect(self._load_dialog)
        self.banner = Banner()
        self.status = QLabel("")
        self.status.setWordWrap(True)
        row = QHBoxLayout()
        row.addWidget(self.save_button)
        row.addWidget(self.load_button)
        self.autosave = AutosaveControl(self.state, self.load)
        layout = QVBoxLayout(self)
        layout.addLayout(row)
        layout.addWidget(self.autosave)
        layout.addWidget(self.banner)
        layout.addWidget(self.status)
        layout.addStretch(1)

    def _annotator(self):
        annotator = self.state.annotator
        if annotator is None or annotator.session is None:
            raise UserFacingError("open the annotator on an image first")
        return annotator

    def save(self, path: str | Path) -> tuple[Path, Path] | None:
        """Save the committed objects (labels) and their prompts; errors show in the panel."""
        self.banner.clear_message()
        try:
            annotator = self._annotator()
            labels, records, kwargs = session_snapshot(annotator, self.state.loaded)
            labels_path, json_path = save_session(
                path, labels, records, **kwargs,
                overwrite=True,  # the file dialog asked before replacing a file; the image is still refused
            )
        except UserFacingError as err:
            self.banner.show_error(err)
            return None
        except OSError as err:
            self.banner.show_error(UserFacingError(f"cannot write {path}: {err}"))
            return None
        session = annotator.session
        n = len(session.objects) or len(set(session.labels.ravel().tolist()) - {0})
        self.status.setText(f"Saved {n} object(s): {html.escape(str(labels_path))} and {html.escape(json_path.name)}")
        return labels_path, json_path

    def load(self, path: str | Path) -> bool:
        """Resume: the labels become the committed objects (their prompts come back with them)."""
        self.banner.clear_message()
        try:
            annotator = self._annotator()
            loaded = load_session(path)
            session = annotator.session
            check_labels_fit(loaded.labels.shape, loaded.geometry, session.shape,
                             geometry_from_layer(annotator.image_layer), what=f"the labels in {loaded.labels_path.name}")
            annotator._sync_committed_into_session()  # what the user painted counts as committed
            kept = self.autosave.keep_before_replacing(annotator)
            replaced = session.replace_all(loaded.labels, loaded.records)
            annotator._update_committed_layer()
            annotator._update_enabled()
        except UserFacingError as err:
            self.banner.show_error(err)
            return False
        prompts = f" with the prompts of {len(loaded.records)} object(s)" if loaded.records else " (no prompts file)"
        text = f"Resumed {html.escape(str(loaded.labels_path.name))}{prompts}; new objects get new ids."
        if replaced:
            text += f" It replaced the {replaced} object(s) committed before: U brings them back"
            text += (f", and they were kept as an autosave of their own ({html.escape(str(kept))})." if kept
                     else ".")
        self.status.setText(text)
        return True

    def _save_dialog(self) -> None:
        path, selected = QFileDialog.getSaveFileName(self, "Save labels and prompts", "labels.tif", SAVE_FILTER)
        if path:
            suffix = selected.split("*")[-1].rstrip(")") if selected else ""
            if suffix and not path.lower().endswith(suffix):
                path += suffix
            self.save(path)

    def _load_dialog(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Resume a session", "", LOAD_FILTER)
        if path:
            self.load(path)
