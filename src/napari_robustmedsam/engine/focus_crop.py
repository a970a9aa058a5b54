"""Focus crop: segment a small object in an enlarged crop of its surroundings instead of the whole image.

A SAM-family model sees every image at its fixed input size (LiteMedSAM: 256 px), so an object a few percent of
the image wide is a handful of input pixels and its mask comes out coarse or empty. Like FocalClick's focus view,
the box's surroundings are cropped and the crop alone is embedded and decoded; the model then sees the object at
several times the size. The crop's mask is pasted back into a full-size mask (nothing outside the crop).

The crop is a deterministic function of the object's box and the image size (:func:`plan_crop`), so an object's
later clicks, which feed back the previous low-resolution logits, are decoded in the same crop frame. Which
settings are the default, and what they gave, is in docs/results/focus-crop/.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class FocusCrop:
    """When and how an object is cropped (see :func:`plan_crop`)."""

    #: the crop's side as a multiple of the box's longer side (the context the model sees around the object)
    context: float = 3.0
    #: the crop's smallest side in pixels (a tiny box still gets some surroundings)
    min_side_px: int = 32
    #: the crop applies only when the box's longer side is at most this share of the image's longer side
    max_object_share: float = 0.25

    def __post_init__(self) -> None:
        if not self.context >= 1.0:
            raise ValueError(f"focus crop context must be at least 1 (the crop holds the box), got {self.context}")
        if self.min_side_px < 1:
            raise ValueError(f"focus crop min_side_px must be at least 1, got {self.min_side_px}")
        if not 0.0 < self.max_object_share <= 1.0:
            raise ValueError(f"focus crop max_object_share must be in (0, 1], got {self.max_object_share}")


#: the settings written in docs/results/focus-crop/rule.md before measuring
DEFAULT_FOCUS_CROP = FocusCrop()


@dataclass(frozen=True)
class CropPlan:
    """One crop: rows ``y0:y1`` and columns ``x0:x1`` of an image of ``image_shape`` (H, W)."""

    y0: int
    y1: int
    x0: int
    x1: int
    image_shape: tuple[int, int]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.y1 - self.y0, self.x1 - self.x0)

    @property
    def offset_xy(self) -> np.ndarray:
        return np.array([self.x0, self.y0], dtype=np.float64)

    def crop(self, array: np.ndarray) -> np.ndarray:
        """The crop of an (H, W, ...) image or mask."""
        return np.asarray(array)[self.y0:self.y1, self.x0:self.x1]

    def points_to_crop(self, points) -> np.ndarray:
        """(..., 2) points (x, y) in image pixels -> crop pixels."""
        return np.asarray(points, dtype=np.float64) - self.offset_xy

    def box_to_crop(self, box) -> np.ndarray:
        """A (4,) box (x0, y0, x1, y1) in image pixels -> crop pixels."""
        b = np.asarray(box, dtype=np.float64).reshape(-1, 2, 2) - self.offset_xy
        return b.reshape(np.shape(box))

    def contains_points(self, points) -> bool:
        """Whether every (x, y) point lies on a pixel of the crop."""
        p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        if p.shape[0] == 0:
            return True
        return bool(np.all((p[:, 0] >= self.x0) & (p[:, 0] < self.x1) & (p[:, 1] >= self.y0) & (p[:, 1] < self.y1)))

    def paste(self, crop_mask: np.ndarray) -> np.ndarray:
        """A (h, w) mask of the crop -> the (H, W) mask of the image, empty outside the crop."""
        crop_mask = np.asarray(crop_mask)
        if crop_mask.shape[:2] != self.shape:
            raise ValueError(f"a crop mask of shape {crop_mask.shape[:2]} does not fit the crop {self.shape}")
        out = np.zeros(self.image_shape, dtype=crop_mask.dtype)
        out[self.y0:self.y1, self.x0:self.x1] = crop_mask
        return out


def plan_crop(box, image_shape, settings: FocusCrop | None = DEFAULT_FOCUS_CROP) -> CropPlan | None:
    """The crop for an object with ``box`` (x0, y0, x1, y1, image pixels) in an image of ``image_shape``
    ((H, W, ...)), or None when the object is not small under ``settings`` (or ``settings`` is None), or when the
    crop would be the whole image anyway.

    The crop is a square of ``context`` times the box's longer side (at least ``min_side_px``) centred on the
    box, then clipped to the image: a function of the box and the image size only."""
    if settings is None or box is None:
        return None
    h, w = int(image_shape[0]), int(image_shape[1])
    x0, y0, x1, y1 = (float(v) for v in np.asarray(box, dtype=np.float64).reshape(4))
    side = max(x1 - x0, y1 - y0)
    if side <= 0 or side > settings.max_object_share * max(h, w):
        return None
    crop_side = max(float(settings.min_side_px), settings.context * side)
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    cx0 = max(0, math.floor(cx - crop_side / 2.0))
    cy0 = max(0, math.floor(cy - crop_side / 2.0))
    cx1 = min(w, math.ceil(cx + crop_side / 2.0))
    cy1 = min(h, math.ceil(cy + crop_side / 2.0))
    if cx1 - cx0 < 1 or cy1 - cy0 < 1 or (cx0 == 0 and cy0 == 0 and cx1 == w and cy1 == h):
        return None
    return CropPlan(int(cy0), int(cy1), int(cx0), int(cx1), (h, w))


def plan_crop_for_points(mask, points, image_shape, settings: FocusCrop | None = DEFAULT_FOCUS_CROP) -> CropPlan | None:
    """The crop for a point-only start whose mask on the whole image is ``mask`` ((H, W) bool), or None.

    A point says nothing about the object's size, so the first mask does: the box around the mask and the points
    ``(K, 2)`` (x, y) is planned like a box (:func:`plan_crop`), and the crop must hold every point. None when the
    mask is empty (nothing to size the crop by) or the object is not small."""
    mask = np.asarray(mask, dtype=bool)
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if settings is None or not mask.any() or pts.shape[0] == 0:
        return None
    ys, xs = np.nonzero(mask)
    box = (min(xs.min(), pts[:, 0].min()), min(ys.min(), pts[:, 1].min()),
           max(xs.max() + 1, pts[:, 0].max()), max(ys.max() + 1, pts[:, 1].max()))
    plan = plan_crop(box, image_shape, settings)
    return plan if plan is not None and plan.contains_points(pts) else None
