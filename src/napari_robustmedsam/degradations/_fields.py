"""Small vectorised helpers that build 2D spatial fields (masks, gradients, smooth noise) for the artifacts."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def per_pixel(field: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Broadcast a (H, W) field against an image that may be (H, W) or (H, W, C)."""
    return field[..., None] if x.ndim == 3 else field


def grid(shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Row and column coordinates (float32, open grids) for a (H, W, ...) shape."""
    h, w = shape[0], shape[1]
    return np.arange(h, dtype=np.float32)[:, None], np.arange(w, dtype=np.float32)[None, :]


def radius(shape: tuple[int, ...], cy: float, cx: float) -> np.ndarray:
    """Distance in pixels from (cy, cx)."""
    yy, xx = grid(shape)
    return np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)


def soft_ellipse(
    shape: tuple[int, ...], cy: float, cx: float, ry: float, rx: float, angle: float, softness: float
) -> np.ndarray:
    """1 inside an ellipse, 0 outside, with a smooth edge of relative width `softness` (0..1)."""
    yy, xx = grid(shape)
    c, s = np.cos(angle), np.sin(angle)
    dy, dx = yy - cy, xx - cx
    u = (c * dx + s * dy) / max(rx, 1e-3)
    v = (-s * dx + c * dy) / max(ry, 1e-3)
    d = np.sqrt(u * u + v * v)
    edge = max(softness, 1e-3)
    return np.clip((1.0 + edge / 2 - d) / edge, 0.0, 1.0).astype(np.float32)


def smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _linear_taps(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices and weight of linear interpolation from n_in to n_out samples (pixel-centre aligned)."""
    pos = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    pos = np.clip(pos, 0.0, n_in - 1.0)
    lo = np.floor(pos).astype(np.intp)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, (pos - lo).astype(np.float32)


def _take(a: np.ndarray, index: np.ndarray, axis: int) -> np.ndarray:
    """``np.take(a, index, axis)`` of a float32 array; the trailing axes are gathered as one item per index
    (a void view), much faster than numpy's element-wise gather for channel-last (H, W, C) images."""
    trail = int(np.prod(a.shape[axis + 1 :], dtype=np.int64))
    if trail == 1:
        return np.take(a, index, axis=axis)
    lead = int(np.prod(a.shape[:axis], dtype=np.int64))
    items = np.ascontiguousarray(a).reshape(lead, a.shape[axis], trail).view(np.dtype((np.void, 4 * trail)))
    out = np.take(items[..., 0], index, axis=1).view(np.float32)
    return out.reshape(a.shape[:axis] + (len(index),) + a.shape[axis + 1 :])


def upsample(field: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Linear resampling of a smooth low-resolution field to `shape` (same number of dims): two gathers
    and a blend per axis, much faster than scipy.ndimage.zoom for large outputs (and no BLAS threads).
    The last axes are resampled first, so that the slow element-wise gathers run on the small array and
    the first axis (whole rows) last."""
    out = np.asarray(field, dtype=np.float32)
    for axis in reversed(range(len(shape))):
        n_out, n_in = shape[axis], out.shape[axis]
        if n_in == n_out:
            continue
        lo, hi, frac = _linear_taps(n_out, n_in)
        bshape = [1] * out.ndim
        bshape[axis] = n_out
        a, b = _take(out, lo, axis), _take(out, hi, axis)
        b -= a
        b *= frac.reshape(bshape)
        a += b
        out = a
    return np.ascontiguousarray(out, dtype=np.float32)


def smooth_noise(shape: tuple[int, ...], rng: np.random.Generator, cells: int = 4) -> np.ndarray:
    """A smooth random field in [0, 1] with about `cells` bumps along the longer side (cubic zoom of a
    coarse random grid to at most 64 px, then linear upsampling: fast at any size)."""
    h, w = shape[0], shape[1]
    gh = max(2, int(round(cells * h / max(h, w))) + 2)
    gw = max(2, int(round(cells * w / max(h, w))) + 2)
    coarse = rng.random((gh, gw)).astype(np.float32)
    mh, mw = min(h, 64), min(w, 64)
    mid = ndimage.zoom(coarse, (mh / gh, mw / gw), order=3, mode="nearest", grid_mode=True)
    field = upsample(mid, (h, w))
    lo, hi = float(field.min()), float(field.max())
    return (field - lo) / (hi - lo) if hi > lo else np.zeros((h, w), np.float32)


def luminance(x: np.ndarray) -> np.ndarray:
    """Gray level of a unit-space image (the image itself if gray)."""
    if x.ndim == 2:
        return x
    # explicit weighted sum: a matmul would go through (possibly multi-threaded) BLAS for no gain
    return np.float32(0.299) * x[..., 0] + np.float32(0.587) * x[..., 1] + np.float32(0.114) * x[..., 2]


def screen(x: np.ndarray, light: np.ndarray) -> np.ndarray:
    """Add light without exceeding white ('screen' blend): x + light * (1 - x)."""
    return x + per_pixel(light, x) * (1.0 - x)
