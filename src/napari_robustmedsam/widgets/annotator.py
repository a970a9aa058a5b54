"""The annotator: prompt-guided iterative segmentation of the active image layer, in 2D and 3D.

Layers it manages (created next to the image, with its scale and translation):

- ``point prompts`` (Points): positive (green) / negative (red) clicks; **T** toggles the polarity of the
  next point.
- ``box prompts`` (Shapes): rectangles; the box is the primary prompt of box-trained models.
- ``current object`` (Labels): the object being segmented, updated on every prompt change (live) or on **S**.
- ``committed objects`` (Labels): **C** commits the current object with a new id (other ids are never
  overwritten unless "overwrite" is ticked); **U** undoes the last commit; **Shift-C** clears the current
  object and its prompts.

3D volumes: annotate any slice; **Shift-S** / "Propagate" segments the object through the volume from the
annotated slices; correcting a slice afterwards re-propagates the stretches next to it.
The logic lives in :mod:`napari_robustmedsam.annotation` (no Qt); this module wires it to napari.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import numpy as np
from psygnal import Signal as PSignal
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from ..annotation.embeddings import SliceEmbeddings, image_kind
from ..annotation.feedback import COMMITTED_COLORS, CURRENT_COLOR, describe_change, rgba
from ..annotation.interactive import (
    BOX_PRIMARY_HINT,
    CLICK_GUARD_MODES,
    DEFAULT_CLICK_GUARD,
    DEFAULT_CLICK_GUARD_REACH,
    DEFAULT_LOCAL_CORRECTIONS,
    LOCAL_CORRECTION_MODES,
    segment_slice,
)
from ..annotation.model_info import display_name
from ..annotation.propagation import (
    DEFAULT_IOU_THRESHOLD,
    DEFAULT_PROMPT_MODE,
    PROMPT_MODES,
    predictor_segment_fn,
    propagate_object,
)
from ..annotation.session import AnnotationSession, SlicePrompts
from ..errors import ImageInputError, UserFacingError
from ._common import Banner, TaskRow, any_task_running, mark, mode_combo, role_of, run_task, shrinkable, unwrap
from ._state import get_state

POINTS_NAME = "point prompts"
BOXES_NAME = "box prompts"
CURRENT_NAME = "current object"
COMMITTED_NAME = "committed objects"
POINT_COLORS = ["#00ff00", "#ff2020"]  # positive, negative
POLARITIES = ["positive", "negative"]
# The decoder runs on the GUI thread while its median time there stays at or below this; slower models
# (or a machine under heavy load) use a worker. On 2 CPU cores a decode in a worker measured 3-5x slower than
# the same decode on the GUI thread (it competes with Qt/OpenGL rendering of the click for the cores), so the
# GUI thread is the fast path whenever the freeze it causes stays short (docs/annotator.md, "UI latency").
SYNC_DECODER_MS = 250.0
SYNC_PROBE_EVERY = 8  # in worker mode, every 8th decode runs on the GUI thread again to re-measure it
# Intra-op threads for a decode on the GUI thread (None: torch's setting). A decode is a few hundred small ops:
# with 2 OpenMP threads each op waits for the second thread, and on a loaded 2-core machine that thread is often
# descheduled. Measured interleaved on this machine under load 3.6 (30 box decodes each, 512 x 512): 1 thread
# p50 147 / p95 181 ms, 2 threads p50 191 / p95 572 ms; in a second state of the same process 84 vs 384 ms.
# On the idle machine (04:45, benchmarks/ui_latency.py, 30 clicks each) 2 threads won: decoder p50 86 vs 102 ms,
# prompt -> layer 119 vs 142 ms. Users' machines are not loaded by other people's jobs: torch's setting is the
# default; 1 is the choice for a shared, loaded machine.
GUI_DECODE_THREADS: int | None = None
PARTIAL_UPDATE_FRACTION = 0.25  # up to this share of a plane changed: napari's partial labels update
THUMBNAIL_DELAY_MS = 250  # the layer-list thumbnail of "current object" follows after a pause in clicking
KEYS = {
    "s": "segment",
    "c": "commit",
    "Shift-C": "clear",
    "t": "toggle_polarity",
    "u": "undo",
    "b": "take_back_click",
    "Shift-S": "propagate",
}


def committed_layer_name(image_name: str) -> str:
    return f"{COMMITTED_NAME} ({image_name})"


class AnnotatorWidget(QWidget):
    """Prompt-guided segmentation of one image layer (2D, RGB or 3D volume)."""

    segmented = PSignal(int, float)  # slice, seconds from request to updated layer
    committed = PSignal(int)
    propagated = PSignal(object)

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.state = get_state(napari_viewer)
        self.setObjectName("robustmedsam-annotator")
        self.image_layer = None
        self.kind: str | None = None
        self.session: AnnotationSession | None = None
        self.embeddings: SliceEmbeddings | None = None
        self.points_layer = None
        self.boxes_layer = None
        self.current_layer = None
        self.committed_layer = None
        self._generation = 0
        self._suppress = 0
        self._seg_running = False
        self._seg_pending: tuple[int, float] | None = None
        self._embed_handles: dict[int, Any] = {}
        self._decoder_ms: list[float] = []  # every decode (GUI thread or worker), ms
        self._sync_ms: list[float] = []  # decodes on the GUI thread, ms: what the sync/worker choice uses
        self._since_probe = 0
        self.decode_modes = {"sync": 0, "worker": 0}  # how the decodes ran (benchmarks, status)
        self._propagated_once = False
        self._changed_since_propagation: set[int] = set()
        self._propagation_handle = None
        self._propagation_token = 0  # results of superseded propagations are dropped
        self.last_latency: float | None = None
        self._build_ui()
        self._repropagate_timer = QTimer(self)
        self._repropagate_timer.setSingleShot(True)
        self._repropagate_timer.setInterval(700)
        self._repropagate_timer.timeout.connect(self._auto_repropagate)
        self._thumbnail_timer = QTimer(self)
        self._thumbnail_timer.setSingleShot(True)
        self._thumbnail_timer.setInterval(THUMBNAIL_DELAY_MS)
        self._thumbnail_timer.timeout.connect(self._update_current_thumbnail)
        # after a mask is shown: the next corrective click's mask-prompt work, in the pause before that click
        self._prepare_timer = QTimer(self)
        self._prepare_timer.setSingleShot(True)
        self._prepare_timer.setInterval(0)
        self._prepare_timer.timeout.connect(self._prepare_next_click)
        self._prepare_z: int | None = None

        self.state.set_annotator(self)
        self.state.model_changed.connect(self._on_model_changed)
        napari_viewer.layers.events.inserted.connect(self._refresh_image_choices)
        napari_viewer.layers.events.removed.connect(self._on_layer_removed)
        napari_viewer.dims.events.current_step.connect(self._on_slice_changed)
        self._bind_keys()
        self._refresh_image_choices()
        active = unwrap(napari_viewer.layers.selection.active)
        if self._is_image(active):
            self.set_image_layer(active)
        elif self.image_combo.count():
            self.set_image_layer(unwrap(self._image_layers()[0]))
        if self.state.loaded is not None:
            self._on_model_changed(self.state.loaded)

    # =============================================================================================
    # UI
    # =============================================================================================
    def _build_ui(self) -> None:
        self.image_combo = shrinkable(QComboBox())
        self.image_combo.currentIndexChanged.connect(self._on_combo_changed)
        self.embed_button = QPushButton("Compute embeddings")
        self.embed_button.setToolTip("Encode the image (every slice of a volume) once; prompts are then fast")
        self.embed_button.clicked.connect(lambda: self.compute_embeddings())
        self.embed_row = TaskRow()
        self.embed_status = QLabel("")
        self.embed_status.setWordWrap(True)

        self.live_check = QCheckBox("Live: segment on every prompt change")
        self.live_check.setChecked(True)
        self.local_combo = mode_combo(
            LOCAL_CORRECTION_MODES, DEFAULT_LOCAL_CORRECTIONS,
            "Local: a corrective click changes the mask only in the region connected to the click, the rest "
            "stays as it was (otherwise the model re-predicts the whole object on every click). 'with a box': "
            "local once the object has a box; from points alone the whole new mask is taken.",
        )
        self.guard_combo = mode_combo(
            CLICK_GUARD_MODES, DEFAULT_CLICK_GUARD,
            "Guarded: a positive click only adds to the mask and a negative click only removes from it, and only "
            "where the new click is nearer than your earlier clicks of the other label, so earlier clicks keep "
            "their label. A negative click made before any positive click removes only near itself (within twice "
            "its distance to the mask's edge). 'with a box': guarded once the object has a box.",
        )
        self.polarity_button = QPushButton()
        self.polarity_button.setToolTip("Polarity of the next point (T)")
        self.polarity_button.clicked.connect(self.toggle_polarity)
        self.overwrite_check = QCheckBox("Commit overwrites other objects")
        self.hint = Banner()
        self.banner = Banner()
        self.status = QLabel("")
        self.status.setWordWrap(True)

        buttons = QGridLayout()
        self.segment_button = QPushButton("Segment [S]")
        self.commit_button = QPushButton("Commit [C]")
        self.clear_button = QPushButton("Clear [Shift-C]")
        self.undo_button = QPushButton("Undo commit [U]")
        self.take_back_button = QPushButton("Take back click [B]")
        self.take_back_button.setToolTip("Remove the last point on this slice: the mask returns exactly to what it "
                                         "was before that click")
        self.segment_button.clicked.connect(lambda: self.segment())
        self.take_back_button.clicked.connect(lambda: self.take_back_click())
        self.commit_button.clicked.connect(lambda: self.commit())
        self.clear_button.clicked.connect(lambda: self.clear())
        self.undo_button.clicked.connect(lambda: self.undo())
        buttons.addWidget(self.segment_button, 0, 0)
        buttons.addWidget(self.commit_button, 0, 1)
        buttons.addWidget(self.clear_button, 1, 0)
        buttons.addWidget(self.undo_button, 1, 1)
        buttons.addWidget(self.take_back_button, 2, 0, 1, 2)

        self.volume_box = QGroupBox("3D")
        vform = QFormLayout(self.volume_box)
        self.propagate_button = QPushButton("Propagate through volume [Shift-S]")
        self.propagate_button.clicked.connect(lambda: self.propagate())
        self.iou_spin = QDoubleSpinBox()
        self.iou_spin.setRange(0.0, 1.0)
        self.iou_spin.setSingleStep(0.05)
        self.iou_spin.setValue(DEFAULT_IOU_THRESHOLD)
        self.iou_spin.setToolTip("Stop when the IoU between neighbouring slices falls below this")
        self.prompt_mode_combo = shrinkable(QComboBox())
        self.prompt_mode_combo.addItems(PROMPT_MODES)
        self.prompt_mode_combo.setCurrentText(DEFAULT_PROMPT_MODE)
        self.prompt_mode_combo.setToolTip("Prompts derived from the neighbour slice's mask")
        self.auto_repropagate_check = QCheckBox("Re-propagate after a correction")
        self.auto_repropagate_check.setChecked(True)
        self.mark_end_button = QPushButton("Object ends on this slice")
        self.mark_end_button.setToolTip("Empty the object here; propagation never goes past this slice")
        self.mark_end_button.clicked.connect(lambda: self.mark_end())
        self.propagate_row = TaskRow()
        vform.addRow(self.propagate_button)
        vform.addRow("Stop below IoU", self.iou_spin)
        vform.addRow("From neighbour", self.prompt_mode_combo)
        vform.addRow(self.auto_repropagate_check)
        vform.addRow(self.mark_end_button)
        vform.addRow(self.propagate_row)

        form = QFormLayout()
        form.addRow("Image", self.image_combo)
        polarity_row = QHBoxLayout()
        polarity_row.addWidget(QLabel("Next point"))
        polarity_row.addWidget(self.polarity_button, 1)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.embed_button)
        layout.addWidget(self.embed_row)
        layout.addWidget(self.embed_status)
        layout.addWidget(self.hint)
        layout.addWidget(self.live_check)
        local_row = QHBoxLayout()
        local_row.addWidget(QLabel("Corrections stay local"))
        local_row.addWidget(self.local_combo, 1)
        layout.addLayout(local_row)
        guard_row = QHBoxLayout()
        guard_row.addWidget(QLabel("Clicks only add / remove"))
        guard_row.addWidget(self.guard_combo, 1)
        layout.addLayout(guard_row)
        layout.addLayout(polarity_row)
        layout.addLayout(buttons)
        layout.addWidget(self.overwrite_check)
        layout.addWidget(self.volume_box)
        layout.addWidget(self.banner)
        layout.addWidget(self.status)
        layout.addStretch(1)
        self._update_polarity_button()
        self._update_enabled()

    def _update_enabled(self) -> None:
        has_image = self.session is not None
        for w in (self.embed_button, self.segment_button, self.commit_button, self.clear_button, self.undo_button,
                  self.take_back_button):
            w.setEnabled(has_image)
        self.undo_button.setEnabled(bool(self.session and self.session.can_undo))
        self.volume_box.setVisible(bool(self.session and self.session.is_volume))

    def _set_status(self, text: str) -> None:
        self.status.setText(text)

    # =============================================================================================
    # image layer choice
    # =============================================================================================
    @staticmethod
    def _is_image(layer) -> bool:
        from napari.layers import Image

        return isinstance(layer, Image) and role_of(layer) is None

    def _image_layers(self) -> list:
        return [layer for layer in self.viewer.layers if self._is_image(layer)]

    def _refresh_image_choices(self, event=None) -> None:
        current = self.image_layer
        self.image_combo.blockSignals(True)
        self.image_combo.clear()
        for layer in self._image_layers():
            self.image_combo.addItem(layer.name)
        if current is not None and current in self.viewer.layers:
            self.image_combo.setCurrentText(current.name)
        self.image_combo.blockSignals(False)
        # a newly opened image becomes the one annotated (the user opened it to annotate it)
        if event is not None and self.image_combo.count() and self._is_image(unwrap(getattr(event, "value", None))):
            if self.set_image_layer(unwrap(event.value)):
                # napari makes the inserted layer active after this callback: give the prompt layer back after it
                QTimer.singleShot(0, self.select_prompt_layer)

    def _on_combo_changed(self, index: int) -> None:
        name = self.image_combo.currentText()
        if name and name in self.viewer.layers and (self.image_layer is None or self.image_layer.name != name):
            self.set_image_layer(unwrap(self.viewer.layers[name]))

    def _on_layer_removed(self, event) -> None:
        layer = unwrap(getattr(event, "value", None))
        if layer is self.image_layer:
            self._reset_image()
        for attr in ("points_layer", "boxes_layer", "current_layer", "committed_layer"):
            if getattr(self, attr) is layer:
                setattr(self, attr, None)
        self._refresh_image_choices()

    def _reset_image(self) -> None:
        self._generation += 1
        self.image_layer = None
        self.kind = None
        self.session = None
        self.embeddings = None
        self._update_enabled()

    def set_image_layer(self, layer, force: bool = False) -> bool:
        """Annotate ``layer``; an unsupported layer shows an error here and changes nothing.

        Choosing the layer already being annotated keeps the session unless ``force``.
        """
        self.banner.clear_message()
        layer = unwrap(layer)
        if layer is self.image_layer and self.session is not None and not force:
            return True
        try:
            if not self._is_image(layer):
                kind_name = type(layer).__name__ if layer is not None else "nothing"
                raise ImageInputError(
                    f"the annotator works on image layers; '{getattr(layer, 'name', '')}' is a {kind_name} layer"
                )
            if getattr(layer, "multiscale", False):
                raise ImageInputError(
                    f"'{layer.name}' is a multiscale (pyramid) image: open its full-resolution level as a plain image"
                )
            kind = image_kind(tuple(layer.data.shape), bool(layer.rgb))
            dtype = np.dtype(layer.data.dtype)
            if dtype.kind not in "uifb":
                raise ImageInputError(f"'{layer.name}' has pixel type {dtype}, which cannot be segmented")
        except UserFacingError as err:
            self.banner.show_error(err)
            return False
        self._generation += 1
        self.image_layer = layer
        self.kind = kind
        spatial = tuple(layer.data.shape[:-1]) if layer.rgb else tuple(layer.data.shape)
        self.session = AnnotationSession(spatial)
        self._propagated_once = False
        self._changed_since_propagation.clear()
        self._ensure_layers()
        self._sync_committed_into_session()
        self._make_embeddings()
        self.image_combo.blockSignals(True)
        self.image_combo.setCurrentText(layer.name)
        self.image_combo.blockSignals(False)
        _connect_once(layer.events.data, self._on_image_data_changed)
        self._update_enabled()
        self._update_hint()
        self._set_status(f"Annotating '{layer.name}' ({kind}, {' x '.join(map(str, spatial))}).")
        return True

    def _on_image_data_changed(self, event=None) -> None:
        if event is not None and unwrap(getattr(event, "source", None)) is not self.image_layer:
            return
        layer = self.image_layer
        if layer is not None:
            self.set_image_layer(layer, force=True)

    # =============================================================================================
    # managed layers
    # =============================================================================================
    def _layer_geometry(self) -> dict:
        layer = self.image_layer
        return {"scale": tuple(layer.scale), "translate": tuple(layer.translate)}

    def _ensure_layers(self) -> None:
        shape = self.session.shape
        ndim = len(shape)
        geo = self._layer_geometry()
        self._suppress += 1
        try:
            # points
            layer = self._existing(POINTS_NAME, lambda lay: lay.ndim == ndim)
            if layer is None:
                layer = self.viewer.add_points(
                    np.zeros((0, ndim)),
                    name=POINTS_NAME,
                    ndim=ndim,
                    property_choices={"label": POLARITIES},
                    face_color="label",
                    face_color_cycle=POINT_COLORS,
                    border_color="#ffffff",
                    border_width=0.1,
                    size=max(4.0, 0.02 * max(shape[-2:])),
                    **geo,
                )
            else:
                layer.data = np.zeros((0, ndim))
                layer.scale, layer.translate = geo["scale"], geo["translate"]
            self.points_layer = mark(layer, "points")
            self.points_layer.feature_defaults = {"label": "positive"}
            _connect_once(self.points_layer.events.data, self._on_points_changed)
            # boxes
            layer = self._existing(BOXES_NAME, lambda lay: lay.ndim == ndim)
            if layer is None:
                layer = self.viewer.add_shapes(
                    name=BOXES_NAME, ndim=ndim, face_color="transparent", edge_color="#ffd400",
                    edge_width=max(1.0, 0.004 * max(shape[-2:])), **geo,
                )
            else:
                layer.data = []
                layer.scale, layer.translate = geo["scale"], geo["translate"]
            self.boxes_layer = mark(layer, "boxes")
            _connect_once(self.boxes_layer.events.data, self._on_boxes_changed)
            # current object
            layer = self._existing(CURRENT_NAME, lambda lay: tuple(lay.data.shape) == shape)
            if layer is None:
                layer = self.viewer.add_labels(np.zeros(shape, np.uint8), name=CURRENT_NAME, opacity=0.55, **geo)
                _set_label_color(layer, 1, CURRENT_COLOR)
            else:
                layer.data = np.zeros(shape, np.uint8)
                layer.scale, layer.translate = geo["scale"], geo["translate"]
            self.current_layer = mark(layer, "current")
            # committed objects: one layer per image, so switching images never loses or mixes labels
            name = committed_layer_name(self.image_layer.name)
            layer = self._existing(name, lambda lay: tuple(lay.data.shape) == shape)
            if layer is None:
                layer = self.viewer.add_labels(np.zeros(shape, np.uint32), name=name, opacity=0.6, **geo)
                _use_committed_colors(layer)
            elif layer.metadata.get("robustmedsam_image") != id(self.image_layer):
                layer.data = np.zeros(shape, np.uint32)  # a new image under the same name (e.g. image series)
            self.committed_layer = mark(layer, "committed")
            self.committed_layer.metadata["robustmedsam_image"] = id(self.image_layer)
            for managed in (self.points_layer, self.boxes_layer, self.current_layer, self.committed_layer,
                            self.image_layer):
                self.bind_layer_keys(managed)
            # prompt layers on top, the image stays selectable
            for managed in (self.committed_layer, self.current_layer, self.boxes_layer, self.points_layer):
                idx = self.viewer.layers.index(managed)
                self.viewer.layers.move(idx, len(self.viewer.layers))
            self._show_only_this_images_layers()
        finally:
            self._suppress -= 1
        self.select_prompt_layer()

    def _show_only_this_images_layers(self) -> None:
        """The annotated image and its committed objects shown; other images and their committed layers hidden,
        so that labels of an earlier image are never drawn over this one."""
        for layer in self.viewer.layers:
            layer = unwrap(layer)
            if layer is self.image_layer or layer is self.committed_layer:
                layer.visible = True
            elif self._is_image(layer) or role_of(layer) == "committed":
                layer.visible = False

    def _existing(self, name: str, fits):
        """The layer called ``name`` if it exists and ``fits(layer)``; removed (None) if it does not fit."""
        if name not in self.viewer.layers:
            return None
        layer = unwrap(self.viewer.layers[name])
        if fits(layer):
            return layer
        self.viewer.layers.remove(layer)
        return None

    def select_prompt_layer(self) -> None:
        """Box-trained models: select the box layer in rectangle mode; otherwise the points layer in add mode."""
        box_primary = bool(self.state.loaded is not None and self.state.loaded.box_primary) or self.state.loaded is None
        try:
            if box_primary and self.boxes_layer is not None:
                self.viewer.layers.selection.active = self.boxes_layer
                self.boxes_layer.mode = "add_rectangle"
            elif self.points_layer is not None:
                self.viewer.layers.selection.active = self.points_layer
                self.points_layer.mode = "add"
        except Exception:
            pass

    def _sync_committed_into_session(self) -> None:
        if self.session is not None and self.committed_layer is not None:
            data = np.asarray(self.committed_layer.data)
            if data.shape == self.session.shape:
                self.session.sync_labels(data)

    def _update_current_layer(self, z: int | None = None) -> None:
        if self.current_layer is None or self.session is None:
            return
        data = self.current_layer.data
        if not isinstance(data, np.ndarray) or data.shape != self.session.shape or not data.flags.writeable:
            self.current_layer.data = self.session.current.astype(np.uint8)
            return
        # in place (cheaper than the data setter on every click): a small change through napari's partial
        # update, a large one with one refresh; nothing to do if the mask is unchanged; the layer-list
        # thumbnail is refreshed once the clicks pause (it costs a repaint of the list)
        if z is None or not self.session.is_volume:
            target, source = data, self.session.current
        else:
            target, source = data[z], self.session.current[z]
        changed = target != source
        n_changed = int(np.count_nonzero(changed))
        if n_changed == 0:
            return
        if n_changed <= PARTIAL_UPDATE_FRACTION * changed.size and _set_pixels(self.current_layer, changed, source, z):
            self._thumbnail_timer.start()
            return
        np.copyto(target, source, casting="unsafe")
        # same shape and dtype: the extent (and with it the viewer's dims) cannot have changed
        self.current_layer.refresh(thumbnail=False, extent=False, highlight=False)
        self._thumbnail_timer.start()

    def _update_current_thumbnail(self) -> None:
        layer = self.current_layer
        if layer is not None and layer in self.viewer.layers:
            layer.refresh(data_displayed=False, highlight=False, extent=False)

    def _update_committed_layer(self) -> None:
        if self.committed_layer is not None and self.session is not None:
            self.committed_layer.data = self.session.labels.copy()

    # =============================================================================================
    # model and embeddings
    # =============================================================================================
    def _on_model_changed(self, loaded) -> None:
        self._make_embeddings()
        self._decoder_ms.clear()
        self._sync_ms.clear()
        self._since_probe = 0
        self._update_hint()
        self.select_prompt_layer()
        if self.session is not None and self.session.has_current:
            self._set_status(f"Model changed to {display_name(loaded)}: press S to segment again with it.")

    def _update_hint(self) -> None:
        loaded = self.state.loaded
        if loaded is not None and loaded.box_primary:
            self.hint.show_message(BOX_PRIMARY_HINT.format(name=display_name(loaded)), "hint")
        elif loaded is None:
            self.hint.show_message(
                "The embedded LiteMedSAM is loaded on first use. It was trained with box prompts only: "
                "draw a box around the object first, then refine with points.", "hint")
        else:
            self.hint.show_message("Click positive / negative points or draw a box.", "info")

    def _make_embeddings(self) -> None:
        self._embed_handles.clear()
        if self.image_layer is None or self.state.predictor is None:
            self.embeddings = None
            self._update_embed_status()
            return
        self.embeddings = SliceEmbeddings(self.state.predictor, self.image_layer.data, self.kind,
                                          engine=self.state.engine)
        self._update_embed_status()

    def _update_embed_status(self) -> None:
        if self.embeddings is None:
            self.embed_status.setText("Embeddings: not computed yet.")
            return
        e = self.embeddings
        disk = f", {e.from_disk} from the disk cache" if e.from_disk else ""
        where = f" Cache: {e.cache_dir}" if e.cache_dir else " (memory only)"
        self.embed_status.setText(f"Embeddings: {e.n_ready}/{e.n_slices} slice(s) ready{disk}.{where}")

    def _with_model(self, then) -> bool:
        """Run ``then()`` now if a model is loaded, else after loading the default one."""
        if self.state.loaded is not None and self.embeddings is not None:
            then()
            return True
        if self.image_layer is None:
            self.banner.show_error(UserFacingError("open or choose an image layer first"))
            return False

        def ready(loaded):
            if self.embeddings is None:
                self._make_embeddings()
            then()

        self._set_status("Loading the embedded model…")
        self.state.ensure_model(ready, lambda err, tb: self.banner.show_error(err), row=self.embed_row)
        return False

    def compute_embeddings(self):
        """Encode every slice (progress + cancel); slices already embedded are skipped."""
        self.banner.clear_message()

        def start():
            emb = self.embeddings
            gen = self._generation
            todo = [z for z in range(emb.n_slices) if not emb.has(z)]
            if not todo:
                self._update_embed_status()
                self._set_status("Embeddings are already computed.")
                return
            t0 = time.perf_counter()
            z_visible = self.current_z()

            def work(handle):
                n = emb.compute(todo, progress=lambda d, t: handle.report(d, t, "slices"),
                                is_cancelled=handle.is_cancelled)
                _warm_decoder(emb, z_visible)
                return n

            def done(n):
                if gen == self._generation:
                    self._update_embed_status()
                    self._set_status(f"Embedded {n} slice(s) in {time.perf_counter() - t0:.1f} s.")
                    self._after_embedding()

            def failed(err, tb):
                self._update_embed_status()
                self.banner.show_error(err)

            self._embed_all_handle = run_task(work, done, failed, name="embedding", row=self.embed_row)

        self._with_model(start)

    def _after_embedding(self) -> None:
        z = self.current_z()
        if self.live_check.isChecked() and self.session is not None and not self.slice_prompts(z).is_empty:
            self.segment(z)

    # =============================================================================================
    # slices and prompts
    # =============================================================================================
    def current_z(self) -> int:
        if self.session is None or not self.session.is_volume:
            return 0
        point = np.asarray(self.viewer.dims.point, dtype=float)
        world_z = point[-3] if point.size >= 3 else 0.0
        scale = float(self.image_layer.scale[0]) or 1.0
        z = int(round((world_z - float(self.image_layer.translate[0])) / scale))
        return int(np.clip(z, 0, self.session.n_slices - 1))

    def set_slice(self, z: int) -> None:
        """Show slice ``z`` of the volume (moves the dims slider)."""
        if self.session is None or not self.session.is_volume:
            return
        world = float(self.image_layer.translate[0]) + z * float(self.image_layer.scale[0])
        axis = self.viewer.dims.ndim - 3
        self.viewer.dims.set_point(axis, world)

    def slice_prompts(self, z: int) -> SlicePrompts:
        """The user's prompts on slice ``z`` from the prompt layers, as (x, y) pixel coordinates."""
        volume = self.session is not None and self.session.is_volume
        pts = np.zeros((0, 2))
        labels = np.zeros((0,), np.int64)
        if self.points_layer is not None and len(self.points_layer.data):
            data = np.asarray(self.points_layer.data, dtype=float)
            polar = np.asarray(self.points_layer.features["label"]).astype(str)
            if volume:
                sel = np.round(data[:, 0]) == z
                data, polar = data[sel][:, 1:], polar[sel]
            pts = data[:, [1, 0]]  # (row, col) -> (x, y)
            labels = (polar == "positive").astype(np.int64)
        box = None
        if self.boxes_layer is not None and self.boxes_layer.nshapes:
            for verts in reversed(self.boxes_layer.data):
                v = np.asarray(verts, dtype=float)
                if volume:
                    if not np.all(np.round(v[:, 0]) == z):
                        continue
                    v = v[:, 1:]
                # napari pixel i spans [i - 0.5, i + 0.5]; model boxes use pixel edges (exclusive upper corner)
                y0, x0 = v.min(axis=0) + 0.5
                y1, x1 = v.max(axis=0) + 0.5
                if x1 - x0 >= 1 and y1 - y0 >= 1:
                    box = np.array([x0, y0, x1, y1])
                break
        return SlicePrompts(pts, labels, box, "user")

    def _clear_prompt_layers(self, z: int | None = None) -> None:
        """Remove prompts (of slice ``z`` only, or all) without triggering segmentation."""
        self._suppress += 1
        try:
            volume = self.session is not None and self.session.is_volume
            if self.points_layer is not None and len(self.points_layer.data):
                if z is None or not volume:
                    self.points_layer.data = np.zeros((0, self.points_layer.ndim))
                else:
                    keep = np.round(np.asarray(self.points_layer.data)[:, 0]) != z
                    features = self.points_layer.features[keep].reset_index(drop=True)
                    self.points_layer.data = np.asarray(self.points_layer.data)[keep]
                    self.points_layer.features = features
            if self.boxes_layer is not None and self.boxes_layer.nshapes:
                if z is None or not volume:
                    self.boxes_layer.data = []
                else:
                    drop = {i for i, v in enumerate(self.boxes_layer.data) if np.all(np.round(np.asarray(v)[:, 0]) == z)}
                    if drop:
                        self.boxes_layer.selected_data = drop
                        self.boxes_layer.remove_selected()
        finally:
            self._suppress -= 1

    def _on_points_changed(self, event=None) -> None:
        self._on_prompt_event(event)

    def _on_boxes_changed(self, event=None) -> None:
        if self.boxes_layer is not None and _still_drawing(self.boxes_layer):
            return  # the rectangle is still being dragged: segment on release
        self._on_prompt_event(event)

    def _on_prompt_event(self, event) -> None:
        if self._suppress or self.session is None:
            return
        action = str(getattr(event, "action", "changed")).lower()
        if action.endswith("ing"):  # adding / changing / removing: wait for the final event
            return
        if self.live_check.isChecked():
            self.segment(t_request=time.perf_counter())

    def _on_slice_changed(self, event=None) -> None:
        if self.session is not None and self.session.is_volume:
            z = self.current_z()
            state = "user prompts" if z in self.session.user_slices() else (
                "propagated" if z in self.session.current_prompts else "no object")
            self._set_status(f"Slice {z}: {state}.")

    # =============================================================================================
    # segmentation
    # =============================================================================================
    def segment(self, z: int | None = None, t_request: float | None = None) -> None:
        """Segment the current object on slice ``z`` (default: the visible one) from its prompts."""
        if self.session is None:
            self.banner.show_error(UserFacingError("open or choose an image layer first"))
            return
        z = self.current_z() if z is None else int(z)
        t_request = time.perf_counter() if t_request is None else t_request
        if self.state.loaded is None and self.slice_prompts(z).is_empty:
            self._set_status(f"No prompts on slice {z}: draw a box or click a point first.")
            return
        self._with_model(lambda: self._request(z, t_request))

    def _request(self, z: int, t_request: float) -> None:
        prompts = self.slice_prompts(z)
        if self._restore_earlier_state(z, prompts, t_request):
            return
        if prompts.is_empty:
            if self._seg_running:  # the running decode's mask would land after the clear: clear after it
                self._seg_pending = (z, t_request)
                return
            had = self.session.plane(self.session.current, z).any()
            self.session.clear_current_slice(z)
            if had:
                self._update_current_layer(z)
            self.segmented.emit(z, time.perf_counter() - t_request)
            return
        emb = self.embeddings
        if not emb.has(z):
            self._embed_then_segment(z, t_request)
            return
        if self._seg_running:
            self._seg_pending = (z, t_request)
            return
        args = self._segment_args(z, prompts)
        gen = self._generation
        if self._decode_on_gui_thread():
            try:
                t0 = time.perf_counter()
                with _intra_op_threads(GUI_DECODE_THREADS):
                    result = segment_slice(**args)
                ms = (time.perf_counter() - t0) * 1000
                self._decoder_ms.append(ms)
                self._sync_ms.append(ms)
                del self._sync_ms[:-5]
                self.decode_modes["sync"] += 1
            except Exception as err:  # noqa: BLE001 - shown in the widget
                self.banner.show_error(err)
                return
            self._apply(z, result, gen, t_request, prompts)
            return
        self._seg_running = True
        self.decode_modes["worker"] += 1

        def work(handle):
            t0 = time.perf_counter()
            res = segment_slice(**args)
            return res, (time.perf_counter() - t0) * 1000

        def done(value):
            self._seg_running = False
            result, ms = value
            self._decoder_ms.append(ms)
            self._apply(z, result, gen, t_request, prompts)
            self._run_pending()

        def failed(err, tb):
            self._seg_running = False
            self.banner.show_error(err)
            self._run_pending()

        run_task(work, done, failed, name="segmenting")

    def _restore_earlier_state(self, z: int, prompts: SlicePrompts, t_request: float) -> bool:
        """A click taken back: the slice's earlier state for these prompts, if the session kept one, is shown
        again as it was (no decode). Not while a decode runs: its result would land on top (it is retried after)."""
        if self._seg_running:
            return False
        session = self.session
        was_user_slice = z in session.user_slices()
        if not session.step_back(z, prompts):
            return False
        n = int(session.plane(session.current, z).sum())
        self._show_changed_slice(z, t_request, was_user_slice or z in session.user_slices(),
                                 lambda _: f"Slice {z}: back to the mask before that click ({n} px), exactly as it was.")
        return True

    def _decode_on_gui_thread(self) -> bool:
        """Decode on the GUI thread (no thread hop, no contention with rendering) while that is fast.

        The first three decodes of a model run there to measure it (one warm-up outlier does not decide); after
        that the median of the last five GUI-thread decodes decides. In worker mode every
        ``SYNC_PROBE_EVERY``-th decode runs on the GUI thread again, so that a passing load spike does not keep
        the annotator in the slower mode (not for models far too slow for the GUI thread).
        """
        if len(self._sync_ms) < 3 or float(np.median(self._sync_ms)) <= SYNC_DECODER_MS:
            self._since_probe = 0
            return True
        self._since_probe += 1
        if self._since_probe >= SYNC_PROBE_EVERY and float(np.median(self._sync_ms)) <= 4 * SYNC_DECODER_MS:
            self._since_probe = 0
            return True
        return False

    def _run_pending(self) -> None:
        if self._seg_pending is not None:
            z, t = self._seg_pending
            self._seg_pending = None
            self._request(z, t)

    def _segment_args(self, z: int, prompts: SlicePrompts) -> dict:
        loaded = self.state.loaded
        session = self.session
        previous = session.current_prompts.get(z)
        prev_mask = session.plane(session.current, z)
        return dict(
            predictor=self.embeddings.predictor,
            embedding=self.embeddings.get(z),
            prompts=prompts,
            previous_prompts=previous,
            previous_logits=session.current_logits.get(z),
            previous_mask=prev_mask.copy() if prev_mask.any() else None,
            box_primary=bool(loaded.box_primary),
            model_name=display_name(loaded),
            local_corrections=self.local_combo.currentText(),
            click_guard=self.guard_combo.currentText(),
            click_guard_reach=DEFAULT_CLICK_GUARD_REACH,
        )

    def _embed_then_segment(self, z: int, t_request: float) -> None:
        if z in self._embed_handles:
            self._seg_pending = (z, t_request)
            return
        emb, gen = self.embeddings, self._generation
        self._set_status(f"Embedding slice {z}…")

        def done(_):
            self._embed_handles.pop(z, None)
            if gen == self._generation and emb is self.embeddings:
                self._update_embed_status()
                self._request(z, t_request)

        def failed(err, tb):
            self._embed_handles.pop(z, None)
            self.banner.show_error(err)

        self._embed_handles[z] = run_task(lambda h: emb.get(z), done, failed, name=f"embedding slice {z}",
                                          row=self.embed_row)

    def _apply(self, z: int, result, gen: int, t_request: float, asked: SlicePrompts | None = None) -> None:
        if gen != self._generation or self.session is None:
            return
        session = self.session
        was_propagated = session.current_prompts.get(z) is not None and session.current_prompts[z].source == "propagated"
        before = session.plane(session.current, z).copy()
        session.set_current_slice(z, result.mask, result.logits, result.prompts, result.score, asked=asked)
        self.banner.clear_message()
        if result.hint:
            self.banner.show_message(result.hint, "hint")
        change = describe_change(before, result.mask)
        self._show_changed_slice(
            z, t_request, was_propagated or z in session.user_slices(),
            lambda latency: f"Slice {z}: {change}, predicted IoU {result.score:.2f}; "
            f"{latency * 1000:.0f} ms. C commits, B takes the last click back, Shift-C clears.",
        )

    def _show_changed_slice(self, z: int, t_request: float, seeds_changed: bool, status) -> None:
        """After slice ``z``'s mask changed (a decode, or an earlier state restored): update the layer and the
        status line (``status(latency)``), mark the slice for re-propagation (started when ``seeds_changed`` and
        automatic re-propagation is on), signal it, and prepare the next click's mask prompt."""
        session = self.session
        self._update_current_layer(z)
        latency = time.perf_counter() - t_request
        self.last_latency = latency
        self._set_status(status(latency))
        if session.is_volume and self._propagated_once:
            self._changed_since_propagation.add(z)
            if self.auto_repropagate_check.isChecked() and seeds_changed:
                self._repropagate_timer.start()
        self.segmented.emit(z, latency)
        self._prepare_z = z  # the next click starts from these logits: prepare their mask prompt in idle time
        self._prepare_timer.start()

    def _prepare_next_click(self) -> None:
        """Precompute the mask prompt of the next corrective click on this slice (the logits just shown), so
        that click skips that work (about a quarter of a LiteMedSAM corrective decode; same masks). Idle
        time only: skipped while a decode runs in a worker; an optimisation, so a failure here is ignored
        (the click computes the same thing itself)."""
        z, session, emb = self._prepare_z, self.session, self.embeddings
        if z is None or session is None or emb is None or self._seg_running or not emb.has(z):
            return
        logits = session.current_logits.get(z)
        prepare = getattr(emb.predictor, "prepare_mask_prompt", None)
        if logits is None or prepare is None:
            return
        try:
            with _intra_op_threads(GUI_DECODE_THREADS):
                prepare(logits, embedding=emb.get(z))
        except Exception:  # noqa: BLE001 - see docstring
            pass

    # =============================================================================================
    # commit / clear / undo / polarity
    # =============================================================================================
    def commit(self) -> int | None:
        if self.session is None:
            return None
        self._repropagate_timer.stop()
        self._cancel_propagation()
        self._sync_committed_into_session()
        try:
            loaded = self.state.loaded
            info = {"model": getattr(loaded, "name", None)}
            result = self.session.commit(overwrite=self.overwrite_check.isChecked(), info=info)
        except UserFacingError as err:
            self.banner.show_error(err)
            return None
        self._update_committed_layer()
        self._update_current_layer()
        self._clear_prompt_layers()
        self._propagated_once = False
        self._changed_since_propagation.clear()
        kept = f"; {result.n_kept} px already belonged to other objects and were kept" if result.n_kept else ""
        self.banner.clear_message()
        self._set_status(f"Committed object {result.label_id} ({result.n_pixels} px){kept}. U undoes.")
        self._update_enabled()
        self.committed.emit(result.label_id)
        return result.label_id

    def clear(self) -> None:
        if self.session is None:
            return
        self._repropagate_timer.stop()
        self._cancel_propagation()
        self._generation += 1  # results still in flight are dropped
        self.session.clear_current()
        self._clear_prompt_layers()
        self._update_current_layer()
        self._propagated_once = False
        self._changed_since_propagation.clear()
        self.banner.clear_message()
        self._set_status("Cleared the current object and its prompts.")

    def undo(self) -> int | None:
        if self.session is None:
            return None
        self._sync_committed_into_session()
        label_id = self.session.undo()
        if label_id is None:
            self._set_status("Nothing to undo.")
        else:
            self._update_committed_layer()
            self._set_status(f"Undid the commit of object {label_id}.")
        self._update_enabled()
        return label_id

    def take_back_click(self) -> bool:
        """Remove the last point clicked on the visible slice; the mask returns to what it was before that click
        (the session keeps the earlier states, see AnnotationSession.step_back). Returns whether a point was removed."""
        if self.session is None or self.points_layer is None or not len(self.points_layer.data):
            self._set_status("No click to take back.")
            return False
        z = self.current_z()
        data = np.asarray(self.points_layer.data, dtype=float)
        on_slice = np.flatnonzero(np.round(data[:, 0]) == z) if self.session.is_volume else np.arange(len(data))
        if on_slice.size == 0:
            self._set_status(f"No click to take back on slice {z}.")
            return False
        self.points_layer.selected_data = {int(on_slice[-1])}
        self.points_layer.remove_selected()  # the layer's change event re-segments, which restores the earlier mask
        return True

    def toggle_polarity(self) -> str:
        if self.points_layer is None:
            return "positive"
        current = str(self.points_layer.feature_defaults["label"][0])
        new = "negative" if current == "positive" else "positive"
        self.points_layer.feature_defaults = {"label": new}
        self._update_polarity_button()
        return new

    @property
    def polarity(self) -> str:
        if self.points_layer is None:
            return "positive"
        return str(self.points_layer.feature_defaults["label"][0])

    def _update_polarity_button(self) -> None:
        pol = self.polarity
        color = POINT_COLORS[0] if pol == "positive" else POINT_COLORS[1]
        self.polarity_button.setText(f"{pol} [T]")
        self.polarity_button.setStyleSheet(f"color:{color}; font-weight:bold;")

    def add_point(self, x: float, y: float, positive: bool = True, z: int | None = None) -> None:
        """Programmatic click (tests, benchmarks, scripts): a point at pixel (x, y) on slice z."""
        pol = "positive" if positive else "negative"
        if self.polarity != pol:  # setting the defaults re-emits napari's feature events (a few ms)
            self.points_layer.feature_defaults = {"label": pol}
            self._update_polarity_button()
        coords = [y, x] if not self.session.is_volume else [self.current_z() if z is None else z, y, x]
        self.points_layer.add(np.asarray([coords], dtype=float))

    def add_box(self, box, z: int | None = None) -> None:
        """Programmatic box ``(x0, y0, x1, y1)`` (pixel edges, exclusive upper corner) on slice z."""
        x0, y0, x1, y1 = (float(v) - 0.5 for v in box)
        rect = np.array([[y0, x0], [y0, x1], [y1, x1], [y1, x0]])
        if self.session.is_volume:
            zz = self.current_z() if z is None else z
            rect = np.concatenate([np.full((4, 1), float(zz)), rect], axis=1)
        self.boxes_layer.add_rectangles(rect)

    # =============================================================================================
    # 3D
    # =============================================================================================
    def mark_end(self, z: int | None = None) -> None:
        if self.session is None or not self.session.is_volume:
            return
        z = self.current_z() if z is None else int(z)
        self._clear_prompt_layers(z)
        self.session.mark_end(z)
        self._update_current_layer(z)
        if self._propagated_once:
            self._changed_since_propagation.add(z)
            if self.auto_repropagate_check.isChecked():
                self._repropagate_timer.start()
        self._set_status(f"Slice {z} marked as past the end of the object; propagation stops there.")

    def _cancel_propagation(self) -> None:
        """Cancel a running propagation; its result (if it still arrives) is dropped."""
        self._propagation_token += 1
        if self._propagation_handle is not None and not self._propagation_handle.done:
            self._propagation_handle.cancel()
        self._propagation_handle = None

    def _auto_repropagate(self) -> None:
        if self._propagated_once and self._changed_since_propagation and self.auto_repropagate_check.isChecked():
            self.propagate(changed_only=True)

    def propagate(self, changed_only: bool = False):
        """Propagate the current object through the volume from its annotated slices (worker + progress)."""
        if self.session is None:
            return None
        if not self.session.is_volume:
            self.banner.show_error(UserFacingError("propagation needs a 3D volume; this image is 2D"))
            return None
        session = self.session
        if not session.has_current and not session.user_slices():
            reopened = session.reopen_last_commit()
            if reopened is None:
                self.banner.show_error(UserFacingError(
                    "nothing to propagate: segment the object on one slice first (box or points), then propagate"))
                return None
            self._update_committed_layer()
            self._update_current_layer()
            self._set_status(f"Re-opened object {reopened} for propagation; C commits it again.")
        seeds_z = session.user_slices()
        if not seeds_z:  # e.g. a re-opened object whose prompts were not recorded: its non-empty slices
            seeds_z = session.current_slices()
        seeds = {z: session.current[z].copy() for z in seeds_z}
        if not any(m.any() for m in seeds.values()):
            self.banner.show_error(UserFacingError("the annotated slices are empty: segment the object first"))
            return None
        self._cancel_propagation()
        token = self._propagation_token
        existing = session.current.copy() if (changed_only and self._propagated_once) else None
        changed = sorted(self._changed_since_propagation) if existing is not None else None
        threshold = float(self.iou_spin.value())
        mode = self.prompt_mode_combo.currentText()
        gen = self._generation

        def start():
            seg = predictor_segment_fn(self.embeddings.predictor, self.embeddings)

            def work(handle):
                return propagate_object(
                    seg, session.n_slices, seeds, iou_threshold=threshold, prompt_mode=mode,
                    existing=existing, changed_seeds=changed,
                    progress=lambda d, t: handle.report(d, t, "slices"), is_cancelled=handle.is_cancelled,
                )

            def done(result):
                if token != self._propagation_token or gen != self._generation or session is not self.session:
                    return  # superseded (new propagation, commit, clear, other image)
                self._propagation_handle = None
                self._apply_propagation(result, seeds)

            def failed(err, tb):
                if token != self._propagation_token:
                    return
                self._propagation_handle = None
                self.banner.show_error(err)

            self.banner.clear_message()
            self._propagation_handle = run_task(work, done, failed, name="propagating", row=self.propagate_row)

        self._with_model(start)
        return self._propagation_handle

    def _apply_propagation(self, result, seeds: dict) -> None:
        session = self.session
        from ..annotation.interactive import mask_box

        for z in range(session.n_slices):
            if z in seeds:
                continue
            info = result.slices.get(z)
            mask = result.masks[z]
            if info is None:  # untouched stretch (kept) or beyond a stop: keep the result's value
                if not mask.any():
                    if session.current_prompts.get(z) is not None and session.current_prompts[z].source == "propagated":
                        session.clear_current_slice(z)
                continue
            if mask.any():
                prompt = SlicePrompts(box=mask_box(mask), source="propagated")
                session.set_current_slice(z, mask, result.logits.get(z), prompt, info.score)
            else:
                session.clear_current_slice(z)
        self._propagated_once = True
        self._changed_since_propagation.clear()
        self._update_current_layer()
        self._update_embed_status()
        z0, z1 = result.z_range
        stops = "; ".join(f"{k}: {v}" for k, v in result.stopped.items())
        self._set_status(f"Propagated: object on slices {z0}-{z1} ({len(result.propagated)} propagated). {stops}. "
                         "Correct any slice (it re-propagates), C commits.")
        self.propagated.emit(result)

    # =============================================================================================
    # keys
    # =============================================================================================
    def _bind_keys(self) -> None:
        for key, action in KEYS.items():
            self.viewer.bind_key(key, self._key_handler(action), overwrite=True)

    def bind_layer_keys(self, layer) -> None:
        for key, action in KEYS.items():
            try:
                layer.bind_key(key, self._key_handler(action), overwrite=True)
            except Exception:
                pass

    def _key_handler(self, action: str):
        def handler(*_args):
            getattr(self, action)()

        handler.__name__ = f"robustmedsam_{action}"
        return handler


def _set_pixels(layer, changed: np.ndarray, source: np.ndarray, z: int | None) -> bool:
    """Write the changed pixels of one plane into a Labels layer with napari's partial update (only the
    changed region is re-coloured and re-uploaded to the GPU); False if that path is not available.

    ``Labels.data_setitem`` records an undo step; the "current object" layer is a display of the session (its
    own undo lives there), so that history is dropped again: Ctrl-Z on the layer cannot show a stale mask.
    """
    setitem = getattr(layer, "data_setitem", None)
    if setitem is None:
        return False
    indices = np.nonzero(changed)
    if z is not None and np.ndim(layer.data) == changed.ndim + 1:
        indices = (np.full(indices[0].shape, z, dtype=indices[0].dtype),) + indices
    try:
        setitem(indices, source[changed].astype(layer.data.dtype, copy=False))
    except Exception:  # noqa: BLE001 - napari internals differ: the caller falls back to a full refresh
        return False
    reset = getattr(layer, "_reset_history", None)
    if reset is not None:
        reset()
    return True


@contextlib.contextmanager
def _intra_op_threads(n: int | None):
    """torch's intra-op threads set to ``n`` for the block (GUI thread only).

    Left alone while a background task runs: the setting is process-wide for threads that start using torch
    in the meantime, and a worker must not pick up the GUI thread's single thread.
    """
    if n is None or any_task_running():
        yield
        return
    import torch

    previous = torch.get_num_threads()
    if previous == n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _warm_decoder(emb: SliceEmbeddings, z: int) -> None:
    """One throw-away decode on slice ``z`` right after its embedding (in the embedding's worker).

    The first decode after an embedding measured slower than the next ones (697 ms vs 300-530 ms in one run
    under load 3.8), and the predictor's fast decoder path computes its per-image cache on it: doing it here
    keeps that off the user's first click. Best effort: errors are ignored (the click reports them).
    """
    try:
        embedding = emb.get(z)
        h, w = tuple(getattr(embedding, "frame", embedding).original_size)
        segment_slice(emb.predictor, embedding, SlicePrompts(box=np.array([0.0, 0.0, float(w), float(h)])))
    except Exception:  # noqa: BLE001
        pass


def _still_drawing(shapes_layer) -> bool:
    """True while a shape is being dragged out (napari adds a tiny rectangle on mouse press)."""
    try:
        return bool(unwrap(shapes_layer)._is_creating)  # not public API: fall back to "not drawing"
    except AttributeError:
        return False


def _connect_once(emitter, callback) -> None:
    try:
        emitter.disconnect(callback)
    except Exception:
        pass
    emitter.connect(callback)


def _use_committed_colors(layer) -> None:
    """Committed objects in distinct, bright colours that cycle (see annotation.feedback.COMMITTED_COLORS)."""
    from napari.utils.colormaps import CyclicLabelColormap

    layer.colormap = CyclicLabelColormap(colors=[(0.0, 0.0, 0.0, 0.0)] + [rgba(c) for c in COMMITTED_COLORS])


def _set_label_color(layer, value: int, color: str) -> None:
    try:
        from napari.utils.colormaps import DirectLabelColormap

        layer.colormap = DirectLabelColormap(color_dict={value: color, None: "transparent", 0: "transparent"})
    except Exception:
        pass
