"""Scribbles and strokes as prompts: a drawn path becomes positive or negative clicks along it.

Why: a stroke along a missed rim or across a leak says more than one click (nnInteractive's scribbles). Sampling it
into points keeps every model usable (they all take points), and the click refinement
(:mod:`..engine.click_refinement`) then honours each point the same way as a click. Qt-free: the widget only hands
over the path (napari Shapes paths are (row, column); give them as (x, y)).
"""

from __future__ import annotations

import numpy as np

from ..errors import PromptError

#: points along a stroke are this many pixels apart (before the cap below)
STROKE_SPACING_PX = 6.0
#: at most this many points per stroke (a longer stroke is sampled more sparsely), so the decoder stays fast
MAX_STROKE_POINTS = 16


def stroke_points(path, label: int, plane: tuple[int, int], spacing: float = STROKE_SPACING_PX,
                  max_points: int = MAX_STROKE_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """(points (K, 2) x, y, labels (K,)) sampled along the polyline ``path`` ((N, 2) x, y pixels) every ``spacing``
    pixels, ends included, with the parts outside the image left out. One point is one click. A stroke entirely
    outside the image is a :class:`PromptError`."""
    if label not in (0, 1):
        raise PromptError(f"a stroke's label must be 1 (positive) or 0 (negative), got {label!r}")
    pts = np.asarray(path, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2 or pts.shape[0] == 0:
        raise PromptError(f"a stroke must be (N, 2) x, y points, got shape {pts.shape}")
    if not np.isfinite(pts).all():
        raise PromptError("the stroke has NaN or inf coordinates")
    h, w = plane
    # sample densely (half a pixel) along every segment, then keep what lies on the image
    dense = [pts[:1]]
    for a, b in zip(pts[:-1], pts[1:]):
        n = max(int(np.ceil(np.hypot(*(b - a)) * 2)), 1)
        dense.append(a + (b - a) * (np.arange(1, n + 1) / n)[:, None])
    dense = np.concatenate(dense)
    inside = (dense[:, 0] >= -0.5) & (dense[:, 0] <= w - 0.5) & (dense[:, 1] >= -0.5) & (dense[:, 1] <= h - 0.5)
    if not inside.any():
        raise PromptError(f"the stroke lies outside the image (x 0..{w - 1}, y 0..{h - 1}): draw it on the image")
    dense = dense[inside]
    arc = np.concatenate([[0.0], np.cumsum(np.hypot(*np.diff(dense, axis=0).T))])
    length = arc[-1]
    n = 1 if length == 0 else min(max(int(np.floor(length / spacing)) + 1, 2), max_points)
    targets = np.linspace(0.0, length, n)
    idx = np.minimum(np.searchsorted(arc, targets), len(dense) - 1)
    out = dense[np.unique(idx)]  # in drawing order; a sample taken twice (a short stroke) once
    return out, np.full(out.shape[0], int(label))


def brush_path(painted: np.ndarray, spacing: float = STROKE_SPACING_PX) -> np.ndarray | None:
    """A brush stroke (the (H, W) pixels a brush or eraser changed) as a path ((N, 2) x, y) for
    :func:`stroke_points`: points of the painted band's skeleton at least ``spacing`` apart, chained nearest first
    from one end, so the path stays inside the band. ``None`` when nothing was painted.

    Why a path: a brushed band is as wide as the brush; its centre line is where the user meant the stroke, and a
    path gives it the drawn stroke's handling (clicks along it, one decode, taken back whole)."""
    from skimage.morphology import skeletonize

    painted = np.asarray(painted, dtype=bool)
    if painted.ndim != 2:
        raise PromptError(f"a brush stroke must be one (H, W) plane, got shape {painted.shape}")
    if not painted.any():
        return None
    skeleton = skeletonize(painted)
    ys, xs = np.nonzero(skeleton if skeleton.any() else painted)
    pts = np.stack([xs, ys], axis=1).astype(np.float64)
    if len(pts) == 1:
        return pts
    # start at an end of the band: the point farthest from the band's centre
    current = int(np.argmax(np.hypot(*(pts - pts.mean(axis=0)).T)))
    order, left = [current], np.ones(len(pts), bool)
    left[current] = False
    while left.any():  # nearest remaining skeleton pixel next: follows the band's centre line
        d = np.hypot(*(pts - pts[current]).T)
        d[~left] = np.inf
        current = int(np.argmin(d))
        order.append(current)
        left[current] = False
    chain = pts[order]
    keep = [0]
    for i in range(1, len(chain)):
        if np.hypot(*(chain[i] - chain[keep[-1]])) >= spacing:
            keep.append(i)
    if keep[-1] != len(chain) - 1:
        keep.append(len(chain) - 1)
    return chain[keep]
