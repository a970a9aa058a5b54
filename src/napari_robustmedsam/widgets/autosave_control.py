"""The Export tab's autosave row: write the session after every commit and undo, and restore an earlier autosave.

The files and folders are :mod:`napari_robustmedsam.annotation.autosave`'s; this widget decides when to write (a
commit or an undo in the annotator, or a pause after painting into the committed objects, in a worker thread, the
newest state only when writes pile up) and offers the image's newest earlier autosave when the image is opened.
"""

from __future__ import annotations

import html
import logging
from pathlib import Path

from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QCheckBox, QHBoxLayout, QLabel, QPushButton, QVBoxLayout, QWidget

from ..annotation.autosave import Autosaver, image_key
from ..errors import UserFacingError
from ..cache_location import autosave_root
from ._common import qt_alive, run_task
from .session_snapshot import session_snapshot

log = logging.getLogger(__name__)

#: a brush stroke painted into the committed objects is autosaved once the painting pauses this long (a stroke is
#: many paint events; writing at each one would copy the whole label volume many times a second)
PAINT_PAUSE_MS = 1500


class AutosaveControl(QWidget):
    """``restore_with(path) -> bool`` loads a session file into the annotator (the Export tab's *Resume*)."""

    def __init__(self, state, restore_with) -> None:
        super().__init__()
        self.state = state
        self.restore_with = restore_with
        self.autosaver = Autosaver(autosave_root())
        self.check = QCheckBox("Autosave after every commit")
        self.check.setChecked(True)
        self.check.setToolTip(f"Each commit and undo writes the labels and prompts under {self.autosaver.root}; "
                              "nothing is lost if napari closes before you save")
        self.restore_button = QPushButton("Restore autosave")
        self.restore_button.setToolTip("Load the newest autosave of this image that an earlier session wrote")
        self.restore_button.clicked.connect(self.restore)
        self.restore_button.setEnabled(False)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        row = QHBoxLayout()
        row.addWidget(self.check)
        row.addWidget(self.restore_button)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(row)
        layout.addWidget(self.status)
        self._writing = False
        self._pending = None
        self._watched = None
        self._paint_timer = QTimer(self)
        self._paint_timer.setSingleShot(True)
        self._paint_timer.setInterval(PAINT_PAUSE_MS)
        self._paint_timer.timeout.connect(lambda: self._changed(0))
        state.annotator_changed.connect(self.watch)
        if state.annotator is not None:
            self.watch(state.annotator)

    def watch(self, annotator) -> None:
        if annotator is None or annotator is self._watched:
            return
        self._watched = annotator
        annotator.committed.connect(self._changed)
        annotator.undone.connect(self._changed)
        annotator.image_opened.connect(self._image_opened)

    def _key(self, annotator) -> str:
        from ..io.medical import geometry_from_layer, source_of

        layer = annotator.image_layer
        source, geometry = source_of(layer), geometry_from_layer(layer)
        if source and geometry is not None and geometry.timepoint is not None:  # the volumes of a 4D file differ
            source = f"{source}#t={geometry.timepoint}"
        return image_key(layer.name, source, annotator.session.shape)

    # ---- writing
    def _painted(self, *_) -> None:
        self._paint_timer.start()

    def _changed(self, label_id=None):
        annotator = self.state.annotator
        if label_id is None or not self.check.isChecked() or annotator is None or annotator.session is None:
            return
        try:
            labels, records, kwargs = session_snapshot(annotator, self.state.loaded)
        except Exception as err:  # noqa: BLE001 - an autosave must never break a commit
            self.status.setText(f"Autosave skipped: {html.escape(str(err))}")
            return
        self._pending = (self.autosaver, self._key(annotator), labels, records, kwargs)
        if not self._writing:
            self._write_next()

    def _write_next(self) -> None:
        job, self._pending = self._pending, None
        if job is None:
            self._writing = False
            return
        self._writing = True
        saver, key, labels, records, kwargs = job
        run_task(lambda handle: saver.write(key, labels, records, **kwargs), self._written,
                 self._failed, name="autosave")

    def _written(self, folder) -> None:
        self._say(f"Autosaved to {html.escape(str(folder))}.")
        self._write_next()

    def _failed(self, err: BaseException, tb: str) -> None:
        log.debug("autosave failed: %s", tb)
        self._say(f"Autosave failed: {html.escape(str(err))}. Save with <i>Save labels + prompts…</i>.")
        self._write_next()

    def _say(self, text: str) -> None:
        # A write may end after the panel was closed (the viewer closed right after a commit): the files are
        # written all the same, and the newest pending state still follows, but there is no label left to tell.
        if qt_alive(self.status):
            self.status.setText(text)

    # ---- restoring
    def _image_opened(self, *_) -> None:
        from .annotation_layers import connect_once

        annotator = self.state.annotator
        if annotator is not None and annotator.committed_layer is not None:
            # edits painted straight into the committed objects (brush, fill, eraser) are the user's work too
            connect_once(annotator.committed_layer.events.paint, self._painted)
        earlier = self.autosaver.earlier(self._key(annotator)) if annotator is not None else []
        self.restore_button.setEnabled(bool(earlier))
        if earlier:
            said = f"An earlier autosave of this image can be restored in the Export tab ({earlier[0].describe()})."
            self.status.setText(html.escape(said))
            annotator._set_status(annotator.status.text() + " " + said)
        else:
            self.status.setText("")

    def restore(self) -> bool:
        """Load the image's newest earlier autosave into the committed objects."""
        annotator = self.state.annotator
        key = self._key(annotator) if annotator is not None and annotator.session else None
        earlier = self.autosaver.earlier(key) if key else []
        if not earlier:
            self.status.setText("No earlier autosave of this image.")
            return False
        if not self.restore_with(earlier[0].prompts_path):
            return False
        self.status.setText(f"Restored the autosave of {html.escape(earlier[0].describe())}.")
        return True

    def keep_before_replacing(self, annotator) -> Path | None:
        """Write the committed objects to an autosave folder of their own before a resume replaces them; returns it.

        The session's own autosave cannot hold them: the next commit after the resume writes over it. Written at
        once (not in the worker), so the objects are on disk before they leave the window. Nothing is written when
        autosave is off or no object is committed."""
        session = annotator.session
        if not self.check.isChecked() or session is None or not session.labels.any():
            return None
        labels, records, kwargs = session_snapshot(annotator, self.state.loaded)
        try:
            folder = Autosaver(self.autosaver.root, self.autosaver.keep).write(self._key(annotator), labels, records,
                                                                                **kwargs)
        except OSError as err:
            raise UserFacingError(f"cannot keep the committed objects before resuming ({err}); save them first "
                                  "with Save labels + prompts…") from err
        self.restore_button.setEnabled(True)
        return folder
