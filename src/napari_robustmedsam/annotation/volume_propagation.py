"""The annotator's 3D propagation decisions, without Qt: what a propagation starts from (the slices with user
prompts, or the last commit re-opened), when a correction re-propagates (after a pause in the clicks, only the
stretches next to the corrected slices), and which result is still wanted.

:class:`VolumePropagation` is the :class:`.controller.AnnotationController`'s collaborator for volumes: it reads
the controller's session, embeddings, generation and view, and runs :func:`.propagation.propagate_object` in a
worker through the controller's injected ``run_task``.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from ..engine.focus_crop import DEFAULT_FOCUS_CROP
from ..errors import UserFacingError
from .propagation import predictor_segment_fn, propagate_object
from .session import AnnotationSession, SlicePrompts, mask_box

REPROPAGATE_DELAY_MS = 700  # a correction re-propagates once the clicks pause this long


def seed_masks(session: AnnotationSession) -> dict[int, np.ndarray]:
    """The slices a propagation starts from: those with user prompts, else (an object re-opened from its last
    commit, whose prompts were not recorded) its non-empty slices."""
    return {z: session.current[z].copy() for z in (session.user_slices() or session.current_slices())}


def apply_propagation(session: AnnotationSession, result, seeds: dict) -> None:
    """A propagation's masks into the session; the seed slices are kept as they are, and a slice the new
    result leaves empty loses its earlier propagated mask."""
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


class VolumePropagation:
    """Propagation through a volume and re-propagation after corrections (see the module docstring)."""

    def __init__(self, controller: Any, make_timer: Callable[..., Any]) -> None:
        self.ctl = controller
        self.propagated_once = False
        self.changed_since_propagation: set[int] = set()
        self.handle = None
        self.token = 0  # results of superseded propagations are dropped
        self.repropagate_timer = make_timer(REPROPAGATE_DELAY_MS, self.auto_repropagate)

    def forget(self) -> None:
        """A new object (or image): nothing was propagated yet."""
        self.propagated_once = False
        self.changed_since_propagation.clear()

    def slice_corrected(self, z: int, seeds_changed: bool = True) -> None:
        """Slice ``z`` changed after a propagation: it re-propagates after a pause when ``seeds_changed`` and
        automatic re-propagation is on."""
        if not self.propagated_once:
            return
        self.changed_since_propagation.add(z)
        if self.ctl.view.settings().auto_repropagate and seeds_changed:
            self.repropagate_timer.start()

    def stop(self) -> None:
        """No re-propagation pending, and a running propagation cancelled (a commit or clear supersedes it)."""
        self.repropagate_timer.stop()
        self.cancel()

    def mark_end(self, z: int) -> None:
        """Empty the object on slice ``z``; propagation stops there (and re-runs next to it)."""
        ctl = self.ctl
        ctl.view.clear_prompts(z)
        ctl.session.mark_end(z)
        ctl.view.mask_changed(z)
        self.slice_corrected(z)

    def cancel(self) -> None:
        """Cancel a running propagation; its result (if it still arrives) is dropped."""
        self.token += 1
        if self.handle is not None and not self.handle.done:
            self.handle.cancel()
        self.handle = None

    def auto_repropagate(self) -> None:
        if self.propagated_once and self.changed_since_propagation and self.ctl.view.settings().auto_repropagate:
            self.propagate(changed_only=True)

    def seeds(self) -> dict[int, np.ndarray] | None:
        """The slices propagation starts from: the slices with user prompts (or, for an object re-opened from
        its last commit whose prompts were not recorded, its non-empty slices). Without a current object the
        last committed one is re-opened. None (and an error shown) when there is nothing to start from."""
        session, view = self.ctl.session, self.ctl.view
        if not session.has_current and not session.user_slices():
            reopened = session.reopen_last_commit()
            if reopened is None:
                view.show_error(UserFacingError(
                    "nothing to propagate: segment the object on one slice first (box or points), then propagate"))
                return None
            view.labels_changed()
            view.mask_changed()
            view.set_status(f"Re-opened object {reopened} for propagation; C commits it again.")
        seeds = seed_masks(session)
        if not any(m.any() for m in seeds.values()):
            view.show_error(UserFacingError("the annotated slices are empty: segment the object first"))
            return None
        return seeds

    def propagate(self, changed_only: bool = False):
        """Propagate the current object through the volume from its annotated slices (in a worker). With
        ``changed_only`` after an earlier propagation, only the stretches next to the corrected slices run again."""
        ctl = self.ctl
        if ctl.session is None:
            return None
        if not ctl.session.is_volume:
            ctl.view.show_error(UserFacingError("propagation needs a 3D volume; this image is 2D"))
            return None
        session = ctl.session
        seeds = self.seeds()
        if seeds is None:
            return None
        self.cancel()
        token, gen = self.token, ctl.generation
        existing = session.current.copy() if (changed_only and self.propagated_once) else None
        changed = sorted(self.changed_since_propagation) if existing is not None else None
        settings = ctl.view.settings()
        # a seed decoded in a focus crop has logits of that crop's frame: its neighbours get its mask instead
        seed_logits = {z: session.current_logits.get(z) for z in seeds if ctl.previous_crop(z) is None}

        def start():
            zoom = dict(focus_crop=DEFAULT_FOCUS_CROP, embed_crop=ctl.embeddings.crop) if (
                settings.zoom_small_objects) else {}
            seg = predictor_segment_fn(ctl.embeddings.predictor, ctl.embeddings, **zoom)

            def work(handle):
                return propagate_object(
                    seg, session.n_slices, seeds, iou_threshold=settings.iou_threshold,
                    prompt_mode=settings.prompt_mode, min_score=settings.min_score, seed_logits=seed_logits,
                    existing=existing, changed_seeds=changed,
                    progress=lambda d, t: handle.report(d, t, "slices"), is_cancelled=handle.is_cancelled,
                )

            def done(result):
                if token != self.token or gen != ctl.generation or session is not ctl.session:
                    return  # superseded (new propagation, commit, clear, other image)
                self.handle = None
                crop_of = getattr(seg, "crop_of", None)
                for logits in result.logits.values() if crop_of is not None else ():
                    ctl.remember_crop(logits, crop_of(logits))  # so that a click on a zoomed slice knows their frame
                self.apply(result, seeds)

            def failed(err, tb):
                if token != self.token:
                    return
                self.handle = None
                ctl.view.show_error(err)

            ctl.view.clear_message()
            self.handle = ctl.run_task(work, done, failed, "propagating", "propagate")

        ctl.view.with_model(start)
        return self.handle

    def apply(self, result, seeds: dict) -> None:
        """A propagation's result into the session and onto the screen."""
        view = self.ctl.view
        apply_propagation(self.ctl.session, result, seeds)
        self.propagated_once = True
        self.changed_since_propagation.clear()
        view.mask_changed()
        view.embeddings_changed()
        z0, z1 = result.z_range
        stops = "; ".join(f"{k}: {v}" for k, v in result.stopped.items())
        view.set_status(f"Propagated: object on slices {z0}-{z1} ({len(result.propagated)} propagated). "
                        f"{stops}. Correct any slice (it re-propagates), C commits.")
        view.propagation_done(result)
