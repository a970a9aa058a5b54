"""Live degradation preview and "Segment on degraded".

Pick a degradation (the registry's list, filtered by modality), a level (LQ-1..LQ-3+) or a continuous
severity, and a seed: a ``degraded`` image layer follows the controls live. A degradation that is fast on
the slice (at most ``SYNC_PREVIEW_MS``, measured per type and slice shape; the first run of a type on a slice of
up to 0.6 megapixel measures it) runs right away on the GUI thread, inside the control's change: no timer, no
thread hop, no paint in between (the first preview, which adds the layer, runs from the event loop). Slower ones run in a worker (the latest setting wins, all changes made while
one runs give one update), so the UI never freezes for long. For a volume only the visible slice is degraded
(a one-slice layer placed at that slice).

"Segment on degraded" reuses the annotator's prompts of the visible slice on the degraded slice (with its
own embedding) and shows the clean and the degraded mask side by side with their Dice.
"""

from __future__ import annotations

import time

import numpy as np
from psygnal import Signal as PSignal
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)
from superqt import QLabeledDoubleSlider

from ..annotation.model_choice import robust_head_suggestion
from ..annotation.robustness import degrade_slice
from ..annotation.slice_embeddings import image_kind
from ..degradations.signal_loss import signal_loss_notice
from ..errors import UserFacingError
from ._common import ROLE_KEY, Banner, TaskRow, mark, role_of, run_task, shrinkable, unwrap
from ._state import get_state
from .degraded_comparison import DegradedComparison
from .modality_follower import ModalityFollower

DEGRADED_NAME = "degraded"
ALL_MODALITIES = "(all types)"
DEBOUNCE_MS = 0  # worker path: coalesce the changes of one event-loop turn; a running preview coalesces the rest
SYNC_PREVIEW_MS = 100.0  # degradations measured at or below this (median of the last 3 runs) run on the GUI thread
SYNC_PROBE_PIXELS = 600_000  # an unmeasured type runs on the GUI thread (to measure it) on slices up to this size
THUMBNAIL_DELAY_MS = 250  # the layer-list thumbnail of "degraded" follows after a pause


class DegradationPreview(QWidget):
    preview_updated = PSignal(float)  # seconds from the last control change to the updated layer
    compared = PSignal(object)  # DegradedSegmentation

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        from ..degradations import LEVELS, MODALITIES

        self.viewer = napari_viewer
        self.state = get_state(napari_viewer)
        self.setObjectName("robustmedsam-degradation-preview")
        self.degraded_layer = None
        self._running = False
        self._pending = False
        self._t_change: float | None = None
        self.last_latency: float | None = None
        self.last_result = None
        self._last_seconds: float | None = None
        self._ready = False  # set at the end of __init__: changes before that never compute on the spot
        self._batch = 0  # > 0 inside set_settings: one update for all its changes
        self._seconds: dict[tuple, list[float]] = {}  # (type, slice shape) -> last degradation times (s)
        self.preview_modes = {"sync": 0, "worker": 0}

        self.modality_combo = shrinkable(QComboBox())
        self.modality_combo.addItems([ALL_MODALITIES, *MODALITIES])
        self.type_combo = shrinkable(QComboBox())
        self.mode_combo = shrinkable(QComboBox())
        self.mode_combo.addItems(["level", "severity"])
        self.level_combo = shrinkable(QComboBox())
        self.level_combo.addItems(list(LEVELS))
        self.level_combo.setCurrentText("LQ-2")
        self.severity_slider = QLabeledDoubleSlider(Qt.Orientation.Horizontal)
        self.severity_slider.setRange(0.0, 1.0)
        self.severity_slider.setValue(0.5)
        self.severity_slider.setDecimals(2)
        self.seed_spin = QSpinBox()
        self.seed_spin.setRange(0, 2**31 - 1)
        self.live_check = QCheckBox("Live preview")
        self.live_check.setChecked(True)
        self.describe_label = QLabel("")
        self.describe_label.setWordWrap(True)
        self.describe_label.setStyleSheet("color:#9aa;")

        # Shown once a preview is on screen while the model is the box-only base model: the user is looking at
        # degraded images, for which a shipped robust head measured better (annotation.model_choice).
        self.head_hint = QLabel("")
        self.head_hint.setWordWrap(True)
        self.head_hint.setObjectName("robustmedsam-robust-head-hint")
        self.head_hint.setOpenExternalLinks(False)
        self.head_hint.linkActivated.connect(lambda name: self.state.load_model(name))
        self.head_hint.hide()

        self.segment_button = QPushButton("Segment on degraded")
        self.segment_button.setToolTip("Reuse the annotator's prompts of this slice on the degraded slice")
        self.segment_button.clicked.connect(lambda: self.segment_on_degraded())
        self.task_row = TaskRow()
        self.banner = Banner()
        self.timing = QLabel("")
        self.timing.setWordWrap(True)
        self.timing.setStyleSheet("color:#9aa;")

        self.compare_box = DegradedComparison(self)

        self._lay_out()

        self._timer = self._single_shot(DEBOUNCE_MS, self._timer_fired)
        self._thumbnail_timer = self._single_shot(THUMBNAIL_DELAY_MS, self._update_thumbnail)

        self._fill_types()
        self._update_mode()
        self.modality_combo.currentTextChanged.connect(self._on_modality)
        self.modality_follower = ModalityFollower(self.state, self.modality_combo, ALL_MODALITIES)
        self.type_combo.currentTextChanged.connect(self._on_control)
        self.mode_combo.currentTextChanged.connect(self._update_mode)
        self.level_combo.currentTextChanged.connect(self._on_control)
        self.severity_slider.valueChanged.connect(self._on_control)
        self.seed_spin.valueChanged.connect(self._on_control)
        self.live_check.toggled.connect(self._on_live_toggled)
        napari_viewer.dims.events.current_step.connect(self._on_slice)
        self._ready = True

    def _single_shot(self, interval_ms: int, callback) -> QTimer:
        timer = QTimer(self)
        timer.setSingleShot(True)
        timer.setInterval(interval_ms)
        timer.timeout.connect(callback)
        return timer

    def _lay_out(self) -> None:
        """The controls in a form, then the timing, the buttons, the comparison and the messages."""
        form = QFormLayout()
        form.addRow("Modality", self.modality_combo)
        form.addRow("Degradation", self.type_combo)
        mode_row = QHBoxLayout()
        mode_row.addWidget(self.mode_combo)
        mode_row.addWidget(self.level_combo, 1)
        form.addRow("Strength", mode_row)
        form.addRow("Severity", self.severity_slider)
        form.addRow("Seed", self.seed_spin)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.describe_label)
        layout.addWidget(self.live_check)
        layout.addWidget(self.timing)
        layout.addWidget(self.head_hint)
        layout.addWidget(self.segment_button)
        layout.addWidget(self.task_row)
        layout.addWidget(self.compare_box)
        layout.addWidget(self.banner)
        layout.addStretch(1)

    # ---- controls -------------------------------------------------------------------------------
    @property
    def modality(self) -> str | None:
        text = self.modality_combo.currentText()
        return None if text == ALL_MODALITIES else text

    def _fill_types(self) -> None:
        from ..degradations import list_degradations, modality_degradations

        current = self.type_combo.currentText()
        names = list_degradations(self.modality)
        if self.modality is not None:  # the modality's own sets first, then the rest that applies
            groups = modality_degradations(self.modality)
            first = [n for n in (*groups["modality"], *groups["domain"], *groups["extra"]) if n in names]
            names = list(dict.fromkeys([*first, *names]))
        self.type_combo.blockSignals(True)
        self.type_combo.clear()
        self.type_combo.addItems(names)
        if current in names:
            self.type_combo.setCurrentText(current)
        elif "gaussian_noise" in names:
            self.type_combo.setCurrentText("gaussian_noise")
        self.type_combo.blockSignals(False)
        self._describe()

    def _describe(self) -> None:
        try:
            from ..degradations import describe

            text = str(describe(self.type_combo.currentText()).get("simulates", ""))
        except Exception:
            text = ""
        if self.describe_label.text() != text:  # a new text re-lays out the panel
            self.describe_label.setText(text)

    def _on_modality(self, *_):
        self._fill_types()
        self._on_control()

    def _update_mode(self, *_):
        level_mode = self.mode_combo.currentText() == "level"
        self.level_combo.setEnabled(level_mode)
        self.severity_slider.setEnabled(not level_mode)
        self._on_control()

    def _on_live_toggled(self, on: bool) -> None:
        if on:
            self._on_control()

    def _on_slice(self, event=None) -> None:
        if self.degraded_layer is not None and self.live_check.isChecked():
            self._on_control()

    def settings(self) -> dict:
        level_mode = self.mode_combo.currentText() == "level"
        return {
            "name": self.type_combo.currentText(),
            "level": self.level_combo.currentText() if level_mode else None,
            "severity": None if level_mode else float(self.severity_slider.value()),
            "seed": int(self.seed_spin.value()),
            "modality": self.modality,
        }

    def set_settings(self, name=None, level=None, severity=None, seed=None, modality=None) -> None:
        """Set the controls programmatically (tests, scripts); triggers one preview like the user would."""
        self._batch += 1
        try:
            if modality is not None:
                self.modality_combo.setCurrentText(modality)
            if name is not None:
                self.type_combo.setCurrentText(name)
            if severity is not None:
                self.mode_combo.setCurrentText("severity")
                self.severity_slider.setValue(float(severity))
            elif level is not None:
                self.mode_combo.setCurrentText("level")
                self.level_combo.setCurrentText(level)
            if seed is not None:
                self.seed_spin.setValue(int(seed))
        finally:
            self._batch -= 1
        self._on_control()

    def _on_control(self, *_):
        if self._batch:
            return
        self._describe()
        if not self.live_check.isChecked():
            return
        self._t_change = time.perf_counter()
        if self._ready and not self._running and self._layer_shown():
            self._timer.stop()
            self._start_preview()  # fast types update right here; slow ones start a worker
        else:  # not yet a layer to update: it is added from the event loop, not from inside a control's signal
            self._timer.start()

    def _layer_shown(self) -> bool:
        return self.degraded_layer is not None and self.degraded_layer in self.viewer.layers

    def _timer_fired(self) -> None:
        if self.live_check.isChecked():
            self._start_preview()

    # ---- source image -----------------------------------------------------------------------------
    def _source(self):
        """(layer, kind, z, slice image) of the image being annotated (or the active image layer)."""
        from napari.layers import Image

        annotator = self.state.annotator
        layer = annotator.image_layer if annotator is not None and annotator.image_layer is not None else None
        if layer is None:
            active = unwrap(self.viewer.layers.selection.active)
            if isinstance(active, Image) and role_of(active) is None:
                layer = active
        if layer is None:
            raise UserFacingError("no image to degrade: open an image (or choose one in the annotator)")
        kind = image_kind(tuple(layer.data.shape), bool(layer.rgb))
        z = 0
        if kind in ("volume", "rgb_volume"):
            z = annotator.current_z() if annotator is not None and annotator.image_layer is layer else int(
                np.clip(round((self.viewer.dims.point[-3] - layer.translate[0]) / layer.scale[0]), 0, layer.data.shape[0] - 1))
            image = np.asarray(layer.data[z])
        else:
            image = np.asarray(layer.data)
        if image.ndim == 3 and image.shape[-1] == 4:
            image = image[..., :3]
        return layer, kind, z, image

    # ---- preview ------------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Recompute the preview now (also when live preview is off)."""
        self._t_change = time.perf_counter()
        self._start_preview()

    def _start_preview(self) -> None:
        if self._running:
            self._pending = True
            return
        try:
            layer, kind, z, image = self._source()
        except UserFacingError as err:
            self.banner.show_error(err)
            return
        settings = self.settings()
        if not settings["name"]:
            return
        if settings["level"] == "LQ-3+" and settings["modality"] is None:
            self.banner.show_error(UserFacingError("LQ-3+ adds the modality's domain artifacts: choose a modality"))
            return
        self._pending = False
        t_change = self._t_change or time.perf_counter()
        key = (settings["name"], tuple(image.shape))

        def degrade():
            return degrade_slice(image, settings["name"], settings["level"], settings["severity"], settings["seed"],
                                 settings["modality"])

        if self._runs_on_gui_thread(key, image):
            t0 = time.perf_counter()
            try:
                out = degrade()
            except Exception as err:  # noqa: BLE001 - shown in the widget
                self.banner.show_error(err)
                return
            seconds = time.perf_counter() - t0
            self._record(key, seconds)
            self.preview_modes["sync"] += 1
            self._finish(layer, kind, z, out, settings, seconds, t_change, image)
            return

        self._running = True
        self.preview_modes["worker"] += 1

        def work(handle):
            t0 = time.perf_counter()
            out = degrade()
            return out, time.perf_counter() - t0

        def done(value):
            self._running = False
            out, seconds = value
            self._record(key, seconds)  # a worker's time is an upper bound of the GUI thread's: it may switch back
            self._finish(layer, kind, z, out, settings, seconds, t_change, image)
            if self._pending:
                self._start_preview()

        def failed(err, tb):
            self._running = False
            self.banner.show_error(err)
            if self._pending:
                self._start_preview()

        run_task(work, done, failed, name="degrading", owner=self)

    def _record(self, key: tuple, seconds: float) -> None:
        times = self._seconds.setdefault(key, [])
        times.append(seconds)
        del times[:-3]

    def _runs_on_gui_thread(self, key: tuple, image: np.ndarray) -> bool:
        times = self._seconds.get(key)
        if not times:
            return int(np.prod(image.shape[:2])) <= SYNC_PROBE_PIXELS
        return float(np.median(times)) * 1000 <= SYNC_PREVIEW_MS

    def _finish(self, layer, kind: str, z: int, out: np.ndarray, settings: dict, seconds: float, t_change: float,
                clean: np.ndarray) -> None:
        self._show_degraded(layer, kind, z, out)
        self.last_latency = time.perf_counter() - t_change
        self._last_seconds = seconds
        self.banner.clear_message()
        how = settings["level"] or f"severity {settings['severity']:.2f}"
        text = (f"{settings['name']} {how}, seed {settings['seed']}: degraded in {seconds * 1000:.0f} ms, "
                f"shown {self.last_latency * 1000:.0f} ms after the change")
        lost = signal_loss_notice(clean, out)
        self.timing.setText(f"{text}. Note: {lost}." if lost else text)
        self._suggest_robust_head()
        self.preview_updated.emit(self.last_latency)

    def _suggest_robust_head(self) -> None:
        loaded = self.state.loaded
        text = robust_head_suggestion(getattr(loaded, "name", None) if loaded is not None else None)
        self.head_hint.setText(text)
        self.head_hint.setVisible(bool(text))

    def _update_thumbnail(self) -> None:
        layer = self.degraded_layer
        if layer is not None and layer in self.viewer.layers:
            layer.refresh(data_displayed=False, highlight=False, extent=False)

    def _show_degraded(self, layer, kind: str, z: int, out: np.ndarray) -> None:
        volume = kind in ("volume", "rgb_volume")
        data = out[None] if volume else out
        scale, translate = tuple(layer.scale), list(layer.translate)
        if volume:
            translate[0] = translate[0] + z * scale[0]
        existing = self.degraded_layer if self.degraded_layer is not None and self.degraded_layer in self.viewer.layers else None
        if existing is not None and (existing.data.shape != data.shape or existing.rgb != layer.rgb):
            self.viewer.layers.remove(existing)
            existing = None
        if existing is None:
            selected = self.viewer.layers.selection.active
            existing = unwrap(self.viewer.add_image(
                data, name=DEGRADED_NAME, rgb=bool(layer.rgb), scale=scale, translate=translate,
                colormap=layer.colormap if not layer.rgb else None,
                contrast_limits=None if layer.rgb else layer.contrast_limits,
                metadata={ROLE_KEY: "degraded"},  # marked before the annotator sees it inserted: not a new target
            ))
            existing = mark(existing, "degraded")
            self.degraded_layer = existing
            if selected is not None and selected in self.viewer.layers:
                self.viewer.layers.selection.active = selected  # keep the prompt layer active
        else:
            # in place + one refresh: cheaper than the data setter; translate / limits only when they change; the
            # layer-list thumbnail follows once the controls pause (it costs a repaint of the layer list)
            if not np.allclose(existing.translate, translate):
                existing.translate = translate
            if not layer.rgb and tuple(existing.contrast_limits) != tuple(layer.contrast_limits):
                existing.contrast_limits = layer.contrast_limits  # same window: brightness changes stay visible
            target = existing.data
            if isinstance(target, np.ndarray) and target.flags.writeable and target.dtype == data.dtype:
                np.copyto(target, data)
                existing.refresh(thumbnail=False)
                self._thumbnail_timer.start()
            else:
                existing.data = data
        annotator = self.state.annotator
        if annotator is not None and annotator.current_layer is not None and annotator.current_layer in self.viewer.layers:
            idx = self.viewer.layers.index(existing)
            target = self.viewer.layers.index(annotator.committed_layer or annotator.current_layer)
            if idx > target:
                self.viewer.layers.move(idx, target)
    # ---- segment on degraded -------------------------------------------------------------------
    def segment_on_degraded(self):
        """Reuse the annotator's prompts of the visible slice on the degraded slice (:mod:`.degraded_comparison`)."""
        return self.compare_box.run()
