"""The annotator: prompt-guided iterative segmentation of the active image layer, in 2D and 3D.

Layers it manages (created next to the image, with its scale and translation):

- ``point prompts`` (Points): positive (green) / negative (red) clicks; **T** toggles the polarity of the
  next point.
- ``stroke prompts`` (Shapes, path tool): a drag draws a stroke, which becomes clicks along it with the same
  polarity (:mod:`.stroke_layer`); negative strokes are red.
- ``box prompts`` (Shapes): rectangles; the box is the primary prompt of box-trained models.
- ``current object`` (Labels): the object being segmented, updated on every prompt change (live) or on **S**.
- ``committed objects`` (Labels): **C** commits the current object with a new id (other ids are never
  overwritten unless "overwrite" is ticked); **U** undoes the last commit; **Shift-C** clears the current
  object and its prompts.

3D volumes: annotate any slice; **Shift-S** / "Propagate" segments the object through the volume from the
annotated slices; correcting a slice afterwards re-propagates the stretches next to it.
The decisions live in :class:`napari_robustmedsam.annotation.controller.AnnotationController` (no Qt): this
widget is its view. It builds the controls (:mod:`.annotator_controls`) and the layers (:mod:`.annotation_layers`),
turns napari events into controller calls and shows what the controller reports (docs/architecture.md).
"""

from __future__ import annotations

import contextlib
import time

import numpy as np
from psygnal import Signal as PSignal
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QWidget

from ..annotation.controller import AnnotationController, AnnotatorSettings
from ..annotation.feedback import describe_commit, describe_undo
from ..annotation.model_info import display_name
from ..annotation.prompt_decoding import zoom_default
from ..annotation.session import SlicePrompts
from ..annotation.slice_embeddings import SliceEmbeddings
from ..engine.windows import layer_window, model_view
from ..errors import UserFacingError
from ._common import any_task_running, run_task, spatial_shape, unwrap
from ._state import get_state
from .annotation_layers import (
    POINT_COLORS,
    activate_prompt_layer,
    annotatable_kind,
    remove_last_point,
    set_polarity,
    box_rectangle,
    connect_once,
    make_layers,
    prompts_from_layers,
    remove_prompts,
    show_mask,
    show_slice,
    still_drawing,
    visible_slice,
)
from .annotator_controls import bind_keys, build_controls, embed_status_text, key_handler, model_hint
from .brush_strokes import BrushStrokes
from .image_layer_choice import ImageLayerChoice, is_image
from .stroke_layer import AnnotatorStrokes, make_strokes_layer, point_strokes, remove_strokes, set_stroke_polarity

# Intra-op threads for a decode on the GUI thread (None: torch's setting). A decode is a few hundred small ops; on
# a machine whose cores are busy with other work, waiting for a second OpenMP thread at every op can cost more
# than it saves, and 1 is then the better choice. On a user's own machine torch's setting is faster
# (docs/annotator.md, "UI latency", has the measurements), so it is the default.
GUI_DECODE_THREADS: int | None = None
THUMBNAIL_DELAY_MS = 250  # the layer-list thumbnail of "current object" follows after a pause in clicking


class WidgetView:
    """The :class:`~napari_robustmedsam.annotation.controller.AnnotatorView` of an :class:`AnnotatorWidget`: what
    the controller reads (prompts, the user's choices, the model) and reports (masks, messages, signals)."""

    def __init__(self, widget: "AnnotatorWidget") -> None:
        self.w = widget

    def slice_prompts(self, z: int) -> SlicePrompts:
        return self.w.slice_prompts(z)

    def current_z(self) -> int:
        return self.w.current_z()

    def point_strokes(self, z: int) -> np.ndarray:
        return point_strokes(self.w.points_layer, z, self.w.session is not None and self.w.session.is_volume)

    def settings(self) -> AnnotatorSettings:
        return AnnotatorSettings(
            local_corrections=self.w.local_combo.currentText(), click_guard=self.w.guard_combo.currentText(),
            click_refinement=self.w.refine_combo.currentText(), zoom_small_objects=self.w.zoom_check.isChecked(),
            overwrite=self.w.overwrite_check.isChecked(), auto_repropagate=self.w.auto_repropagate_check.isChecked(),
            iou_threshold=float(self.w.iou_spin.value()), prompt_mode=self.w.prompt_mode_combo.currentText(),
            min_score=float(self.w.score_spin.value()))

    def live(self) -> bool:
        return self.w.live_check.isChecked()

    def loaded_model(self):
        return self.w.state.loaded

    def with_model(self, then) -> bool:
        return self.w._with_model(then)

    def show_error(self, err: BaseException) -> None:
        self.w.banner.show_error(err)

    def show_hint(self, text: str) -> None:
        self.w.banner.show_message(text, "hint")

    def clear_message(self) -> None:
        self.w.banner.clear_message()

    def set_status(self, text: str) -> None:
        self.w._set_status(text)

    def mask_changed(self, z: int | None = None) -> None:
        self.w._update_current_layer(z)

    def labels_changed(self) -> None:
        self.w._update_committed_layer()

    def embeddings_changed(self) -> None:
        self.w._update_embed_status()

    def clear_prompts(self, z: int | None = None) -> None:
        self.w._clear_prompt_layers(z)

    def slice_done(self, z: int, seconds: float) -> None:
        self.w.segmented.emit(z, seconds)

    def propagation_done(self, result) -> None:
        self.w.propagated.emit(result)


class AnnotatorWidget(QWidget):
    """Prompt-guided segmentation of one image layer (2D, RGB or 3D volume)."""

    segmented = PSignal(int, float)  # slice, seconds from request to updated layer
    committed = PSignal(int)
    undone = PSignal(object)  # after an undo: the id whose commit was undone, or None (nothing to undo)
    image_opened = PSignal(object)  # the image layer now annotated
    propagated = PSignal(object)

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.state = get_state(napari_viewer)
        self.setObjectName("robustmedsam-annotator")
        self.image_layer = None
        self.kind: str | None = None
        self.points_layer = None
        self.boxes_layer = None
        self.strokes_layer = None
        self.strokes, self.brush = AnnotatorStrokes(self), BrushStrokes(self)
        self.current_layer = None
        self.committed_layer = None
        self._suppress = 0
        self.controller = AnnotationController(WidgetView(self), self._run_task, self._make_timer,
                                               decode_context=lambda: _intra_op_threads(GUI_DECODE_THREADS))
        self.image_choice = ImageLayerChoice(self)
        build_controls(self)
        self._update_polarity_button()
        self._update_enabled()
        self._thumbnail_timer = self._make_timer(THUMBNAIL_DELAY_MS, self._update_current_thumbnail)

        self.state.set_annotator(self)
        self.state.model_changed.connect(self._on_model_changed)
        napari_viewer.layers.events.inserted.connect(self.image_choice.refresh)
        napari_viewer.layers.events.removed.connect(self.image_choice.on_layer_removed)
        napari_viewer.dims.events.current_step.connect(self._on_slice_changed)
        self._bind_keys()
        self.image_choice.refresh()
        active = unwrap(napari_viewer.layers.selection.active)
        if is_image(active):
            self.set_image_layer(active)
        elif self.image_combo.count():
            self.set_image_layer(unwrap(self.image_choice.image_layers()[0]))
        if self.state.loaded is not None:
            self._on_model_changed(self.state.loaded)

    # ---- UI
    def _update_enabled(self) -> None:
        has_image = self.session is not None
        for w in (self.embed_button, self.segment_button, self.commit_button, self.clear_button, self.undo_button,
                  self.take_back_button):
            w.setEnabled(has_image)
        self.undo_button.setEnabled(bool(self.session and self.session.can_undo))
        self.volume_box.setVisible(bool(self.session and self.session.is_volume))

    def _set_status(self, text: str) -> None:
        self.status.setText(text)

    # ---- image layer
    def set_image_layer(self, layer, force: bool = False) -> bool:
        """Annotate ``layer``; an unsupported layer shows an error here and changes nothing.

        Choosing the layer already being annotated keeps the session unless ``force``.
        """
        self.banner.clear_message()
        layer = unwrap(layer)
        if layer is self.image_layer and self.session is not None and not force:
            return True
        try:
            kind = annotatable_kind(layer, is_image(layer))
        except UserFacingError as err:
            self.banner.show_error(err)
            return False
        self.image_layer = layer
        self.kind = kind
        spatial = spatial_shape(layer)
        self.controller.open_image(spatial)
        self._ensure_layers()
        self._sync_committed_into_session()
        self.window_control.show_layer(layer)
        self.label_control.refresh()
        self._make_embeddings()
        if self.session.is_volume and self.prefetch_check.isChecked() and self.state.loaded is None:
            self._with_model(lambda: None)  # the model loads now; its embeddings then start the prefetch
        self.image_combo.blockSignals(True)
        self.image_combo.setCurrentText(layer.name)
        self.image_combo.blockSignals(False)
        connect_once(layer.events.data, self._on_image_data_changed)
        self._update_enabled()
        self._update_hint()
        self._set_status(f"Annotating '{layer.name}' ({kind}, {' x '.join(map(str, spatial))}).")
        self.image_opened.emit(layer)
        return True

    def _on_image_data_changed(self, event=None) -> None:
        if event is not None and unwrap(getattr(event, "source", None)) is not self.image_layer:
            return
        layer = self.image_layer
        if layer is not None:
            self.set_image_layer(layer, force=True)

    # ---- managed layers
    def _ensure_layers(self) -> None:
        self._suppress += 1
        try:
            layers = make_layers(self.viewer, self.image_layer, self.session.shape)
            self.points_layer, self.boxes_layer = layers.points, layers.boxes
            self.current_layer, self.committed_layer = layers.current, layers.committed
            self.strokes_layer = make_strokes_layer(self.viewer, self.image_layer, self.session.shape,
                                                    self.points_layer)
            connect_once(self.points_layer.events.data, self._on_prompt_event)
            connect_once(self.boxes_layer.events.data, self._on_boxes_changed)
            connect_once(self.strokes_layer.events.data, self.strokes.on_changed)
            connect_once(self.current_layer.events.paint, self.brush.on_paint)
            for managed in (self.points_layer, self.boxes_layer, self.strokes_layer, self.current_layer,
                            self.committed_layer, self.image_layer):
                self.bind_layer_keys(managed)
            self.image_choice.show_only_this_images_layers()
        finally:
            self._suppress -= 1
        self.select_prompt_layer()

    def select_prompt_layer(self) -> None:
        """Box-trained models: select the box layer in rectangle mode; otherwise the points layer in add mode."""
        loaded = self.state.loaded
        activate_prompt_layer(self.viewer, self.points_layer, self.boxes_layer, loaded is None or bool(loaded.box_primary))

    def _sync_committed_into_session(self) -> None:
        if self.session is not None and self.committed_layer is not None:
            data = np.asarray(self.committed_layer.data)
            if data.shape == self.session.shape:
                self.session.sync_labels(data)

    def _update_current_layer(self, z: int | None = None) -> None:
        if self.current_layer is None or self.session is None:
            return
        with self.brush.ignoring():  # napari reports these writes as paint events too: not a brush stroke
            if show_mask(self.current_layer, self.session.current, z, self.session.is_volume):
                self._thumbnail_timer.start()  # the layer-list thumbnail follows once the clicks pause

    def _update_current_thumbnail(self) -> None:
        layer = self.current_layer
        if layer is not None and layer in self.viewer.layers:
            layer.refresh(data_displayed=False, highlight=False, extent=False)

    def _update_committed_layer(self) -> None:
        if self.committed_layer is not None and self.session is not None:
            self.committed_layer.data = self.session.labels.copy()

    # ---- model and embeddings
    def _on_model_changed(self, loaded) -> None:
        self._make_embeddings()
        self.controller.model_changed()
        self._update_hint()
        self.select_prompt_layer()
        said = []
        if self.session is not None and self.session.has_current:
            said.append(f"Model changed to {display_name(loaded)}: press S to segment again with it.")
        zoom = zoom_default(getattr(loaded, "name", None))
        if loaded is not None and self.zoom_check.isChecked() != zoom:  # each model's own measured default
            self.zoom_check.setChecked(zoom)
            said.append(f"Zoom on small objects is now {'on' if zoom else 'off'}, {display_name(loaded)}'s default "
                        f"(it measured {'better' if zoom else 'worse'} {'with' if zoom else 'with it on'}).")
        if said:
            self._set_status(" ".join(said))

    def _update_hint(self) -> None:
        self.hint.show_message(*model_hint(self.state.loaded))

    def _make_embeddings(self) -> None:
        if self.image_layer is None or self.state.predictor is None:
            self.controller.set_embeddings(None)
        else:
            window = layer_window(self.image_layer.metadata)  # CT: the model sees the window, the layer keeps HU
            self.controller.set_embeddings(SliceEmbeddings(self.state.predictor,
                                                           model_view(self.image_layer.data, window), self.kind,
                                                           engine=self.state.engine))
            if self.prefetch_check.isChecked():
                self.controller.start_prefetch()
        self._update_embed_status()

    def _update_embed_status(self) -> None:
        self.embed_status.setText(embed_status_text(self.embeddings, getattr(self.state, "engine_notice", None)))

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
        self._with_model(self.controller.compute_embeddings)

    # ---- slices and prompts
    def current_z(self) -> int:
        if self.session is None or not self.session.is_volume:
            return 0
        return visible_slice(self.viewer, self.image_layer, self.session.n_slices)

    def set_slice(self, z: int) -> None:
        """Show slice ``z`` of the volume (moves the dims slider)."""
        if self.session is not None and self.session.is_volume:
            show_slice(self.viewer, self.image_layer, z)

    def slice_prompts(self, z: int) -> SlicePrompts:
        """The user's prompts on slice ``z`` from the prompt layers, as (x, y) pixel coordinates."""
        volume = self.session is not None and self.session.is_volume
        return prompts_from_layers(self.points_layer, self.boxes_layer, z, volume)

    def _clear_prompt_layers(self, z: int | None = None) -> None:
        """Remove prompts (of slice ``z`` only, or all) without triggering segmentation."""
        self._suppress += 1
        try:
            volume = self.session is not None and self.session.is_volume
            remove_prompts(self.points_layer, self.boxes_layer, z, volume)
            remove_strokes(self.strokes_layer, z, volume)
        finally:
            self._suppress -= 1

    def _on_boxes_changed(self, event=None) -> None:
        if self.boxes_layer is not None and still_drawing(self.boxes_layer):
            return  # the rectangle is still being dragged: segment on release
        self._on_prompt_event(event)

    def _on_prompt_event(self, event=None) -> None:
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
            self.controller.set_focus(z)
            state = "user prompts" if z in self.session.user_slices() else (
                "propagated" if z in self.session.current_prompts else "no object")
            self._set_status(f"Slice {z}: {state}.")

    # ---- the controller's view (annotation.controller.AnnotatorView) and its state
    session = property(lambda self: self.controller.session)
    embeddings = property(lambda self: self.controller.embeddings)
    decode_modes = property(lambda self: self.controller.scheduler.modes)  # how the decodes ran (benchmarks)
    _decoder_ms = property(lambda self: self.controller.scheduler.decoder_ms)
    _repropagate_timer = property(lambda self: self.controller.propagation.repropagate_timer)
    last_latency = property(lambda self: self.controller.last_latency)

    def _run_task(self, work, done, failed, name: str, kind: str):
        row = {"embed": self.embed_row, "prefetch": self.embed_row, "propagate": self.propagate_row}.get(kind)
        return run_task(work, done, failed, name=name, row=row, background=kind == "prefetch")

    def _make_timer(self, interval_ms: int, callback) -> QTimer:
        timer = QTimer(self)
        timer.setSingleShot(True)
        timer.setInterval(interval_ms)
        timer.timeout.connect(callback)
        return timer

    # ---- segmentation
    def segment(self, z: int | None = None, t_request: float | None = None) -> None:
        """Segment the current object on slice ``z`` (default: the visible one) from its prompts."""
        self.controller.segment(z, t_request)

    def _segment_args(self, z: int, prompts: SlicePrompts) -> dict:
        return self.controller.segment_args(z, prompts)

    # ---- commit / clear / undo / polarity
    def commit(self) -> int | None:
        if self.session is None:
            return None
        self._sync_committed_into_session()
        try:
            label_id, info = self.label_control.choice(self.session)
        except UserFacingError as err:
            self.banner.show_error(err)
            return None
        info["model"] = getattr(self.state.loaded, "name", None)
        result = self.controller.commit(info=info, label_id=label_id)
        if result is None:
            return None
        self.banner.clear_message()
        self._set_status(describe_commit(result))
        self._update_enabled()
        self.committed.emit(result.label_id)
        return result.label_id

    def clear(self) -> None:
        if self.session is None:
            return
        self.controller.clear()
        self.banner.clear_message()
        self._set_status("Cleared the current object and its prompts.")

    def undo(self) -> int | None:
        if self.session is None:
            return None
        self._sync_committed_into_session()
        kind = self.session.next_undo_kind
        label_id = self.controller.undo()
        self._set_status(describe_undo(kind, label_id))
        self._update_enabled()
        self.undone.emit(label_id)
        return label_id

    def take_back_click(self) -> bool:
        """Remove the last point clicked on the visible slice; the mask returns to what it was before that click
        (the session keeps the earlier states, see AnnotationSession.step_back). Returns whether a point was removed."""
        if self.session is None or self.points_layer is None or not len(self.points_layer.data):
            self._set_status("No click to take back.")
            return False
        z = self.current_z()
        if self.strokes.take_back(z):  # the last click is part of a stroke: the whole stroke goes
            return True
        # the layer's change event re-segments, which restores the earlier mask
        if not remove_last_point(self.points_layer, z, self.session.is_volume):
            self._set_status(f"No click to take back on slice {z}.")
            return False
        return True

    def toggle_polarity(self) -> str:
        if self.points_layer is None:
            return "positive"
        new = self._set_polarity("negative" if self.polarity == "positive" else "positive")
        self._update_polarity_button()
        return new

    def _set_polarity(self, polarity: str) -> str:
        """The polarity of the next point and the next stroke."""
        if self.strokes_layer is not None:
            set_stroke_polarity(self.strokes_layer, polarity)
        return set_polarity(self.points_layer, polarity)

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
            self._set_polarity(pol)
            self._update_polarity_button()
        coords = [y, x] if not self.session.is_volume else [self.current_z() if z is None else z, y, x]
        self.points_layer.add(np.asarray([coords], dtype=float))

    def add_stroke(self, path, positive: bool = True, z: int | None = None) -> None:
        """Programmatic stroke (tests, screenshots, scripts): a path through the pixels ``path`` ((N, 2) x, y) on
        slice z, as if drawn with the path tool on the strokes layer."""
        self.strokes.add(path, positive, z)

    def add_box(self, box, z: int | None = None) -> None:
        """Programmatic box ``(x0, y0, x1, y1)`` (pixel edges, exclusive upper corner) on slice z."""
        volume_z = (self.current_z() if z is None else z) if self.session.is_volume else None
        self.boxes_layer.add_rectangles(box_rectangle(box, volume_z))

    # ---- 3D
    def mark_end(self, z: int | None = None) -> None:
        if self.session is None or not self.session.is_volume:
            return
        z = self.current_z() if z is None else int(z)
        self.controller.propagation.mark_end(z)
        self._set_status(f"Slice {z} marked as past the end of the object; propagation stops there.")

    def propagate(self, changed_only: bool = False):
        """Propagate the current object through the volume from its annotated slices (worker + progress)."""
        return self.controller.propagation.propagate(changed_only)

    # ---- keys
    def _bind_keys(self) -> None:
        bind_keys(self.viewer, self._key_handler)

    def bind_layer_keys(self, layer) -> None:
        bind_keys(layer, self._key_handler, quiet=True)

    def _key_handler(self, action: str):
        return key_handler(self, action)


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
