"""State of one annotation session: the current object, the committed labels, the undo stack, the prompts.

Coordinates follow :meth:`napari_robustmedsam.engine.predictor.Predictor.predict` (and
:mod:`napari_robustmedsam.prompting`): a point is ``(x, y)`` = (column, row) pixel index; a box is
``(x0, y0, x1, y1)`` with exclusive upper corners (the tight box of a mask spanning columns c0..c1 is
``(c0, .., c1 + 1, ..)``). A slice index ``z`` addresses the first axis of a volume; a 2D image has the
single slice ``z = 0``.

Rules the annotator relies on:

- The labels array is only changed by :meth:`AnnotationSession.commit`, :meth:`AnnotationSession.remove_object`,
  :meth:`AnnotationSession.replace_all` and :meth:`AnnotationSession.undo`; each computes the new array first and
  swaps it in at the end, so a failure leaves it untouched.
- A commit gives the current object a new id (one more than the largest id in use) and, unless
  ``overwrite=True``, never changes pixels that already carry another id.
- Undo restores exactly the pixels the last commit changed, to their previous values; after
  :meth:`~AnnotationSession.replace_all` (resuming a saved session over committed objects) it restores the objects
  that were there before, with their prompts.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import UserFacingError
from ..prompting import tight_box

PROMPT_SOURCES = ("user", "propagated", "label")


@dataclass
class SlicePrompts:
    """The prompts of one object on one slice."""

    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))  # (P, 2) as (x, y)
    labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))  # (P,) 1 pos / 0 neg
    box: np.ndarray | None = None  # (4,) as (x0, y0, x1, y1)
    # "user" (typed in by the user), "propagated" (derived from a neighbour slice) or "label" (the tight box of an
    # existing label the object was started from)
    source: str = "user"
    end: bool = False  # the user marked this slice as lying past the end of the object (empty on purpose)

    def __post_init__(self) -> None:
        self.points = np.asarray(self.points, dtype=np.float64).reshape(-1, 2)
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        if self.labels.shape[0] != self.points.shape[0]:
            raise UserFacingError(f"{self.points.shape[0]} points but {self.labels.shape[0]} point labels")
        if self.box is not None:
            self.box = np.asarray(self.box, dtype=np.float64).reshape(4)
        if self.source not in PROMPT_SOURCES:
            raise ValueError(f"unknown prompt source {self.source!r}")

    @property
    def is_empty(self) -> bool:
        return self.points.shape[0] == 0 and self.box is None

    @property
    def n_positive(self) -> int:
        return int((self.labels == 1).sum())

    def copy(self) -> "SlicePrompts":
        return SlicePrompts(self.points.copy(), self.labels.copy(), None if self.box is None else self.box.copy(),
                            self.source, self.end)

    def with_point(self, x: float, y: float, label: int) -> "SlicePrompts":
        """These prompts plus one point (a corrective click: 1 positive, 0 negative), with the same box."""
        return SlicePrompts(np.vstack([self.points, [[float(x), float(y)]]]), np.append(self.labels, int(label)),
                            None if self.box is None else self.box.copy())

    def same_box(self, other: "SlicePrompts | None") -> bool:
        if other is None:
            return False
        if self.box is None or other.box is None:
            return self.box is None and other.box is None
        return bool(np.allclose(self.box, other.box))

    def same_prompts(self, other: "SlicePrompts | None") -> bool:
        """True when ``other`` has the same box and the same points with the same labels, in the same order."""
        if other is None or not self.same_box(other) or self.points.shape != other.points.shape:
            return False
        return bool(np.allclose(self.points, other.points) and np.array_equal(self.labels, other.labels))

    def extends(self, other: "SlicePrompts | None") -> bool:
        """True when these prompts are ``other`` plus more points (same box): a corrective click."""
        if other is None or other.is_empty or not self.same_box(other):
            return False
        n = other.points.shape[0]
        if self.points.shape[0] <= n:
            return False
        return bool(np.allclose(self.points[:n], other.points) and np.array_equal(self.labels[:n], other.labels))

    def to_json(self) -> dict[str, Any]:
        return {
            "points": [[float(x), float(y)] for x, y in self.points],
            "point_labels": [int(v) for v in self.labels],
            "box": None if self.box is None else [float(v) for v in self.box],
            "source": self.source,
            "end": bool(self.end),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "SlicePrompts":
        return cls(
            points=np.asarray(data.get("points") or np.zeros((0, 2)), dtype=np.float64),
            labels=np.asarray(data.get("point_labels") or [], dtype=np.int64),
            box=None if data.get("box") is None else np.asarray(data["box"], dtype=np.float64),
            source=data.get("source", "user"),
            end=bool(data.get("end", False)),
        )


@dataclass
class ObjectRecord:
    """What is known about one committed object: its id, prompts per slice and how it was made."""

    label_id: int
    prompts: dict[int, SlicePrompts] = field(default_factory=dict)
    propagated_slices: list[int] = field(default_factory=list)
    n_pixels: int = 0
    info: dict[str, Any] = field(default_factory=dict)  # model name, degraded?, ...
    # the prompts of earlier commits under the same id, oldest first ({"slices", "propagated_slices", "info"}):
    # separate pieces committed one by one under one label value, or the object before a correction, so that the
    # prompts behind every pixel of the label stay on record
    earlier: list[dict[str, Any]] = field(default_factory=list)

    def own_prompts_json(self) -> dict[str, Any]:
        """This commit's prompts (without the earlier ones), as one entry of a later record's ``earlier``."""
        return {
            "slices": {str(z): p.to_json() for z, p in sorted(self.prompts.items())},
            "propagated_slices": [int(z) for z in self.propagated_slices],
            "info": self.info,
        }

    @property
    def n_commits(self) -> int:
        return len(self.earlier) + 1

    def to_json(self) -> dict[str, Any]:
        out = {"id": int(self.label_id), "n_pixels": int(self.n_pixels), **self.own_prompts_json()}
        if self.earlier:  # absent for an object committed once, as in files written before it existed
            out["earlier"] = list(self.earlier)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ObjectRecord":
        return cls(
            label_id=int(data["id"]),
            prompts={int(z): SlicePrompts.from_json(p) for z, p in (data.get("slices") or {}).items()},
            propagated_slices=[int(z) for z in data.get("propagated_slices") or []],
            n_pixels=int(data.get("n_pixels", 0)),
            info=dict(data.get("info") or {}),
            earlier=[dict(e) for e in data.get("earlier") or []],
        )


@dataclass
class CommitResult:
    label_id: int
    n_pixels: int  # pixels now carrying label_id
    n_kept: int  # pixels of the current object left to another id (overwrite=False)
    n_added: int = 0  # pixels this commit gave the id
    n_commits: int = 1  # commits now behind the id (more than 1: pieces added under an existing value)
    correction: bool = False  # the object was started from its label ("Start from label") and replaces it


@dataclass
class _UndoEntry:
    label_id: int
    index: np.ndarray  # flat indices changed by the commit
    old_values: np.ndarray
    record: ObjectRecord | None  # the record written by a commit (None for a removal)
    previous_record: ObjectRecord | None  # the record this id had before
    kind: str = "commit"  # "commit", "remove" or "replace" (every object at once: a resumed session)
    previous_objects: dict[int, ObjectRecord] | None = None  # "replace": the records before it


@dataclass
class _SliceState:
    """A slice of the current object as it was before a prompt change, with the user's prompts that made it."""

    asked: SlicePrompts
    prompts: SlicePrompts | None
    mask: np.ndarray
    logits: Any
    score: float | None


def mask_box(mask: np.ndarray) -> np.ndarray | None:
    """The box prompt of a 2D mask: its tight ``(x0, y0, x1, y1)`` box (exclusive upper corners), None if empty."""
    return tight_box(mask) if np.any(mask) else None


class AnnotationSession:
    """Current object + committed labels over a 2D image (Y, X) or a volume (Z, Y, X)."""

    def __init__(self, shape: tuple[int, ...], labels: np.ndarray | None = None, max_undo: int = 50,
                 max_steps_back: int = 20) -> None:
        shape = tuple(int(s) for s in shape)
        if len(shape) not in (2, 3):
            raise UserFacingError(f"an annotation session needs a 2D (Y, X) or 3D (Z, Y, X) shape, got {shape}")
        self.shape = shape
        if labels is None:
            self._labels = np.zeros(shape, np.uint32)
        else:
            self._labels = self._check_labels(labels)
        self.current = np.zeros(shape, bool)
        self.current_logits: dict[int, Any] = {}  # z -> low-res logits (1, 1, 256, 256) of the current object
        self.current_prompts: dict[int, SlicePrompts] = {}  # z -> prompts (user or propagated)
        self.current_scores: dict[int, float] = {}
        self.current_label_id: int | None = None  # set when a committed object was re-opened for editing
        # set when the current object was started from an existing label: its commit replaces that label's pixels
        self.replaces_label: int | None = None
        self.objects: dict[int, ObjectRecord] = {}
        self._undo: list[_UndoEntry] = []
        self.max_undo = int(max_undo)
        # Taking a click back: the user prompts behind each slice's current mask, and the states before them
        self._asked: dict[int, SlicePrompts] = {}
        self._history: dict[int, list[_SliceState]] = {}
        self.max_steps_back = int(max_steps_back)

    # ---- geometry ---------------------------------------------------------------------------
    @property
    def is_volume(self) -> bool:
        return len(self.shape) == 3

    @property
    def n_slices(self) -> int:
        return self.shape[0] if self.is_volume else 1

    @property
    def plane_shape(self) -> tuple[int, int]:
        return self.shape[-2:]  # type: ignore[return-value]

    def _check_z(self, z: int) -> int:
        z = int(z)
        if not 0 <= z < self.n_slices:
            raise UserFacingError(f"slice {z} is outside the volume (0..{self.n_slices - 1})")
        return z

    def plane(self, array: np.ndarray, z: int) -> np.ndarray:
        """The (Y, X) plane of ``array`` at slice ``z`` (the array itself for 2D)."""
        return array[self._check_z(z)] if self.is_volume else array

    def _check_labels(self, labels: np.ndarray) -> np.ndarray:
        arr = np.asarray(labels)
        if arr.shape != self.shape:
            raise UserFacingError(f"labels of shape {arr.shape} do not match the image shape {self.shape}")
        if not np.issubdtype(arr.dtype, np.integer) and arr.dtype != bool:
            raise UserFacingError(f"labels must be an integer array, got {arr.dtype}")
        if arr.size and arr.min() < 0:
            raise UserFacingError("labels must be >= 0 (0 = background)")
        return np.array(arr, dtype=np.uint32 if arr.dtype == bool or arr.dtype.itemsize <= 4 else arr.dtype)

    # ---- labels -------------------------------------------------------------------------------
    @property
    def labels(self) -> np.ndarray:
        """The committed labels. Treat as read-only: copy before handing it to something that edits it."""
        return self._labels

    def sync_labels(self, labels: np.ndarray) -> None:
        """Adopt labels edited outside the session (e.g. painted by hand); undo history is kept only if
        nothing changed."""
        new = self._check_labels(labels)
        if not np.array_equal(new, self._labels):
            self._labels = new
            self._undo.clear()
            present = set(np.unique(new).tolist()) - {0}
            self.objects = {k: v for k, v in self.objects.items() if k in present}

    def next_id(self) -> int:
        used = [int(self._labels.max(initial=0)), *self.objects]
        return max(used, default=0) + 1

    # ---- current object ----------------------------------------------------------------------
    @property
    def has_current(self) -> bool:
        return bool(self.current.any())

    def current_slices(self) -> list[int]:
        if not self.is_volume:
            return [0] if self.has_current else []
        return [int(z) for z in np.nonzero(self.current.reshape(self.shape[0], -1).any(axis=1))[0]]

    def user_slices(self) -> list[int]:
        """Slices of the current object whose prompts come from the user (the seeds of propagation)."""
        return sorted(
            z for z, p in self.current_prompts.items() if p.source == "user" and (p.end or not p.is_empty)
        )

    def mark_end(self, z: int) -> None:
        """Mark slice ``z`` as past the end of the current object: empty there, propagation stops there."""
        z = self._check_z(z)
        self.clear_current_slice(z)
        self.current_prompts[z] = SlicePrompts(source="user", end=True)

    def set_current_slice(
        self,
        z: int,
        mask: np.ndarray,
        logits: Any = None,
        prompts: SlicePrompts | None = None,
        score: float | None = None,
        asked: SlicePrompts | None = None,
    ) -> None:
        """Replace the current object on one slice (other slices are kept).

        ``asked``: the user's prompts this mask was segmented from. When given, the slice's previous state is kept
        so that taking those prompts back (:meth:`step_back`) restores it exactly; a state that no user prompt
        made (propagated, reopened, marked as the end) is kept under empty prompts, so removing the user's only
        click brings it back. Without ``asked`` (propagation, loading) the slice's history is dropped.
        """
        z = self._check_z(z)
        m = np.asarray(mask).astype(bool)
        if m.shape != self.plane_shape:
            raise UserFacingError(f"mask of shape {m.shape} does not match the slice shape {self.plane_shape}")
        if asked is None:
            self._forget_history(z)
        else:
            previous = self.plane(self.current, z)
            if z in self._asked or z in self.current_prompts or previous.any():
                history = self._history.setdefault(z, [])
                history.append(_SliceState(self._asked.get(z, SlicePrompts()), self.current_prompts.get(z),
                                           previous.copy(), self.current_logits.get(z), self.current_scores.get(z)))
                del history[: max(0, len(history) - self.max_steps_back)]
            self._asked[z] = asked.copy()
        self._put_slice(z, m, logits, prompts, score)

    def step_back(self, z: int, asked: SlicePrompts) -> bool:
        """Restore slice ``z`` exactly as it was before the last prompt change, when ``asked`` (the user's prompts
        now) equals the prompts of that earlier state, e.g. after the last click was removed. Why: segmenting the
        remaining prompts again starts without the earlier mask and gives a different one; a click that made the
        mask worse should cost nothing to take back. Returns whether it restored."""
        z = self._check_z(z)
        history = self._history.get(z)
        if not history or not history[-1].asked.same_prompts(asked):
            return False
        state = history.pop()
        self._asked[z] = state.asked
        self._put_slice(z, state.mask, state.logits, state.prompts, state.score, drop_missing=True)
        return True

    def asked_prompts(self, z: int) -> SlicePrompts | None:
        """The prompts the user last asked for on slice ``z`` (None if none were asked there)."""
        return self._asked.get(self._check_z(z))

    def steps_back(self, z: int) -> int:
        """How many earlier states of slice ``z`` can be restored by taking prompts back."""
        return len(self._history.get(z, ()))

    def _forget_history(self, z: int | None = None) -> None:
        if z is None:
            self._asked.clear()
            self._history.clear()
        else:
            self._asked.pop(z, None)
            self._history.pop(z, None)

    def _put_slice(self, z: int, m: np.ndarray, logits: Any, prompts: SlicePrompts | None, score: float | None,
                   drop_missing: bool = False) -> None:
        if self.is_volume:
            self.current[z] = m
        else:
            self.current = m.copy()
        if logits is not None:
            self.current_logits[z] = logits
        else:
            self.current_logits.pop(z, None)
        if prompts is not None:
            self.current_prompts[z] = prompts
        elif drop_missing:
            self.current_prompts.pop(z, None)
        if score is not None:
            self.current_scores[z] = float(score)
        elif drop_missing:
            self.current_scores.pop(z, None)

    def clear_current_slice(self, z: int) -> None:
        z = self._check_z(z)
        if self.is_volume:
            self.current[z] = False
        else:
            self.current[:] = False
        self.current_logits.pop(z, None)
        self.current_prompts.pop(z, None)
        self.current_scores.pop(z, None)
        self._forget_history(z)

    def clear_current(self) -> None:
        self.current = np.zeros(self.shape, bool)
        self.current_logits.clear()
        self.current_prompts.clear()
        self.current_scores.clear()
        self.current_label_id = None
        self.replaces_label = None
        self._forget_history()

    # ---- commit / undo ------------------------------------------------------------------------
    def commit(self, overwrite: bool = False, label_id: int | None = None, info: dict | None = None) -> CommitResult:
        """Write the current object into the labels with a new id (or ``label_id``) and clear it.

        ``overwrite=False`` keeps pixels that belong to another object; ``overwrite=True`` takes them.
        """
        if not self.has_current:
            raise UserFacingError("nothing to commit: segment an object first (draw a box or click a point)")
        if label_id is None:
            label_id = self.current_label_id if self.current_label_id is not None else self.next_id()
        label_id = int(label_id)
        if label_id <= 0:
            raise UserFacingError(f"label ids start at 1, got {label_id}")
        if label_id > np.iinfo(self._labels.dtype).max:
            raise UserFacingError(f"label id {label_id} does not fit the labels' type {self._labels.dtype}")
        current = self.current
        existing = self._labels
        if overwrite:
            target = current & (existing != label_id)
        else:
            target = current & (existing == 0)
        if self.replaces_label is not None:  # the label being corrected is this object's own, not another's
            target = target | (current & (existing == self.replaces_label))
        own = (existing == label_id) | (existing == (self.replaces_label or 0))
        n_kept = int((current & (existing != 0) & ~own).sum()) if not overwrite else 0
        if not target.any() and n_kept and self.replaces_label is None:
            raise UserFacingError(
                f"every pixel of the current object ({n_kept} px) already belongs to other objects: nothing was "
                "committed. Tick 'overwrite' to take those pixels, or segment a different region."
            )
        new_labels = existing.copy()
        if self.replaces_label is not None:  # pixels the corrections took away from the label go back to 0
            new_labels[(existing == self.replaces_label) & ~current] = 0
        new_labels[target] = label_id
        index = np.flatnonzero(new_labels != existing)
        old_values = existing.ravel()[index].copy()
        n_pixels = int((new_labels == label_id).sum())
        record = ObjectRecord(
            label_id=label_id,
            prompts={z: copy.deepcopy(p) for z, p in self.current_prompts.items()},
            propagated_slices=sorted(z for z, p in self.current_prompts.items() if p.source == "propagated"),
            n_pixels=n_pixels,
            info=dict(info or {}),
        )
        previous_record, correction = self.objects.get(label_id), self.replaces_label is not None
        if previous_record is not None:  # a piece added under an existing value, or a correction: keep its prompts
            record.earlier = [*previous_record.earlier, previous_record.own_prompts_json()]
        # everything computed: swap in
        self._labels = new_labels
        self.objects[label_id] = record
        self._undo.append(_UndoEntry(label_id, index, old_values, record, previous_record))
        del self._undo[: max(0, len(self._undo) - self.max_undo)]
        self.clear_current()
        return CommitResult(label_id, n_pixels, n_kept, int(target.sum()), record.n_commits, correction)

    @property
    def can_undo(self) -> bool:
        return bool(self._undo)

    @property
    def next_undo_kind(self) -> str | None:
        """What :meth:`undo` would take back: ``"commit"``, ``"remove"``, ``"replace"``, or None."""
        return self._undo[-1].kind if self._undo else None

    def undo(self) -> int | None:
        """Revert the last commit; return its label id (None when there is nothing to undo)."""
        if not self._undo:
            return None
        entry = self._undo[-1]
        new_labels = self._labels.copy()
        new_labels.ravel()[entry.index] = entry.old_values
        self._labels = new_labels
        self._undo.pop()
        if entry.kind == "replace":
            self.objects = dict(entry.previous_objects or {})
        elif entry.previous_record is not None:
            self.objects[entry.label_id] = entry.previous_record
        elif not (new_labels == entry.label_id).any():
            self.objects.pop(entry.label_id, None)
        return entry.label_id

    def reopen_last_commit(self) -> int | None:
        """Undo the last commit and make that object the current one again (same id on the next commit).

        Its prompts come back as they were; the mask comes back from the pixels the commit wrote.
        """
        if not self._undo or self._undo[-1].kind != "commit":
            return None
        entry = self._undo[-1]
        mask = np.zeros(self.shape, bool)
        mask.ravel()[entry.index] = self._labels.ravel()[entry.index] == entry.label_id  # not the pixels it cleared
        self.undo()
        mask |= self._labels == entry.label_id  # pixels that already had the id before the commit
        self.clear_current()
        self.current = mask
        self.current_prompts = {z: copy.deepcopy(p) for z, p in entry.record.prompts.items()} if entry.record else {}
        self.current_label_id = entry.label_id
        return entry.label_id

    def start_from_label(self, label_id: int, logits_for=None) -> int:
        """Make committed object ``label_id`` the current object, to correct it with clicks; return its slice count.

        Its mask becomes the current mask on every slice it covers, with its tight box as the slice's prompt
        (source ``"label"``) and, when ``logits_for(z, mask)`` is given, that mask as the mask prompt a corrective
        click starts from. The labels stay as they are until the commit, which writes the corrected object under
        the same id and gives back to 0 the pixels the corrections removed (one undo step restores all).
        """
        label_id = int(label_id)
        if self.has_current:
            raise UserFacingError("commit or clear the current object first, then start from a label")
        mask = self._labels == label_id
        if label_id <= 0 or not mask.any():
            present = sorted(int(v) for v in np.unique(self._labels) if v)[:20]
            raise UserFacingError(
                f"label {label_id} is not in the labels (present: {present or 'none'}): choose one of those"
            )
        self.clear_current()
        self.current = mask
        slices = [0] if not self.is_volume else [int(z) for z in np.flatnonzero(mask.reshape(self.shape[0], -1).any(1))]
        for z in slices:
            plane = self.plane(mask, z)
            self.current_prompts[z] = SlicePrompts(box=mask_box(plane), source="label")
            if logits_for is not None:
                logits = logits_for(z, plane)
                if logits is not None:
                    self.current_logits[z] = logits
        self.current_label_id = label_id
        self.replaces_label = label_id
        return len(slices)

    def remove_object(self, label_id: int) -> int:
        """Erase one committed object (undoable like a commit); return the number of pixels erased."""
        label_id = int(label_id)
        index = np.flatnonzero(self._labels == label_id)
        if index.size == 0:
            return 0
        new_labels = self._labels.copy()
        new_labels.ravel()[index] = 0
        record = self.objects.get(label_id, ObjectRecord(label_id))
        self._labels = new_labels
        self.objects.pop(label_id, None)
        self._undo.append(
            _UndoEntry(label_id, index, np.full(index.size, label_id, self._labels.dtype), None, record, kind="remove")
        )
        return int(index.size)

    # ---- export ---------------------------------------------------------------------------------
    def records_json(self) -> list[dict[str, Any]]:
        return [self.objects[k].to_json() for k in sorted(self.objects)]

    def load_records(self, records: list[dict[str, Any]]) -> None:
        self.objects = _records_by_id(records)
        self._undo.clear()

    def replace_all(self, labels: np.ndarray, records: list[dict[str, Any]]) -> int:
        """Make ``labels`` and their prompt ``records`` the committed objects (resuming a saved session or an
        autosave). The objects committed before are not lost: one :meth:`undo` brings them back, prompts included.
        Returns how many objects were replaced."""
        new = self._check_labels(labels)
        objects = _records_by_id(records)
        index = np.flatnonzero(new != self._labels)
        replaced = len(set(np.unique(self._labels).tolist()) - {0})
        entry = _UndoEntry(0, index, self._labels.ravel()[index].copy(), None, None, kind="replace",
                           previous_objects=dict(self.objects))
        self._labels = new
        self.objects = objects
        if index.size or entry.previous_objects:
            self._undo.append(entry)
            del self._undo[: max(0, len(self._undo) - self.max_undo)]
        return replaced


def _records_by_id(records: list[dict[str, Any]]) -> dict[int, ObjectRecord]:
    objects = {}
    for data in records:
        rec = ObjectRecord.from_json(data)
        objects[rec.label_id] = rec
    return objects
