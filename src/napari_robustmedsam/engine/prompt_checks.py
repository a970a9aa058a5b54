"""Prompt checks that need no model: callers run them before loading a model or computing an embedding.

``check_prompts(points, point_labels, boxes, image_size)`` raises :class:`~napari_robustmedsam.errors.PromptError`
(one line naming the prompt and what to give instead) for anything the predictor would refuse: text or other
non-numbers, wrong shapes, NaN/inf, labels other than 0/1, inverted boxes, coordinates outside the image.
"""

from __future__ import annotations

import numpy as np

from ..errors import PromptError

# Points and boxes may touch the border; allow half a pixel of slack for napari's pixel-centre coordinates.
EDGE_TOLERANCE = 0.5

_SHAPES = {2: "(x, y)", 4: "(x0, y0, x1, y1)"}


def as_prompt_array(values, last: int, name: str) -> np.ndarray | None:
    """``values`` as a float array whose last axis has ``last`` coordinates (None when empty)."""
    if values is None:
        return None
    what = _SHAPES.get(last, f"{last} numbers")
    if isinstance(values, (str, bytes)):
        raise PromptError(f"{name} must be numbers {what}, got the text {values!r}")
    try:
        a = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise PromptError(f"{name} must be numbers {what}, got {values!r}") from None
    if a.size == 0:
        return None
    if a.ndim == 0 or a.shape[-1] != last:
        raise PromptError(f"{name} must have {last} coordinates {what} per entry, got an array of shape {a.shape}")
    if not np.isfinite(a).all():
        raise PromptError(f"{name} contain NaN or inf coordinates")
    return a


def check_inside(coords: np.ndarray, image_size: tuple[int, int], name: str) -> None:
    """Refuse (x, y) coordinates outside an image of ``image_size`` = (height, width)."""
    h, w = int(image_size[0]), int(image_size[1])
    xs, ys = coords[..., 0], coords[..., 1]
    bad = (xs < -EDGE_TOLERANCE) | (ys < -EDGE_TOLERANCE) | (xs > w + EDGE_TOLERANCE) | (ys > h + EDGE_TOLERANCE)
    if bad.any():
        first = coords[bad][0] if coords[bad].ndim > 1 else coords[bad]
        raise PromptError(
            f"{name} outside the image: ({first[0]:g}, {first[1]:g}) is not within x 0..{w}, y 0..{h} "
            "(coordinates are (x, y) in pixels of the original image)"
        )


def check_prompts(points=None, point_labels=None, boxes=None, image_size: tuple[int, int] | None = None) -> None:
    """Everything about a prompt that can be checked without a model (see the module docstring)."""
    pts = as_prompt_array(points, 2, "points")
    bxs = as_prompt_array(boxes, 4, "boxes")
    if pts is None and bxs is None:
        raise PromptError("empty prompt: give at least one point or a box")
    n_objects = 1
    if pts is not None:
        if pts.ndim == 2:
            pts = pts[None]
        if pts.ndim != 3:
            raise PromptError(f"points must be (P, 2) or (N, P, 2), got shape {pts.shape}")
        if point_labels is not None:
            try:
                labels = np.asarray(point_labels, dtype=np.float64)
            except (TypeError, ValueError):
                raise PromptError(f"point labels must be 1 (positive) or 0 (negative), got {point_labels!r}") from None
            if labels.ndim == 1:
                labels = labels[None]
            if labels.shape != pts.shape[:2]:
                raise PromptError(f"point_labels shape {labels.shape} does not match points shape {pts.shape}")
            if not np.isin(labels, (0, 1)).all():
                raise PromptError("point labels must be 1 (positive) or 0 (negative)")
        if image_size is not None:
            check_inside(pts, image_size, "point")
        n_objects = pts.shape[0]
    if bxs is not None:
        if bxs.ndim == 1:
            bxs = bxs[None]
        if bxs.ndim != 2:
            raise PromptError(f"boxes must be (4,) or (N, 4), got shape {bxs.shape}")
        inverted = (bxs[:, 2] <= bxs[:, 0]) | (bxs[:, 3] <= bxs[:, 1])
        if inverted.any():
            b = bxs[inverted][0]
            raise PromptError(
                f"box {tuple(float(v) for v in b)} is inverted or empty: give (x0, y0, x1, y1) with x1 > x0 and y1 > y0"
            )
        if image_size is not None:
            check_inside(bxs.reshape(-1, 2, 2), image_size, "box corner")
        if pts is not None and bxs.shape[0] != n_objects:
            raise PromptError(f"{bxs.shape[0]} boxes but {n_objects} point sets: give one of each per object")
