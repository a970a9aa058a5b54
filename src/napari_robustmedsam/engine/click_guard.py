"""Keep a corrective click from working against what the user said (the "click guard").

Why: measured on the 58 held-out images (docs/results/heads-heldout-default8), most objects whose Dice falls at a
click fall at a *negative* click that removes far more than the wrong part (a median 26 % of the mask where the
negative clicks that help remove 10 %), or at a positive click after which the mask shrinks. The user's clicks say
two things the decoder does not always respect: a positive click asks for more object, a negative click for less;
and every earlier click still holds. So the guard keeps, of the decoder's change to the mask, only

- the pixels that change in the new click's direction (a positive click only adds, a negative click only removes),
- that are nearer to the new click than to every earlier click of the opposite label (so an earlier click keeps
  its label and a click cannot reach past the clicks that contradict it).

Everything else keeps the previous logits. Like :mod:`.local_correction` it works on the low-resolution logits, so
the mask shown and the logits fed back at the next click stay one and the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .local_correction import paste_new_logits


def click_arrays(points, labels, n_new: int) -> tuple[np.ndarray, np.ndarray]:
    """An object's clicks as (K, 2) float (x, y) and (K,) int labels, checked against each other and against
    ``n_new``, the number of them that are new."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    labs = np.asarray(labels).reshape(-1).astype(int)
    if pts.shape[0] != labs.shape[0]:
        raise ValueError(f"{pts.shape[0]} points but {labs.shape[0]} labels")
    if not 0 <= n_new <= pts.shape[0]:
        raise ValueError(f"n_new={n_new} for {pts.shape[0]} points")
    return pts, labs


#: which clicks the edge-reach bound acts on: every new click, or only a negative click made before any positive one
#: (a box start's first removals, which nothing else bounds: no positive click says where the object is)
REACH_SCOPES = ("all", "negatives-before-positive")


@dataclass(frozen=True)
class EdgeReach:
    """How far a guarded click may reach: ``factor`` times its distance to the previous mask's edge, for the clicks
    in ``scope`` (one of REACH_SCOPES)."""

    factor: float
    scope: str = "all"

    def __post_init__(self):
        if not self.factor > 0:
            raise ValueError(f"edge reach factor must be greater than 0, got {self.factor}")
        if self.scope not in REACH_SCOPES:
            raise ValueError(f"edge reach scope {self.scope!r}: use one of {', '.join(REACH_SCOPES)}")

    def bounds(self, label: int, earlier_labels: np.ndarray) -> bool:
        """Whether a click with ``label`` after clicks with ``earlier_labels`` (on the same object) is bounded."""
        if self.scope == "all":
            return True
        return label == 0 and not (np.asarray(earlier_labels) == 1).any()


def as_edge_reach(value: float | EdgeReach | None) -> EdgeReach | None:
    """A number means the bound on every click (the earlier API); None means no bound."""
    if value is None or isinstance(value, EdgeReach):
        return value
    return EdgeReach(float(value))


def allowed_changes(
    shape: tuple[int, int], points: np.ndarray, labels: np.ndarray, n_new: int,
    previous: np.ndarray | None = None, edge_reach: float | EdgeReach | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(may_add, may_remove) boolean maps on an (H, W) grid for the last ``n_new`` of ``points`` ((K, 2) x, y on
    that grid) with ``labels`` (K,) 1/0: a new positive click may add the pixels nearer to it than to every other
    negative click, a new negative click may remove the pixels nearer to it than to every other positive click.

    ``edge_reach`` (with ``previous``, the (H, W) mask before the click): a click also reaches no further than
    ``edge_reach`` times its distance to the nearest pixel of the other label in ``previous`` (for a negative click
    inside the mask, the mask's edge): a click in the middle of a small wrong part changes about that part, one in
    the middle of a large wrong part can change all of it. Without a pixel of the other label the reach is free. An
    :class:`EdgeReach` can limit the bound to some clicks (its ``scope``); a number bounds every click."""
    edge_reach = as_edge_reach(edge_reach)
    h, w = shape
    if edge_reach is not None and (previous is None or previous.shape != (h, w)):
        raise ValueError("edge_reach needs the previous mask on the same grid")
    may_add = np.zeros((h, w), dtype=bool)
    may_remove = np.zeros((h, w), dtype=bool)
    pts, labs = click_arrays(points, labels, n_new)
    yy, xx = np.mgrid[0:h, 0:w]
    cx, cy = xx + 0.5, yy + 0.5  # pixel centres, the convention of the points
    dist2 = [(cx - p[0]) ** 2 + (cy - p[1]) ** 2 for p in pts]  # each point's squared distance map, once

    for k in range(pts.shape[0] - n_new, pts.shape[0]):
        others = [j for j in range(pts.shape[0]) if labs[j] != labs[k]]
        reach = np.ones((h, w), dtype=bool)
        if others:
            reach = dist2[k] < np.min(np.stack([dist2[j] for j in others]), axis=0)
        if edge_reach is not None and edge_reach.bounds(labs[k], labs[:k]):
            reach &= dist2[k] <= (edge_reach.factor * edge_distance(previous, pts[k], labs[k])) ** 2
        if labs[k] == 1:
            may_add |= reach
        else:
            may_remove |= reach
    return may_add, may_remove


def edge_distance(previous: np.ndarray, point: np.ndarray, label: int) -> float:
    """Distance from ``point`` (x, y) to the nearest pixel centre of ``previous`` that has the other label (inside
    the mask for a positive click, outside it for a negative click); inf when there is none."""
    other = ~previous if label == 0 else previous
    ys, xs = np.nonzero(other)
    if ys.size == 0:
        return float("inf")
    return float(np.sqrt(np.min((xs + 0.5 - point[0]) ** 2 + (ys + 0.5 - point[1]) ** 2)))


def guard_clicks(
    previous_logits: torch.Tensor,
    new_logits: torch.Tensor,
    clicks: Sequence[tuple[np.ndarray, np.ndarray, int] | None],
    edge_reach: float | EdgeReach | None = None,
) -> torch.Tensor:
    """Previous logits, with the new logits pasted where the change is one the new clicks allow
    (:func:`allowed_changes`). ``previous_logits``/``new_logits``: (N, 1, L, L); ``clicks``: per object
    (points (K, 2) on the L x L grid, labels (K,), number of new clicks at the end), or None to keep that object's
    new logits whole. ``edge_reach``: as in :func:`allowed_changes`."""
    edge_reach = as_edge_reach(edge_reach)

    def keep(entry: tuple[np.ndarray, np.ndarray, int], prev_fg: np.ndarray, new_fg: np.ndarray) -> np.ndarray:
        points, labels, n_new = entry
        may_add, may_remove = allowed_changes(prev_fg.shape, points, labels, n_new, prev_fg, edge_reach)
        # everything else keeps the previous logits, unchanged pixels included: the upsampled mask then only
        # grows at a positive click and only shrinks at a negative one, at full resolution too
        return (new_fg & ~prev_fg & may_add) | (prev_fg & ~new_fg & may_remove)

    return paste_new_logits(previous_logits, new_logits, clicks, keep)
