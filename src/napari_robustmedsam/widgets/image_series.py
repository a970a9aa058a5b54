"""Image series: annotate a folder of images one after the other, saving labels + prompts per image."""

from __future__ import annotations

import html
from pathlib import Path

from qtpy.QtWidgets import (
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from ..annotation.export import load_session, save_session
from ..annotation.model_info import model_meta
from ..errors import UserFacingError
from ..io import read_image
from ..io.images import SUPPORTED_SUFFIXES
from ._common import Banner, TaskRow, run_task
from ._state import get_state

SERIES_LAYER = "series image"


def list_series(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise UserFacingError(f"not a folder: {folder}")
    files = []
    for p in sorted(folder.iterdir()):
        name = p.name.lower()
        if p.is_file() and not name.endswith(".prompts.json") and any(name.endswith(s) for s in SUPPORTED_SUFFIXES):
            files.append(p)
    if not files:
        from ..io.medical import is_medical_path

        if is_medical_path(folder):  # DICOM files without a suffix, as scanners often write them
            raise UserFacingError(f"{folder.name} holds DICOM files without a file suffix: open the series as a volume "
                                  f"with File > Open (or napari-robustmedsam --volume {folder})")
        raise UserFacingError(f"no images in {folder} (supported: {', '.join(SUPPORTED_SUFFIXES)})")
    _refuse_one_dicom_volume(folder, files)
    return files


def _refuse_one_dicom_volume(folder: Path, files: list[Path]) -> None:
    """A folder whose files are the slices of one DICOM series is a volume: stepping through its slices as separate
    images would annotate and save each slice on its own, without the volume's geometry or 3D propagation."""
    from ..io.medical import DICOM_SUFFIXES, list_dicom_series, suffix_of

    if len(files) < 2 or any(suffix_of(f) not in DICOM_SUFFIXES for f in files):
        return
    series = list_dicom_series(folder)
    if len(series) == 1 and len(series[0].files) == len(files):
        raise UserFacingError(
            f"{folder.name} holds one DICOM series of {len(files)} slices, a volume: open it with File > Open (or "
            f"napari-robustmedsam --volume {folder}); the Series tab steps through separate images"
        )


class ImageSeriesPanel(QWidget):
    def __init__(self, napari_viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.state = get_state(napari_viewer)
        self.setObjectName("robustmedsam-image-series")
        self.files: list[Path] = []
        self.index = -1
        self.input_edit = QLineEdit()
        self.output_edit = QLineEdit()
        self.output_edit.setPlaceholderText("default: <input folder>/annotations")
        in_button = QPushButton("…")
        in_button.clicked.connect(lambda: self._pick(self.input_edit))
        out_button = QPushButton("…")
        out_button.clicked.connect(lambda: self._pick(self.output_edit))
        self.open_button = QPushButton("Open series")
        self.open_button.clicked.connect(lambda: self.open_folder(self.input_edit.text(), self.output_edit.text() or None))
        self.list = QListWidget()
        self.list.setMaximumHeight(120)
        self.list.itemDoubleClicked.connect(lambda item: self.go(self.list.row(item)))
        self.embed_button = QPushButton("Embed all images")
        self.embed_button.setToolTip("Precompute (and cache on disk) the embeddings of every image of the series")
        self.embed_button.clicked.connect(lambda: self.embed_all())
        self.task_row = TaskRow()
        self.prev_button = QPushButton("◀ Save && previous")
        self.next_button = QPushButton("Save && next ▶")
        self.prev_button.clicked.connect(lambda: self.go(self.index - 1))
        self.next_button.clicked.connect(lambda: self.go(self.index + 1))
        self.banner = Banner()
        self.status = QLabel("")
        self.status.setWordWrap(True)

        form = QFormLayout()
        in_row = QHBoxLayout()
        in_row.addWidget(self.input_edit, 1)
        in_row.addWidget(in_button)
        out_row = QHBoxLayout()
        out_row.addWidget(self.output_edit, 1)
        out_row.addWidget(out_button)
        form.addRow("Images", in_row)
        form.addRow("Save to", out_row)
        nav = QHBoxLayout()
        nav.addWidget(self.prev_button)
        nav.addWidget(self.next_button)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.open_button)
        layout.addWidget(self.list)
        layout.addLayout(nav)
        layout.addWidget(self.embed_button)
        layout.addWidget(self.task_row)
        layout.addWidget(self.banner)
        layout.addWidget(self.status)
        layout.addStretch(1)

    def _pick(self, edit: QLineEdit) -> None:
        path = QFileDialog.getExistingDirectory(self, "Choose a folder", edit.text() or "")
        if path:
            edit.setText(path)

    @property
    def output_dir(self) -> Path:
        text = self.output_edit.text().strip()
        return Path(text) if text else Path(self.input_edit.text()) / "annotations"

    def open_folder(self, folder: str | Path, output: str | Path | None = None) -> bool:
        self.banner.clear_message()
        try:
            self.files = list_series(folder)
        except UserFacingError as err:
            self.banner.show_error(err)
            return False
        self.input_edit.setText(str(folder))
        if output:
            self.output_edit.setText(str(output))
        self.list.clear()
        self.list.addItems([p.name for p in self.files])
        self.index = -1
        return self.go(0, save=False)

    def embed_all(self):
        """Embed every image of the series in a worker (progress + cancel) into the engine's disk cache."""
        self.banner.clear_message()
        if not self.files:
            self.banner.show_error(UserFacingError("open a series folder first"))
            return None
        files = list(self.files)

        def start(loaded):
            engine = self.state.engine
            if engine is None:
                self.banner.show_error(UserFacingError("the embedding cache is not available; images are embedded "
                                                       "when you open them"))
                return

            def work(handle):
                return engine.series(files).compute(progress=handle.report, cancel=handle.is_cancelled)

            def done(n):
                self.status.setText(f"Embedded {n} new image(s); {len(files) - n} were already cached.")

            run_task(work, done, lambda e, tb: self.banner.show_error(e), name="embedding series", row=self.task_row)

        self.state.ensure_model(start, lambda e, tb: self.banner.show_error(e), row=self.task_row)
        return True

    def labels_path(self, image_path: Path) -> Path:
        stem = image_path.name.split(".")[0]
        return self.output_dir / f"{stem}.tif"

    def save_current(self) -> Path | None:
        annotator = self.state.annotator
        if self.index < 0 or annotator is None or annotator.session is None:
            return None
        annotator._sync_committed_into_session()
        session = annotator.session
        if not session.labels.any():
            return None
        path = self.labels_path(self.files[self.index])
        loaded = self.state.loaded
        image_meta = {"name": self.files[self.index].name, "source": str(self.files[self.index]),
                      "shape": list(session.shape), "kind": annotator.kind}
        save_session(path, session.labels, session.records_json(), image_meta,
                     model_meta(loaded) if loaded is not None else {}, overwrite=True)  # the series' own labels file
        return path

    def go(self, index: int, save: bool = True) -> bool:
        """Save the current image's labels (if any) and open image ``index`` of the series."""
        self.banner.clear_message()
        if not self.files:
            self.banner.show_error(UserFacingError("open a series folder first"))
            return False
        if not 0 <= index < len(self.files):
            self.status.setText("End of the series." if index >= len(self.files) else "Start of the series.")
            if save:
                try:
                    self.save_current()
                except UserFacingError as err:
                    self.banner.show_error(err)
            return False
        try:
            saved = self.save_current() if save else None
            image = read_image(self.files[index])
        except UserFacingError as err:
            self.banner.show_error(err)
            return False
        rgb = image.ndim == 3 and image.shape[-1] in (3, 4)
        if SERIES_LAYER in self.viewer.layers:
            self.viewer.layers.remove(self.viewer.layers[SERIES_LAYER])
        layer = self.viewer.add_image(image, name=SERIES_LAYER, rgb=rgb)
        self.index = index
        self.list.setCurrentRow(index)
        annotator = self.state.annotator
        resumed = ""
        if annotator is not None:
            annotator.set_image_layer(layer)
            existing = self.labels_path(self.files[index])
            if existing.exists() and annotator.session is not None:
                try:
                    session = load_session(existing)
                    if tuple(session.labels.shape) == tuple(annotator.session.shape):
                        annotator.session.sync_labels(session.labels)
                        annotator.session.load_records(session.records)
                        annotator._update_committed_layer()
                        resumed = f"; resumed {existing.name}"
                except UserFacingError as err:
                    self.banner.show_error(err)
        self.viewer.reset_view()
        saved_text = f"saved {html.escape(saved.name)}; " if saved else ""
        self.status.setText(f"{saved_text}image {index + 1}/{len(self.files)}: {html.escape(self.files[index].name)}"
                            f"{resumed}")
        return True
