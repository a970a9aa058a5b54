"""Small numpy -> QPixmap renderings for in-widget previews (side-by-side masks)."""

from __future__ import annotations

import numpy as np
from qtpy.QtGui import QImage, QPixmap
from scipy import ndimage


def to_uint8(image: np.ndarray, limits: tuple[float, float] | None = None) -> np.ndarray:
    """Gray (H, W) or RGB (H, W, 3) -> uint8 RGB (H, W, 3) using ``limits`` (default: 1st-99th percentile)."""
    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim == 3 and arr.shape[-1] == 4:
        arr = arr[..., :3]
    if limits is None:
        lo, hi = np.percentile(arr, (1, 99))
    else:
        lo, hi = limits
    scaled = np.clip((arr - lo) / max(float(hi - lo), 1e-6), 0, 1) * 255
    out = scaled.astype(np.uint8)
    if out.ndim == 2:
        out = np.repeat(out[..., None], 3, axis=-1)
    return np.ascontiguousarray(out)


def overlay(rgb: np.ndarray, mask: np.ndarray, color=(255, 0, 255), alpha: float = 0.35) -> np.ndarray:
    out = rgb.astype(np.float32).copy()
    m = np.asarray(mask, bool)
    c = np.asarray(color, np.float32)
    out[m] = (1 - alpha) * out[m] + alpha * c
    edge = m & ~ndimage.binary_erosion(m, border_value=0)
    out[edge] = c
    return out.astype(np.uint8)


def crop_box(masks: list[np.ndarray], shape: tuple[int, int], margin: float = 0.35) -> tuple[slice, slice]:
    union = np.zeros(shape, bool)
    for m in masks:
        union |= np.asarray(m, bool)
    if not union.any():
        return slice(0, shape[0]), slice(0, shape[1])
    ys, xs = np.nonzero(union)
    h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    side = int(max(h, w) * (1 + 2 * margin)) + 8
    cy, cx = (ys.max() + ys.min()) // 2, (xs.max() + xs.min()) // 2
    y0 = int(np.clip(cy - side // 2, 0, max(0, shape[0] - side)))
    x0 = int(np.clip(cx - side // 2, 0, max(0, shape[1] - side)))
    return slice(y0, min(shape[0], y0 + side)), slice(x0, min(shape[1], x0 + side))


def pixmap(rgb: np.ndarray, size: int = 180) -> QPixmap:
    rgb = np.ascontiguousarray(rgb)
    h, w = rgb.shape[:2]
    qimage = QImage(rgb.data, w, h, 3 * w, QImage.Format.Format_RGB888).copy()
    pm = QPixmap.fromImage(qimage)
    from qtpy.QtCore import Qt

    return pm.scaled(size, size, Qt.AspectRatioMode.KeepAspectRatio, Qt.TransformationMode.SmoothTransformation)
