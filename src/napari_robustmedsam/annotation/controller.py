"""The annotator's decisions, without Qt: when and where a prompt change is decoded, which result is still wanted
and how a click is taken back; the 3D propagation decisions are its collaborator's
(:class:`.volume_propagation.VolumePropagation`, ``controller.propagation``).

:class:`AnnotationController` holds the session (:class:`.session.AnnotationSession`) and the image's
:class:`.slice_embeddings.SliceEmbeddings`, and talks to the screen only through an :class:`AnnotatorView` (the
napari widget :class:`napari_robustmedsam.widgets.annotator.AnnotatorWidget`, or a test double). Workers and timers
are injected: ``run_task(work, done, failed, name, kind)`` runs ``work(handle)`` off the GUI thread and calls
``done(value)`` / ``failed(err, tb)`` back on it; ``make_timer(interval_ms, callback)`` returns a single-shot timer
with ``start()``, ``stop()`` and ``isActive()``. Tests drive it with a synchronous runner and manual timers
(tests/test_annotation_controller.py).

How a click becomes a mask: the view calls :meth:`AnnotationController.segment`; the controller reads the slice's
prompts from the view, shows a kept earlier state if the click was taken back (:meth:`~.session.AnnotationSession.
step_back`), embeds the slice if needed, then decodes (:func:`.prompt_decoding.segment_slice`) on the GUI thread
while that is fast (:class:`DecodeScheduler`) or in a worker, one decode at a time (a newer request waits as the
pending one); a result whose generation is stale (the object was cleared or committed, the image changed) is
dropped. The mask goes into the session and the view is told which slice changed.
"""

from __future__ import annotations

import contextlib
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Protocol

import numpy as np

from ..errors import UserFacingError
from .feedback import describe_change
from .model_info import display_name
from .prefetch import SlicePrefetcher, prefetch_order
from ..engine.focus_crop import DEFAULT_FOCUS_CROP
from .click_policy import annotator_click_policy
from .prompt_decoding import (
    DEFAULT_CLICK_REFINEMENT,
    DEFAULT_ZOOM_SMALL_OBJECTS,
    focus_plan,
    segment_slice,
)
from .propagation import DEFAULT_IOU_THRESHOLD, DEFAULT_MIN_SCORE, DEFAULT_PROMPT_MODE
from .session import AnnotationSession, SlicePrompts
from .slice_embeddings import Cancelled, SliceEmbeddings
from .volume_propagation import VolumePropagation

# The decoder runs on the GUI thread while its median time there stays at or below this; slower models (or a
# loaded machine) use a worker. A decode in a worker competes with the rendering of the click for the CPU cores
# and is several times slower on a small machine, so the GUI thread is the fast path whenever the freeze it
# causes stays short (docs/annotator.md, "UI latency", has the measurements).
SYNC_DECODER_MS = 250.0
SYNC_PROBE_EVERY = 8  # in worker mode, every 8th decode runs on the GUI thread again to re-measure it


@dataclass(frozen=True)
class AnnotatorSettings:
    """The user's choices that the controller's decisions depend on (read from the view at each decision)."""

    local_corrections: str
    click_guard: str
    overwrite: bool = False
    auto_repropagate: bool = True
    iou_threshold: float = DEFAULT_IOU_THRESHOLD
    prompt_mode: str = DEFAULT_PROMPT_MODE
    min_score: float = DEFAULT_MIN_SCORE
    click_refinement: str = DEFAULT_CLICK_REFINEMENT
    # decode a small object's box in an enlarged crop of its surroundings (engine/focus_crop.py)
    zoom_small_objects: bool = DEFAULT_ZOOM_SMALL_OBJECTS


class AnnotatorView(Protocol):
    """What the controller needs from the screen."""

    def slice_prompts(self, z: int) -> SlicePrompts: ...
    def current_z(self) -> int: ...
    def settings(self) -> AnnotatorSettings: ...
    def loaded_model(self) -> Any: ...
    def with_model(self, then: Callable[[], None]) -> bool: ...
    def show_error(self, err: BaseException) -> None: ...
    def show_hint(self, text: str) -> None: ...
    def clear_message(self) -> None: ...
    def set_status(self, text: str) -> None: ...
    def mask_changed(self, z: int | None = None) -> None: ...
    def labels_changed(self) -> None: ...
    def embeddings_changed(self) -> None: ...
    def clear_prompts(self, z: int | None = None) -> None: ...
    def live(self) -> bool: ...
    def slice_done(self, z: int, seconds: float) -> None: ...
    def propagation_done(self, result) -> None: ...
    # optional: ``point_strokes(z)``, the stroke id of each of slice z's points (-1: a click), for the status line


class DecodeScheduler:
    """Decode on the GUI thread (no thread hop, no contention with rendering) while that is fast.

    The first three decodes of a model run there to measure it (one warm-up outlier does not decide); after that
    the median of the last five GUI-thread decodes decides. In worker mode every ``probe_every``-th decode runs
    on the GUI thread again, so that a passing load spike does not keep the annotator in the slower mode (not for
    models far too slow for the GUI thread: over four times the limit).
    """

    def __init__(self, limit_ms: float = SYNC_DECODER_MS, probe_every: int = SYNC_PROBE_EVERY) -> None:
        self.limit_ms, self.probe_every = float(limit_ms), int(probe_every)
        self.decoder_ms: list[float] = []  # every decode (GUI thread or worker), ms
        self.sync_ms: list[float] = []  # the last GUI-thread decodes, ms: what the choice uses
        self.since_probe = 0
        self.modes = {"sync": 0, "worker": 0}  # how the decodes ran (benchmarks, status)

    def reset(self) -> None:
        """A new model: measure again."""
        self.decoder_ms.clear()
        self.sync_ms.clear()
        self.since_probe = 0

    def on_gui_thread(self) -> bool:
        if len(self.sync_ms) < 3 or float(np.median(self.sync_ms)) <= self.limit_ms:
            self.since_probe = 0
            return True
        self.since_probe += 1
        if self.since_probe >= self.probe_every and float(np.median(self.sync_ms)) <= 4 * self.limit_ms:
            self.since_probe = 0
            return True
        return False

    def record(self, ms: float, on_gui_thread: bool) -> None:
        self.decoder_ms.append(ms)
        if on_gui_thread:
            self.sync_ms.append(ms)
            del self.sync_ms[:-5]


def warm_decoder(emb: SliceEmbeddings, z: int) -> None:
    """One throw-away decode on slice ``z`` right after its embedding (in the embedding's worker).

    The first decode after an embedding is slower than the next ones, and the predictor's fast decoder path
    computes its per-image cache on it: doing it here keeps that off the user's first click. Best effort: errors
    are ignored (the click reports them).
    """
    try:
        embedding = emb.get(z)
        h, w = tuple(getattr(embedding, "frame", embedding).original_size)
        segment_slice(emb.predictor, embedding, SlicePrompts(box=np.array([0.0, 0.0, float(w), float(h)])))
    except Exception:  # noqa: BLE001
        pass


class AnnotationController:
    """Scheduling and take-back decisions of the annotator (see the module docstring)."""

    def __init__(self, view: AnnotatorView, run_task: Callable[..., Any], make_timer: Callable[..., Any], *,
                 decode_context: Callable[[], ContextManager] = contextlib.nullcontext,
                 scheduler: DecodeScheduler | None = None) -> None:
        self.view = view
        self.run_task = run_task
        self.decode_context = decode_context  # around a GUI-thread decode (the widget pins torch's threads there)
        self.scheduler = scheduler or DecodeScheduler()
        self.session: AnnotationSession | None = None
        self.embeddings: SliceEmbeddings | None = None
        self.generation = 0  # results of requests made before a clear / commit / image change are dropped
        self.running = False  # a decode runs in a worker
        self.pending: tuple[int, float] | None = None  # the newest request that waits for it
        self.embed_handles: dict[int, Any] = {}
        self.crop_handles: dict[tuple, Any] = {}  # (z, focus crop) being embedded in a worker
        # id(logits) -> (a weak reference to them, the focus crop they were decoded in): which frame a slice's
        # previous logits are in when they are fed back (the session keeps the logits, not their frame)
        self.logit_crops: dict[int, tuple[Any, Any]] = {}
        self.prefetch_handle = None  # the background embedding of a volume's slices (start_prefetch)
        self.focus_z = 0  # the slice the user looks at: the prefetch embeds nearest to it first
        self.prefetcher: SlicePrefetcher | None = None  # the last one started (its order: tests, status)
        self.propagation = VolumePropagation(self, make_timer)  # 3D: propagation and re-propagation
        self.last_latency: float | None = None
        self.prepare_z: int | None = None
        # after a mask is shown: the next corrective click's mask-prompt work, in the pause before that click
        self.prepare_timer = make_timer(0, self.prepare_next_click)

    # ------------------------------------------------------------------ image, model
    def open_image(self, shape: tuple[int, ...]) -> AnnotationSession:
        self.cancel_prefetch()
        self.generation += 1
        self.session = AnnotationSession(shape)
        self.propagation.forget()
        return self.session

    def close_image(self) -> None:
        self.cancel_prefetch()
        self.generation += 1
        self.session = None
        self.embeddings = None

    def set_embeddings(self, embeddings: SliceEmbeddings | None) -> None:
        self.cancel_prefetch()
        self.embed_handles.clear()
        self.crop_handles.clear()
        self.embeddings = embeddings

    def model_changed(self) -> None:
        self.scheduler.reset()

    def compute_embeddings(self) -> None:
        """Encode every slice (progress + cancel); slices already embedded are skipped."""
        self.cancel_prefetch()  # this task embeds the same slices, with its own progress and status
        emb, gen = self.embeddings, self.generation
        todo = prefetch_order(emb.n_slices, self.view.current_z(), (z for z in range(emb.n_slices) if emb.has(z)))
        if not todo:
            self.view.embeddings_changed()
            self.view.set_status("Embeddings are already computed.")
            return
        t0 = time.perf_counter()
        z_visible = self.view.current_z()

        def work(handle):
            n = emb.compute(todo, progress=lambda d, t: handle.report(d, t, "slices"), is_cancelled=handle.is_cancelled)
            warm_decoder(emb, z_visible)
            return n

        def done(n):
            if gen == self.generation:
                self.view.embeddings_changed()
                self.view.set_status(f"Embedded {n} slice(s) in {time.perf_counter() - t0:.1f} s.")
                z = self.view.current_z()
                if self.view.live() and self.session is not None and self.prompts_unanswered(z):
                    self.segment(z)

        def failed(err, tb):
            self.view.embeddings_changed()
            self.view.show_error(err)

        self.run_task(work, done, failed, "embedding", "embed")

    def prompts_unanswered(self, z: int) -> bool:
        """Slice ``z`` has prompts that its shown mask was not decoded from (e.g. drawn while its embedding was
        missing). A slice already decoded from them is left alone: decoding it again gives the same mask, and its
        status would read as if a prompt had changed nothing."""
        prompts = self.view.slice_prompts(z)
        return not prompts.is_empty and not prompts.same_prompts(self.session.asked_prompts(z))

    def set_focus(self, z: int) -> None:
        """The user's slice changed: the background embedding continues nearest to it."""
        self.focus_z = int(z)

    def start_prefetch(self) -> None:
        """Embed every slice of a volume in a worker, the user's slice first, then its neighbours nearest-first
        (:mod:`.prefetch`), so that the first click waits for one slice, not the volume. Progress is the slices
        ready; a click on a slice not embedded yet still embeds it at once (a slice being embedded is waited for)."""
        emb, session = self.embeddings, self.session
        if emb is None or session is None or not session.is_volume or emb.complete:
            return
        if self.prefetch_handle is not None and not self.prefetch_handle.done:
            return
        self.focus_z = self.view.current_z()
        prefetcher = self.prefetcher = SlicePrefetcher(emb, lambda: self.focus_z)

        def work(handle):
            return prefetcher.run(progress=lambda d, t: handle.report(d, t, "slices embedded"),
                                  is_cancelled=handle.is_cancelled)

        def done(_):
            self.prefetch_handle = None
            if emb is self.embeddings:
                self.view.embeddings_changed()

        def failed(err, tb):
            self.prefetch_handle = None
            if not isinstance(err, Cancelled):
                self.view.show_error(err)

        self.prefetch_handle = self.run_task(work, done, failed, "embedding slices", "prefetch")

    def cancel_prefetch(self) -> None:
        if self.prefetch_handle is not None and not self.prefetch_handle.done:
            self.prefetch_handle.cancel()
        self.prefetch_handle = None

    # ------------------------------------------------------------------ segmentation
    def segment(self, z: int | None = None, t_request: float | None = None) -> None:
        """Segment the current object on slice ``z`` (default: the visible one) from its prompts."""
        if self.session is None:
            self.view.show_error(UserFacingError("open or choose an image layer first"))
            return
        z = self.view.current_z() if z is None else int(z)
        self.focus_z = z
        t_request = time.perf_counter() if t_request is None else t_request
        if self.view.loaded_model() is None and self.view.slice_prompts(z).is_empty:
            self.view.set_status(f"No prompts on slice {z}: draw a box or click a point first.")
            return
        self.view.with_model(lambda: self.request(z, t_request))

    def request(self, z: int, t_request: float) -> None:
        """Decode slice ``z``'s prompts now, or as the pending request after the running decode."""
        prompts = self.view.slice_prompts(z)
        if self.restore_earlier_state(z, prompts, t_request):
            return
        if prompts.is_empty:
            if self.running:  # the running decode's mask would land after the clear: clear after it
                self.pending = (z, t_request)
                return
            had = self.session.plane(self.session.current, z).any()
            self.session.clear_current_slice(z)
            if had:
                self.view.mask_changed(z)
            self.view.slice_done(z, time.perf_counter() - t_request)
            return
        if not self.embeddings.has(z):
            self.embed_then_segment(z, t_request)
            return
        plan = self.zoom_plan(z, prompts)
        if plan is not None and not self.embeddings.has_crop(z, plan):
            self.embed_crop_then_segment(z, plan, t_request)
            return
        if self.running:
            self.pending = (z, t_request)
            return
        args = self.segment_args(z, prompts)
        gen = self.generation
        if self.scheduler.on_gui_thread():
            try:
                t0 = time.perf_counter()
                with self.decode_context():
                    result = segment_slice(**args)
                self.scheduler.record((time.perf_counter() - t0) * 1000, on_gui_thread=True)
                self.scheduler.modes["sync"] += 1
            except Exception as err:  # noqa: BLE001 - shown in the view
                self.view.show_error(err)
                return
            self.apply(z, result, gen, t_request, prompts)
            return
        self.running = True
        self.scheduler.modes["worker"] += 1

        def work(handle):
            t0 = time.perf_counter()
            res = segment_slice(**args)
            return res, (time.perf_counter() - t0) * 1000

        def done(value):
            self.running = False
            result, ms = value
            self.scheduler.record(ms, on_gui_thread=False)
            self.apply(z, result, gen, t_request, prompts)
            self.run_pending()

        def failed(err, tb):
            self.running = False
            self.view.show_error(err)
            self.run_pending()

        self.run_task(work, done, failed, "segmenting", "decode")

    def run_pending(self) -> None:
        if self.pending is not None:
            z, t = self.pending
            self.pending = None
            self.request(z, t)

    def restore_earlier_state(self, z: int, prompts: SlicePrompts, t_request: float) -> bool:
        """A click taken back: the slice's earlier state for these prompts, if the session kept one, is shown
        again as it was (no decode). Not while a decode runs: its result would land on top (it is retried after)."""
        if self.running:
            return False
        session = self.session
        was_user_slice = z in session.user_slices()
        before = session.asked_prompts(z)
        if not session.step_back(z, prompts):
            return False
        n = int(session.plane(session.current, z).sum())
        removed = (before.points.shape[0] if before is not None else 0) - prompts.points.shape[0]
        # a stroke is taken back whole: all its points go at once
        what = "that click" if removed <= 1 else f"that stroke ({removed} points)"
        self.show_changed_slice(z, t_request, was_user_slice or z in session.user_slices(),
                                lambda _: f"Slice {z}: back to the mask before {what} ({n} px), exactly as it was.")
        return True

    def segment_args(self, z: int, prompts: SlicePrompts) -> dict:
        """The arguments of :func:`segment_slice` for slice ``z``: the prompts, the slice's previous state and the
        user's local-correction and click-guard choices."""
        loaded = self.view.loaded_model()
        settings = self.view.settings()
        session = self.session
        prev_mask = session.plane(session.current, z)
        return dict(
            predictor=self.embeddings.predictor,
            embedding=self.embeddings.get(z),
            prompts=prompts,
            previous_prompts=session.current_prompts.get(z),
            previous_logits=session.current_logits.get(z),
            previous_mask=prev_mask.copy() if prev_mask.any() else None,
            box_primary=bool(loaded.box_primary),
            model_name=display_name(loaded),
            **annotator_click_policy(settings.local_corrections, settings.click_guard,
                                     settings.click_refinement).segment_kwargs(),
            # the refinement reads the slice's pixels; without it nothing needs them
            image=self.embeddings.slice_image(z) if settings.click_refinement != "off" else None,
            focus_crop=DEFAULT_FOCUS_CROP if settings.zoom_small_objects else None,
            embed_crop=lambda plan: self.embeddings.crop(z, plan),
            previous_crop=self.previous_crop(z),
            point_strokes=self.view.point_strokes(z) if hasattr(self.view, "point_strokes") else None,
        )

    def zoom_plan(self, z: int, prompts: SlicePrompts):
        """The focus crop slice ``z``'s prompts are decoded in (None: the whole slice, or zoom is off)."""
        if prompts.box is None or not self.view.settings().zoom_small_objects:
            return None
        return focus_plan(prompts, tuple(self.embeddings.plane_shape), DEFAULT_FOCUS_CROP)

    def previous_crop(self, z: int):
        """The focus crop slice ``z``'s current logits were decoded in (None: the whole slice, or not known)."""
        logits = self.session.current_logits.get(z)
        entry = self.logit_crops.get(id(logits)) if logits is not None else None
        return entry[1] if entry is not None and entry[0]() is logits else None

    def remember_crop(self, logits, crop) -> None:
        if logits is None or crop is None:
            return
        if len(self.logit_crops) > 512:  # drop the entries of logits that are gone
            self.logit_crops = {k: v for k, v in self.logit_crops.items() if v[0]() is not None}
        self.logit_crops[id(logits)] = (weakref.ref(logits), crop)

    def embed_crop_then_segment(self, z: int, plan, t_request: float) -> None:
        """Embed the focus crop of slice ``z`` in a worker (never on the GUI thread), then decode."""
        key = (z, plan)
        if key in self.crop_handles:
            self.pending = (z, t_request)
            return
        emb, gen = self.embeddings, self.generation
        self.view.set_status(f"Zooming: embedding the small object's surroundings on slice {z}…")

        def done(_):
            self.crop_handles.pop(key, None)
            if gen == self.generation and emb is self.embeddings:
                self.request(z, t_request)

        def failed(err, tb):
            self.crop_handles.pop(key, None)
            self.view.show_error(err)

        self.crop_handles[key] = self.run_task(lambda h: emb.crop(z, plan), done, failed,
                                               f"embedding the zoomed crop of slice {z}", "embed")

    def embed_then_segment(self, z: int, t_request: float) -> None:
        if z in self.embed_handles:
            self.pending = (z, t_request)
            return
        emb, gen = self.embeddings, self.generation
        self.view.set_status(f"Embedding slice {z}…")

        def done(_):
            self.embed_handles.pop(z, None)
            if gen == self.generation and emb is self.embeddings:
                self.view.embeddings_changed()
                self.request(z, t_request)

        def failed(err, tb):
            self.embed_handles.pop(z, None)
            self.view.show_error(err)

        self.embed_handles[z] = self.run_task(lambda h: emb.get(z), done, failed, f"embedding slice {z}", "embed")

    def apply(self, z: int, result, gen: int, t_request: float, asked: SlicePrompts | None = None) -> None:
        """A decode's result: into the session unless it is stale (``gen`` is not the current generation)."""
        if gen != self.generation or self.session is None:
            return
        session = self.session
        was_propagated = session.current_prompts.get(z) is not None and session.current_prompts[z].source == "propagated"
        before = session.plane(session.current, z).copy()
        session.set_current_slice(z, result.mask, result.logits, result.prompts, result.score, asked=asked)
        crop = getattr(result, "crop", None)
        self.remember_crop(result.logits, crop)
        self.view.clear_message()
        if result.hint:
            self.view.show_hint(result.hint)
        # a corrective click's own feedback (what it changed, or why nothing) says more than the pixel count
        change = (f"{int(result.mask.sum())} px. {result.feedback}" if result.feedback
                  else f"{describe_change(before, result.mask)}.")
        if crop is not None:
            change += " (zoomed: object is small)"

        self.show_changed_slice(
            z, t_request, was_propagated or z in session.user_slices(),
            lambda latency: f"Slice {z}: {change} Predicted IoU {result.score:.2f}; "
            f"{latency * 1000:.0f} ms. C commits, B takes the last click back, Shift-C clears.",
        )

    def show_changed_slice(self, z: int, t_request: float, seeds_changed: bool, status) -> None:
        """After slice ``z``'s mask changed (a decode, or an earlier state restored): update the view and the
        status line (``status(latency)``), mark the slice for re-propagation (started when ``seeds_changed`` and
        automatic re-propagation is on), signal it, and prepare the next click's mask prompt."""
        self.view.mask_changed(z)
        latency = time.perf_counter() - t_request
        self.last_latency = latency
        self.view.set_status(status(latency))
        if self.session.is_volume:
            self.propagation.slice_corrected(z, seeds_changed)
        self.view.slice_done(z, latency)
        self.prepare_z = z  # the next click starts from these logits: prepare their mask prompt in idle time
        self.prepare_timer.start()

    def prepare_next_click(self) -> None:
        """Precompute the mask prompt of the next corrective click on this slice (the logits just shown), so
        that click skips that work (about a quarter of a LiteMedSAM corrective decode; same masks). Idle
        time only: skipped while a decode runs in a worker; an optimisation, so a failure here is ignored
        (the click computes the same thing itself)."""
        z, session, emb = self.prepare_z, self.session, self.embeddings
        if z is None or session is None or emb is None or self.running or not emb.has(z):
            return
        logits = session.current_logits.get(z)
        prepare = getattr(emb.predictor, "prepare_mask_prompt", None)
        if logits is None or prepare is None:
            return
        try:
            with self.decode_context():
                prepare(logits, embedding=emb.get(z))
        except Exception:  # noqa: BLE001 - see docstring
            pass

    # ------------------------------------------------------------------ commit, clear, undo
    def commit(self, info: dict | None = None, label_id: int | None = None):
        """Commit the current object (a new label id, or ``label_id``); the session's CommitResult, or None after
        an error."""
        self.propagation.stop()
        try:
            result = self.session.commit(overwrite=self.view.settings().overwrite, label_id=label_id, info=info or {})
        except UserFacingError as err:
            self.view.show_error(err)
            return None
        self.view.labels_changed()
        self.view.mask_changed()
        self.view.clear_prompts()
        self.propagation.forget()
        return result

    def clear(self) -> None:
        """Drop the current object and its prompts; results still in flight are dropped."""
        self.propagation.stop()
        self.generation += 1
        self.session.clear_current()
        self.view.clear_prompts()
        self.view.mask_changed()
        self.propagation.forget()

    def undo(self) -> int | None:
        label_id = self.session.undo()
        if label_id is not None:
            self.view.labels_changed()
        return label_id
