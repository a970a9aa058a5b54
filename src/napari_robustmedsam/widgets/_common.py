"""Qt helpers shared by the widgets: error banner, progress row with Cancel, background tasks."""

from __future__ import annotations

import logging
import threading
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np

from qtpy.QtCore import QObject, Qt, Signal
from qtpy.QtWidgets import QComboBox, QHBoxLayout, QLabel, QProgressBar, QPushButton, QWidget

from ..annotation.slice_embeddings import Cancelled
from ..errors import UserFacingError

log = logging.getLogger("napari_robustmedsam")
ROLE_KEY = "robustmedsam_role"  # layer.metadata key marking the layers the plugin manages


def unwrap(obj):
    """The real object behind napari's PublicOnlyProxy (plugin widgets get a proxied viewer and layers)."""
    return getattr(obj, "__wrapped__", obj)


def mark(layer, role: str):
    """Mark a layer as managed by the plugin (it is then never offered as an image to annotate)."""
    layer = unwrap(layer)
    layer.metadata[ROLE_KEY] = role
    return layer


def role_of(layer) -> str | None:
    return None if layer is None else unwrap(layer).metadata.get(ROLE_KEY)


def qt_alive(widget) -> bool:
    """False once Qt has deleted the C++ object behind ``widget`` (its panel or viewer was closed)."""
    try:
        from qtpy import sip
    except ImportError:  # a PySide binding: shiboken answers the same question
        from qtpy import shiboken

        return shiboken.isValid(widget)
    return not sip.isdeleted(widget)


def spatial_shape(image_layer) -> tuple[int, ...]:
    """An image layer's shape without the colour axis of an RGB(A) image: (Y, X) or (Z, Y, X)."""
    shape = tuple(np.shape(image_layer.data))
    return shape[:-1] if getattr(image_layer, "rgb", False) else shape


_STYLES = {
    "error": "background:#5c1f1f; color:#ffd7d7; border:1px solid #c44; border-radius:3px; padding:4px;",
    "warning": "background:#5a4a14; color:#fff1c2; border:1px solid #c9a227; border-radius:3px; padding:4px;",
    "hint": "background:#1f3a5c; color:#d7e9ff; border:1px solid #4a7fc1; border-radius:3px; padding:4px;",
    "info": "color:#cfcfcf; padding:2px;",
}


def describe_error(err: BaseException) -> str:
    """The message a user sees: user-facing errors as they are, others with their type."""
    if isinstance(err, UserFacingError):
        return str(err)
    if isinstance(err, Cancelled):
        return f"Cancelled: {err}"
    if isinstance(err, MemoryError):
        return "Out of memory: close other layers/programs or use a smaller image or model."
    return f"Unexpected error ({type(err).__name__}): {err}. Details were written to the log."


def shrinkable(combo: QComboBox, chars: int = 8) -> QComboBox:
    """Let a combo box shrink with a narrow dock instead of forcing its longest item's width."""
    combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
    combo.setMinimumContentsLength(chars)
    return combo


def mode_combo(modes, default: str, tooltip: str) -> QComboBox:
    """A shrinkable combo box of ``modes`` set to ``default``, with ``tooltip`` (the annotator's option rows)."""
    combo = shrinkable(QComboBox())
    combo.addItems(list(modes))
    combo.setCurrentText(default)
    combo.setToolTip(tooltip)
    return combo


class Banner(QLabel):
    """A word-wrapped message line: errors in red, hints in blue, info in grey; hidden when empty."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWordWrap(True)
        self.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.kind = ""
        self.hide()

    def show_message(self, text: str, kind: str = "info") -> None:
        # Only touch what changed: setStyleSheet re-polishes the widget and a new text re-lays out the panel,
        # and the annotator clears its banner on every click.
        kind = kind if text else ""
        style = _STYLES.get(kind, _STYLES["info"])
        if self.styleSheet() != style:
            self.setStyleSheet(style)
        self.kind = kind
        if self.text() != text:
            self.setText(text)
        if self.isHidden() == bool(text):
            self.setVisible(bool(text))

    def show_error(self, err: BaseException | str) -> None:
        text = err if isinstance(err, str) else describe_error(err)
        if not isinstance(err, (str, UserFacingError, Cancelled)):
            log.error("napari-robustmedsam: %s", text)
        self.show_message(text, "warning" if isinstance(err, Cancelled) else "error")

    def clear_message(self) -> None:
        self.show_message("", "")


class TaskHandle(QObject):
    """Progress and cancel of one background task; ``report`` and ``is_cancelled`` are thread-safe."""

    progress = Signal(int, int, str)

    def __init__(self, name: str = "") -> None:
        super().__init__()
        self.name = name
        self._cancel = threading.Event()
        self.worker = None
        self.done = False

    def report(self, done: int, total: int, text: str = "") -> None:
        self.progress.emit(int(done), int(total), str(text))

    def is_cancelled(self) -> bool:
        return self._cancel.is_set()

    def cancel(self) -> None:
        self._cancel.set()


_RUNNING: set = set()  # keep workers (and handles) alive until they finish
_BACKGROUND: set = set()  # the same for background tasks, which any_task_running does not count


def run_task(
    func: Callable[[TaskHandle], Any],
    on_done: Callable[[Any], None],
    on_error: Callable[[BaseException, str], None] | None = None,
    name: str = "",
    row: "TaskRow | None" = None,
    background: bool = False,
    owner=None,
) -> TaskHandle:
    """Run ``func(handle)`` in napari's thread worker; call ``on_done(result)`` or ``on_error(exc, tb)``
    on the GUI thread. Errors never escape to the console as bare tracebacks. A ``background`` task (the volume's
    prefetch) does not make :func:`any_task_running` true: waiting for idle must not wait for a whole volume.
    ``owner`` (a widget) is the panel the callbacks write into: once Qt has deleted it they are skipped, as they are
    for a deleted ``row``."""
    from napari.qt.threading import create_worker

    handle = TaskHandle(name)
    running = _BACKGROUND if background else _RUNNING
    _stop_tasks_when_quitting()

    def wrapped():
        try:
            return ("ok", func(handle), "")
        except BaseException as err:  # noqa: BLE001 - reported in the widget
            return ("error", err, traceback.format_exc())

    def finished(result):
        handle.done = True
        running.discard(handle)
        if owner is not None and not qt_alive(owner):
            log.debug("napari-robustmedsam task %r ended after its panel was closed", name)
            return
        if row is not None:
            if not qt_alive(row):
                # the panel that started the task was closed while it ran: its callbacks would write into
                # deleted widgets, so the result has nowhere to go
                log.debug("napari-robustmedsam task %r ended after its panel was closed", name)
                return
            row.finish(handle)
        status, value, tb = result
        if status == "ok":
            on_done(value)
        else:
            if not isinstance(value, (UserFacingError, Cancelled)):
                log.error("napari-robustmedsam task %r failed:\n%s", name, tb)
            if on_error is not None:
                on_error(value, tb)

    worker = create_worker(wrapped, _ignore_errors=True)
    worker.returned.connect(finished)
    handle.worker = worker
    running.add(handle)
    if row is not None:
        row.start(handle)
    worker.start()
    return handle


def any_task_running() -> bool:
    return bool(_RUNNING)


def stop_tasks(wait_ms: int = 120_000) -> bool:
    """Cancel every task, background ones included, and wait for their threads to end.

    Why: a worker that ends after its Qt objects are gone (the viewer closed, the application quitting) emits
    into a deleted object, and Qt aborts the whole process. Tasks stop between two slices or tiles, so the wait
    is at most one step. Returns False if a thread was still running after ``wait_ms``."""
    from qtpy.QtCore import QThreadPool

    for handle in list(_RUNNING | _BACKGROUND):
        handle.cancel()
    return QThreadPool.globalInstance().waitForDone(wait_ms)


def _stop_tasks_when_quitting() -> None:
    from qtpy.QtWidgets import QApplication

    app = QApplication.instance()
    if app is not None and not getattr(app, "_robustmedsam_stops_tasks", False):
        app.aboutToQuit.connect(stop_tasks)
        app._robustmedsam_stops_tasks = True


class TaskRow(QWidget):
    """A progress bar with a Cancel button, shown while a task runs."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self.bar = QProgressBar()
        self.bar.setTextVisible(True)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.clicked.connect(self._cancel)
        layout.addWidget(self.bar, 1)
        layout.addWidget(self.cancel_button)
        self.handle: TaskHandle | None = None
        self.hide()

    def start(self, handle: TaskHandle) -> None:
        self.handle = handle
        self.bar.setRange(0, 0)  # busy until the first report
        self.bar.setFormat(handle.name or "working…")
        handle.progress.connect(self._on_progress)
        self.cancel_button.setEnabled(True)
        self.show()

    def _on_progress(self, done: int, total: int, text: str) -> None:
        if total > 0:
            self.bar.setRange(0, total)
            self.bar.setValue(min(done, total))
        label = self.handle.name if self.handle else ""
        self.bar.setFormat(f"{label} {done}/{total}" + (f" - {text}" if text else "") if total > 0 else label)

    def _cancel(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.cancel_button.setEnabled(False)
            self.bar.setFormat("cancelling…")

    def finish(self, handle: TaskHandle) -> None:
        if handle is self.handle:
            self.handle = None
            self.hide()

    @property
    def busy(self) -> bool:
        return self.handle is not None
