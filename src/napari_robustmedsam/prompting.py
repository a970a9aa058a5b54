"""Seeded prompt simulation from ground-truth masks: boxes, random points and corrective clicks.

No Qt, no torch: used by the evaluation (``python -m training.evaluate``) and by training.

Coordinates follow :meth:`napari_robustmedsam.engine.predictor.Predictor.predict`: (x, y) in pixels of the
original image. A point is a pixel index (x = column, y = row), like SAM's and micro_sam's point prompts
(SAM's prompt encoder adds the half-pixel offset itself). A box is ``(x0, y0, x1, y1)`` with exclusive
upper corners, i.e. the tight box of a mask spanning columns c0..c1 and rows r0..r1 is
``(c0, r0, c1 + 1, r1 + 1)`` - the convention of LiteMedSAM's official inference and of the project's tests.

Randomness comes only from an explicit ``numpy.random.Generator`` (never the global state); use
:func:`derive_seed` to get stable per-(image, object, prompt) seeds so that every model sees exactly the same
prompts.

Corrective clicks (:func:`corrective_click`): one click per step, placed in the largest connected error
region (false negatives -> positive click, false positives -> negative click; the larger component of either
kind wins, ties go to the false negatives). Inside that region the click is, by default (``strategy="center"``),
at the pixel farthest from the region's boundary (maximum of the Euclidean distance transform; among equally
deep pixels the most central one) - the
standard clicker of interactive-segmentation benchmarks (RITM / SAM's iterative evaluation); it is
deterministic given the prediction. ``strategy="random"`` samples the click uniformly inside that region
instead (micro_sam's sampling, restricted to the largest component).
:func:`micro_sam_corrective_clicks` wraps ``micro_sam.prompt_generators.IterativePromptGenerator`` for the
MedicoSAM / micro_sam protocol (one positive and one negative click per step, sampled from all error pixels).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = [
    "derive_seed",
    "rng_for",
    "tight_box",
    "jittered_box",
    "random_positive_points",
    "error_regions",
    "Click",
    "corrective_click",
    "micro_sam_corrective_clicks",
]


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from any printable parts (independent of PYTHONHASHSEED and platform)."""
    text = "\x1f".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little") >> 1


def rng_for(*parts: object) -> np.random.Generator:
    """``numpy.random.default_rng(derive_seed(*parts))``."""
    return np.random.default_rng(derive_seed(*parts))


def _as_mask(mask: np.ndarray) -> np.ndarray:
    m = np.asarray(mask).astype(bool, copy=False)
    if m.ndim != 2:
        raise ValueError(f"expected a 2D mask, got shape {m.shape}")
    return m


def tight_box(mask: np.ndarray) -> np.ndarray:
    """Tight box ``(x0, y0, x1 + 1, y1 + 1)`` (float64) of a non-empty 2D mask."""
    m = _as_mask(mask)
    ys, xs = np.nonzero(m)
    if ys.size == 0:
        raise ValueError("cannot take the box of an empty mask")
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float64)


def jittered_box(mask: np.ndarray, rng: np.random.Generator, max_shift: float = 0.1) -> np.ndarray:
    """Tight box with each side moved independently by ``U(-max_shift, max_shift)`` x the box's side length.

    Sides may move in or out, so the box can shrink, grow or shift (PGE-SAM's / BREPS' noisy user boxes).
    The result is rounded to whole pixels, clipped to the image and kept at least one pixel wide and high.
    """
    m = _as_mask(mask)
    x0, y0, x1, y1 = tight_box(m)
    w, h = x1 - x0, y1 - y0
    d = rng.uniform(-max_shift, max_shift, size=4)  # per side; positive = outwards
    nx0, ny0 = x0 - d[0] * w, y0 - d[1] * h
    nx1, ny1 = x1 + d[2] * w, y1 + d[3] * h
    H, W = m.shape
    nx0, nx1 = np.clip(np.round([nx0, nx1]), 0, W)
    ny0, ny1 = np.clip(np.round([ny0, ny1]), 0, H)
    if nx1 - nx0 < 1:
        nx0, nx1 = x0, x1
    if ny1 - ny0 < 1:
        ny0, ny1 = y0, y1
    return np.array([nx0, ny0, nx1, ny1], dtype=np.float64)


def random_positive_points(mask: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """``k`` points (k, 2) as (x, y) drawn uniformly from the mask's pixels, without replacement when the
    mask has at least ``k`` pixels (RobustMedSAM's K random positive points; K = 3 in its protocol)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    m = _as_mask(mask)
    ys, xs = np.nonzero(m)
    if ys.size == 0:
        raise ValueError("cannot sample points from an empty mask")
    idx = rng.choice(ys.size, size=k, replace=ys.size < k)
    return np.stack([xs[idx], ys[idx]], axis=1).astype(np.float64)


def error_regions(gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false negatives ``gt & ~pred``, false positives ``pred & ~gt``)."""
    g, p = _as_mask(gt), _as_mask(pred)
    if g.shape != p.shape:
        raise ValueError(f"ground truth {g.shape} and prediction {p.shape} differ in shape")
    return g & ~p, p & ~g


@dataclass(frozen=True)
class Click:
    """One corrective click: (x, y) pixel position, label 1 (positive) or 0 (negative), region size in px."""

    x: float
    y: float
    label: int
    region_px: int

    @property
    def point(self) -> np.ndarray:
        return np.array([self.x, self.y], dtype=np.float64)


def _largest_component(region: np.ndarray) -> tuple[np.ndarray, int]:
    labels, n = ndimage.label(region)  # face-connected components
    if n == 0:
        return region, 0
    sizes = np.bincount(labels.ravel())[1:]
    best = int(np.argmax(sizes)) + 1  # first of the largest (deterministic)
    return labels == best, int(sizes[best - 1])


def corrective_click(
    gt: np.ndarray,
    pred: np.ndarray,
    strategy: str = "center",
    rng: np.random.Generator | None = None,
) -> Click | None:
    """The next simulated user click correcting ``pred`` towards ``gt``; None when there is no error.

    The largest face-connected component among the false-negative and false-positive regions is chosen
    (false negatives win ties); the click is positive inside false negatives, negative inside false
    positives. ``strategy="center"``: the component's pixel farthest from its boundary (distance
    transform maximum; the image edge counts as boundary; among equally deep pixels the one nearest their
    mean position, first in row-major order on remaining ties).
    ``strategy="random"``: a uniformly random pixel of the component (needs ``rng``).
    """
    if strategy not in ("center", "random"):
        raise ValueError(f"unknown click strategy {strategy!r}; expected 'center' or 'random'")
    fn, fp = error_regions(gt, pred)
    fn_comp, fn_size = _largest_component(fn)
    fp_comp, fp_size = _largest_component(fp)
    if fn_size == 0 and fp_size == 0:
        return None
    if fn_size >= fp_size:
        comp, size, label = fn_comp, fn_size, 1
    else:
        comp, size, label = fp_comp, fp_size, 0
    if strategy == "center":
        # pad so that the image border counts as the region's boundary
        dist = ndimage.distance_transform_edt(np.pad(comp, 1))[1:-1, 1:-1]
        ys, xs = np.nonzero(dist >= dist.max() - 1e-9)
        # several equally deep pixels (thin or square regions): the one nearest their mean position
        i = int(np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2))
        y, x = ys[i], xs[i]
    else:
        if rng is None:
            raise ValueError("strategy='random' needs an rng")
        ys, xs = np.nonzero(comp)
        i = int(rng.integers(ys.size))
        y, x = ys[i], xs[i]
    return Click(float(x), float(y), label, size)


def micro_sam_corrective_clicks(gt: np.ndarray, pred: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """micro_sam's ``IterativePromptGenerator`` on one object: one positive and one negative click.

    Returns (points (2, 2) as (x, y), labels (2,)). micro_sam samples with the global ``numpy.random``
    state; it is seeded with ``seed`` here and restored afterwards so that callers stay deterministic.
    """
    import torch
    from micro_sam.prompt_generators import IterativePromptGenerator

    g, p = _as_mask(gt), _as_mask(pred)
    state = np.random.get_state()
    try:
        np.random.seed(seed % (2**32))
        coords, labels, _, _ = IterativePromptGenerator()(
            torch.from_numpy(g[None, None].astype(np.float32)), torch.from_numpy(p[None, None].astype(np.float32))
        )
    finally:
        np.random.set_state(state)
    return coords[0].numpy().astype(np.float64), labels[0].numpy().astype(np.int64)
