"""Segmentation metrics: Dice, IoU, NSD (normalised surface distance) and HD95, for 2D and 3D masks.

No Qt, no torch: used by the evaluation (``python -m training.evaluate``), by training and by the annotator.

Definitions (P = predicted mask, G = ground truth; both boolean arrays of the same shape):

- ``dice = 2 |P & G| / (|P| + |G|)``, ``iou = |P & G| / |P | G|``.
- Surface of a mask: its foreground pixels that have at least one background neighbour in the
  face-connected (4-connected in 2D, 6 in 3D) sense; everything outside the array counts as background,
  so an object cut by the image edge has a surface along that edge.
- Surface distances: for every surface pixel of P the Euclidean distance (pixel centres, scaled by
  ``spacing``) to the nearest surface pixel of G, and vice versa (``scipy.ndimage.distance_transform_edt``).
- ``nsd`` (RobustMedSAM supplement, Eq. S3): ``(|{x in dP : d(x, dG) <= tau}| + |{y in dG : d(y, dP) <= tau}|)
  / (|dP| + |dG|)`` with ``tau = tolerance_px`` (2 px in the seed papers). Every surface pixel weighs the same
  (DeepMind's ``surface-distance`` package weights surface elements by their area; on pixel grids the two
  agree closely but not exactly).
- ``hd95``: ``max(P95(d(dP -> dG)), P95(d(dG -> dP)))``, the larger of the two directed 95th percentiles,
  as MONAI's ``compute_hausdorff_distance(percentile=95)`` and DeepMind's ``compute_robust_hausdorff``;
  numpy's default (linear) percentile interpolation. In pixels, or in the units of ``spacing``.

Empty-mask conventions (explicit, so that failures are counted rather than silently dropped from means):

==================  =====  =====  =====  ===========================================
case                Dice   IoU    NSD    HD95
==================  =====  =====  =====  ===========================================
both empty          1      1      1      0
exactly one empty   0      0      0      the image diagonal (``empty_distance``), finite
==================  =====  =====  =====  ===========================================

A missed object therefore gets the worst distance a mask in that image can have instead of NaN or inf;
pass ``empty_distance=float('nan')`` to :func:`hd95` to get NaN instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

__all__ = [
    "dice",
    "iou",
    "nsd",
    "hd95",
    "surface",
    "surface_distances",
    "segmentation_metrics",
    "METRIC_NAMES",
]

METRIC_NAMES: tuple[str, ...] = ("dice", "iou", "nsd", "hd95")


def _pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(pred).astype(bool, copy=False)
    g = np.asarray(gt).astype(bool, copy=False)
    if p.shape != g.shape:
        raise ValueError(f"prediction shape {p.shape} differs from ground-truth shape {g.shape}")
    if p.ndim < 1:
        raise ValueError("masks must have at least one dimension")
    return p, g


def _spacing(spacing: float | Sequence[float] | None, ndim: int) -> tuple[float, ...]:
    if spacing is None:
        return (1.0,) * ndim
    if np.isscalar(spacing):
        return (float(spacing),) * ndim
    sp = tuple(float(s) for s in spacing)
    if len(sp) != ndim:
        raise ValueError(f"spacing {sp} has {len(sp)} entries for {ndim}D masks")
    if any(s <= 0 for s in sp):
        raise ValueError(f"spacing must be positive, got {sp}")
    return sp


def _diagonal(shape: tuple[int, ...], spacing: tuple[float, ...]) -> float:
    return float(math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing))))


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice coefficient; 1.0 when both masks are empty, 0.0 when exactly one is."""
    p, g = _pair(pred, gt)
    denom = int(p.sum()) + int(g.sum())
    if denom == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(p & g)) / denom


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """Intersection over union (Jaccard); 1.0 when both masks are empty, 0.0 when exactly one is."""
    p, g = _pair(pred, gt)
    union = int(np.count_nonzero(p | g))
    if union == 0:
        return 1.0
    return int(np.count_nonzero(p & g)) / union


def surface(mask: np.ndarray) -> np.ndarray:
    """Boolean surface (boundary) pixels of a mask: foreground with a face-connected background neighbour.

    Outside the array counts as background (``border_value=0``).
    """
    m = np.asarray(mask).astype(bool, copy=False)
    if not m.any():
        return np.zeros_like(m)
    structure = ndimage.generate_binary_structure(m.ndim, 1)
    eroded = ndimage.binary_erosion(m, structure=structure, border_value=0)
    return m & ~eroded


def _crop_to_union(p: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Crop both masks to the bounding box of their union plus one pixel (clipped to the array).

    Distances between surfaces do not change: every surface pixel lies in the box, and the one-pixel
    margin (background) keeps the surface definition identical to the uncropped one, while pixels on the
    array edge keep "outside = background".
    """
    union = p | g
    idx = np.nonzero(union)
    slices = tuple(slice(max(int(i.min()) - 1, 0), min(int(i.max()) + 2, n)) for i, n in zip(idx, union.shape))
    return p[slices], g[slices]


def surface_distances(
    pred: np.ndarray, gt: np.ndarray, spacing: float | Sequence[float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances (d(dP -> dG), d(dG -> dP)) as 1D float arrays.

    Both masks must be non-empty (the empty cases have no distances; see the module conventions).
    """
    p, g = _pair(pred, gt)
    if not p.any() or not g.any():
        raise ValueError("surface distances need two non-empty masks")
    sp = _spacing(spacing, p.ndim)
    p, g = _crop_to_union(p, g)
    sp_p, sp_g = surface(p), surface(g)
    # distance_transform_edt gives, for every non-zero pixel, the distance to the nearest zero pixel.
    dist_to_g = ndimage.distance_transform_edt(~sp_g, sampling=sp)
    dist_to_p = ndimage.distance_transform_edt(~sp_p, sampling=sp)
    return dist_to_g[sp_p].astype(np.float64), dist_to_p[sp_g].astype(np.float64)


def nsd(
    pred: np.ndarray,
    gt: np.ndarray,
    tolerance_px: float = 2.0,
    spacing: float | Sequence[float] | None = None,
) -> float:
    """Normalised surface distance (surface Dice) at tolerance ``tolerance_px`` (in ``spacing`` units).

    1.0 when both masks are empty, 0.0 when exactly one is.
    """
    if tolerance_px < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance_px}")
    p, g = _pair(pred, gt)
    p_any, g_any = bool(p.any()), bool(g.any())
    if not p_any and not g_any:
        return 1.0
    if not p_any or not g_any:
        return 0.0
    d_pg, d_gp = surface_distances(p, g, spacing)
    # A small epsilon keeps exact lattice distances (e.g. sqrt(2) * 1.414...) from failing a <= test by rounding.
    tol = float(tolerance_px) + 1e-9
    hits = int(np.count_nonzero(d_pg <= tol)) + int(np.count_nonzero(d_gp <= tol))
    return hits / (d_pg.size + d_gp.size)


def hd95(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing: float | Sequence[float] | None = None,
    empty_distance: float | None = None,
) -> float:
    """95th-percentile symmetric Hausdorff distance (max of the two directed 95th percentiles).

    0.0 when both masks are empty. When exactly one is empty: ``empty_distance`` if given, else the
    diagonal of the array (in ``spacing`` units) - the largest distance possible inside the image.
    """
    p, g = _pair(pred, gt)
    p_any, g_any = bool(p.any()), bool(g.any())
    if not p_any and not g_any:
        return 0.0
    if not p_any or not g_any:
        if empty_distance is not None:
            return float(empty_distance)
        return _diagonal(p.shape, _spacing(spacing, p.ndim))
    d_pg, d_gp = surface_distances(p, g, spacing)
    return float(max(np.percentile(d_pg, 95), np.percentile(d_gp, 95)))


def segmentation_metrics(
    pred: np.ndarray,
    gt: np.ndarray,
    tolerance_px: float = 2.0,
    spacing: float | Sequence[float] | None = None,
) -> dict[str, float]:
    """All four metrics at once (the surface distances are computed once): keys of :data:`METRIC_NAMES`."""
    p, g = _pair(pred, gt)
    out = {"dice": dice(p, g), "iou": iou(p, g)}
    p_any, g_any = bool(p.any()), bool(g.any())
    if p_any and g_any:
        d_pg, d_gp = surface_distances(p, g, spacing)
        tol = float(tolerance_px) + 1e-9
        out["nsd"] = (int(np.count_nonzero(d_pg <= tol)) + int(np.count_nonzero(d_gp <= tol))) / (d_pg.size + d_gp.size)
        out["hd95"] = float(max(np.percentile(d_pg, 95), np.percentile(d_gp, 95)))
    else:
        out["nsd"] = nsd(p, g, tolerance_px, spacing)
        out["hd95"] = hd95(p, g, spacing)
    return out
