"""Make every corrective click take effect, at the image's full resolution (the "click refinement").

Why: the models decode on a 256 x 256 logit grid and often return the same mask after a corrective click (the
untrained default LiteMedSAM ignores most of them, docs/results/click-guard); the click guard and the local
corrections only limit what a click may change. This stage runs after the model, on the full-resolution mask
the user sees, and works with every model: around each click whose pixel does not have the clicked label yet, a
disk is re-decided from the image itself, with the click as a hard seed. Outside the disks nothing changes.

- The disk's radius is ``reach`` times the click's distance to the nearest mask pixel of its label (a click in
  the middle of a wide missed part reaches further than one next to the edge), within ``min_radius_px`` and
  ``max_radius_fraction`` of the image side.
- Every click of the object inside the window is a hard seed with its label; on the same pixel the last click
  wins. Outside the disk the window's pixels are seeds with the current mask's label.
- ``random-walker``: the unknown pixels take the label that a random walk from them reaches first (Grady 2006,
  ``skimage.segmentation.random_walker``): image edges decide, the seeds' distance breaks ties.
- ``graph-cut``: a minimum cut (PyMaxflow) with the model's logits (or the mask's signed distance) as the unary
  term, pulled towards the clicks' labels near them, and image-edge-weighted smoothness.
- ``learned``: a small network trained on simulated corrections of the development images decides the disk from
  the image, the current mask and the clicks (:mod:`.learned_refinement`; FocalClick's local refinement, learned).
- ``...-directed``: the same, but a positive click only adds pixels of its disk and a negative click only removes
  them (as the click guard does for the model's change): re-deciding a whole disk can otherwise also take pixels
  away from the object a positive click asked more of.

The image is smoothed first (Gaussian) so that the noise of degraded images does not make false edges.
The state across clicks: the mask shown before the click, with the model's new change applied on top
(:func:`apply_model_change`), is what the next refinement starts from, so an earlier click's effect stays. That
change is kept near the new clicks (``model_reach``): a positive click's within ``model_reach`` times its distance
to the shown mask, a negative click's within that times its distance to the shown background. Why: after a point
start the model's own mask is often empty while the shown one is not, so the click guard (which measures on the
model's mask) does not bound the model's next change, and a mask that balloons far from the click was what made
objects lose Dice (docs/results/click-refinement/rule-shown-reach.md).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from scipy import ndimage

from .click_guard import click_arrays, edge_distance

#: the solvers that re-decide a click's disk
REFINEMENT_SOLVERS = ("random-walker", "graph-cut", "learned")
#: a solver's word with this ending keeps the change in the click's direction (RefinementSettings.keep_direction)
DIRECTED = "-directed"
#: command-line words; "off" keeps the model's mask
REFINEMENT_METHODS = ("off", *REFINEMENT_SOLVERS, *(s + DIRECTED for s in REFINEMENT_SOLVERS))


@dataclass(frozen=True)
class RefinementSettings:
    """How the click refinement works (see the module docstring); ``method`` "off" or one of REFINEMENT_SOLVERS."""

    method: str = "random-walker"
    keep_direction: bool = False
    reach: float = 2.0
    min_radius_px: float = 6.0
    max_radius_fraction: float = 0.12
    seed_radius_px: int = 1
    smoothing_sigma: float = 1.0
    beta: float = 130.0  # random walker's edge sensitivity (skimage's scale)
    cut_smoothness: float = 2.0  # graph cut: weight of a boundary step between equal pixels
    click_pull: float = 4.0  # graph cut: log-odds towards a click's label at the click, falling off over the disk
    model_reach: float | None = 2.0  # the model's change stays this many click-to-shown-mask distances near a click

    def __post_init__(self):
        if self.method not in ("off", *REFINEMENT_SOLVERS):
            raise ValueError(f"click refinement {self.method!r}: use one of {', '.join(REFINEMENT_METHODS)}")
        if not self.reach > 0 or not self.min_radius_px > 0 or not 0 < self.max_radius_fraction <= 1:
            raise ValueError("click refinement reach, min_radius_px and max_radius_fraction must be greater than 0")
        if self.model_reach is not None and not self.model_reach > 0:
            raise ValueError(f"click refinement model_reach must be greater than 0 or None, got {self.model_reach}")

    @property
    def active(self) -> bool:
        return self.method != "off"

    @property
    def word(self) -> str:
        """The command-line word of these settings' method (REFINEMENT_METHODS)."""
        return self.method + (DIRECTED if self.keep_direction and self.active else "")


def as_refinement(value: str | RefinementSettings | None) -> RefinementSettings | None:
    """A method word, settings, or None/"off" (no refinement) as settings or None."""
    if value is None:
        return None
    if isinstance(value, str):
        if value not in REFINEMENT_METHODS:
            raise ValueError(f"click refinement {value!r}: use one of {', '.join(REFINEMENT_METHODS)}")
        directed = value.endswith(DIRECTED)
        value = RefinementSettings(method=value[: -len(DIRECTED)] if directed else value, keep_direction=directed)
    return value if value.active else None


def click_pixel(point, shape: tuple[int, int]) -> tuple[int, int]:
    """(row, column) of the pixel a click (x, y) falls on, clipped into the image (napari's pixel centres are
    integers, as in the evaluation's honoured-click check)."""
    h, w = shape
    x, y = float(point[0]), float(point[1])
    return min(max(int(round(y)), 0), h - 1), min(max(int(round(x)), 0), w - 1)


def apply_model_change(shown: np.ndarray | None, model_before: np.ndarray | None, model_after: np.ndarray,
                       near: tuple | None = None) -> np.ndarray:
    """The mask shown before a click with the model's change of that click applied on top: where the model's mask
    changed, the new label; elsewhere what was shown (so earlier refinements stay). Without a previous state, the
    model's mask. ``near`` (points, labels, n_new, factor): only the change near the new clicks lands
    (:func:`near_new_clicks`)."""
    if shown is None or model_before is None or shown.shape != model_after.shape:
        return np.asarray(model_after, dtype=bool).copy()
    out = np.asarray(shown, dtype=bool).copy()
    after = np.asarray(model_after, dtype=bool)
    ys, xs = np.nonzero(model_before != after)
    if near is not None and ys.size:
        keep = near_new_clicks(out, ys, xs, after[ys, xs], *near)
        ys, xs = ys[keep], xs[keep]
    out[ys, xs] = after[ys, xs]
    return out


def near_new_clicks(shown: np.ndarray, ys: np.ndarray, xs: np.ndarray, adds: np.ndarray, points, labels,
                    n_new: int, factor: float) -> np.ndarray:
    """Which of the changed pixels (``ys``, ``xs``; ``adds``: whether each becomes foreground) a new click allows:
    an addition within ``factor`` times a new positive click's distance to the ``shown`` mask, a removal within
    ``factor`` times a new negative click's distance to the shown background. A click whose label has no pixel in
    ``shown`` reaches every changed pixel of its direction. Only the changed pixels are measured, so the cost
    follows the change, not the image."""
    keep = np.zeros(ys.shape, dtype=bool)
    pts, labs = click_arrays(points, labels, n_new)
    for k in range(pts.shape[0] - n_new, pts.shape[0]):
        x, y = float(pts[k][0]), float(pts[k][1])
        # the click guard's distance (pixel centres; inf without such a pixel, which reaches everywhere)
        reach = factor * edge_distance(shown, pts[k], labs[k])
        keep |= (adds if labs[k] == 1 else ~adds) & ((xs + 0.5 - x) ** 2 + (ys + 0.5 - y) ** 2 <= reach ** 2)
    return keep


def _channels_last(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The image as (H, W, C) (a view; at most 3 channels)."""
    img = np.asarray(image)
    if img.ndim == 2:
        img = img[..., None]
    elif img.ndim == 3 and img.shape[:2] != tuple(shape) and img.shape[1:] == tuple(shape):  # channels first
        img = np.moveaxis(img, 0, -1)
    if img.ndim != 3 or img.shape[:2] != tuple(shape):
        raise ValueError(f"image of shape {np.shape(image)} does not match the mask's {tuple(shape)}: give the "
                         "image the mask was made on")
    return img[..., :3]


def _radius(mask: np.ndarray, row: int, col: int, label: int, settings: RefinementSettings) -> float:
    """The click's disk radius: reach x distance to the nearest mask pixel with the click's label, bounded."""
    h, w = mask.shape
    cap = max(settings.min_radius_px, settings.max_radius_fraction * max(h, w))
    same = mask if label == 1 else ~mask
    # only a window of the cap's size can hold a nearer pixel than the cap allows
    r = int(np.ceil(cap / settings.reach)) + 1
    y0, y1, x0, x1 = max(row - r, 0), min(row + r + 1, h), max(col - r, 0), min(col + r + 1, w)
    ys, xs = np.nonzero(same[y0:y1, x0:x1])
    if ys.size == 0:
        return cap
    dist = float(np.sqrt(np.min((ys + y0 - row) ** 2 + (xs + x0 - col) ** 2)))
    return float(np.clip(settings.reach * dist, settings.min_radius_px, cap))


def refine_clicks(
    image: np.ndarray,
    mask: np.ndarray,
    points,
    labels,
    n_new: int,
    settings: str | RefinementSettings = "random-walker",
    prior_logits: np.ndarray | None = None,
) -> np.ndarray:
    """``mask`` (H, W) bool with every one of the last ``n_new`` clicks honoured and its surroundings re-decided at
    full resolution. ``points`` (K, 2) (x, y) pixels, ``labels`` (K,) 1/0: all of the object's clicks, in order
    (earlier ones stay seeds; on one pixel the last click wins). ``prior_logits`` (H, W): the model's logits at
    full resolution, the graph cut's unary term (without them, the mask's signed distance). A click whose pixel
    already has its label changes nothing. Returns a new array; the inputs are not modified."""
    settings = as_refinement(settings)
    out = np.asarray(mask, dtype=bool).copy()
    pts, labs = click_arrays(points, labels, n_new)
    if settings is None or n_new == 0 or out.size == 0:
        return out
    shape = out.shape
    pixels = [click_pixel(p, shape) for p in pts]
    # the last click on a pixel wins: earlier clicks there are dropped from the seeds
    last_on: dict[tuple[int, int], int] = {}
    for k, px in enumerate(pixels):
        last_on[px] = k
    live = sorted(last_on.values())
    features = None
    for k in range(pts.shape[0] - n_new, pts.shape[0]):
        if last_on[pixels[k]] != k:
            continue
        row, col = pixels[k]
        if out[row, col] == bool(labs[k]):  # already honoured: nothing to change
            continue
        if features is None:
            features = _channels_last(image, shape)
        _refine_one(features, out, row, col, labs[k], click_window(out, row, col, labs[k], settings),
                    [(pixels[j], labs[j]) for j in live], settings, prior_logits)
    # whatever the solver decided, every live click keeps its label
    for j in live:
        out[pixels[j]] = bool(labs[j])
    return out


class ClickWindow(NamedTuple):
    bounds: tuple[int, int, int, int]  # y0, y1, x0, x1 in the image
    disk: np.ndarray  # bool over the window: the pixels the click may change
    radius: float


def click_window(mask: np.ndarray, row: int, col: int, label: int, settings: RefinementSettings) -> ClickWindow:
    """The window that a click on pixel (row, col) with ``label`` re-decides, and its disk: what every solver sees,
    and what the learned refiner is trained on."""
    radius = _radius(mask, row, col, label, settings)
    h, w = mask.shape
    r = int(np.ceil(radius)) + 2  # a ring of fixed pixels around the disk
    y0, y1, x0, x1 = max(row - r, 0), min(row + r + 1, h), max(col - r, 0), min(col + r + 1, w)
    yy, xx = np.ogrid[y0:y1, x0:x1]
    return ClickWindow((y0, y1, x0, x1), (yy - row) ** 2 + (xx - col) ** 2 <= radius ** 2, radius)


def _refine_one(features, out, row, col, label, window: ClickWindow, seeds, settings, prior_logits) -> None:
    (y0, y1, x0, x1), disk, radius = window
    win = out[y0:y1, x0:x1]
    yy, xx = np.mgrid[y0:y1, x0:x1]
    fixed_fg = win & ~disk
    fixed_bg = ~win & ~disk
    s = settings.seed_radius_px
    for (sr, sc), lab in seeds:  # in click order: a later click paints over an earlier one
        if y0 - s <= sr < y1 + s and x0 - s <= sc < x1 + s:
            near = (np.abs(yy - sr) <= s) & (np.abs(xx - sc) <= s)
            fixed_fg = np.where(near, lab == 1, fixed_fg)
            fixed_bg = np.where(near, lab == 0, fixed_bg)
    if not fixed_fg.any() or not fixed_bg.any():  # one label only: the disk takes it
        fg = fixed_fg | (disk & ~fixed_bg) if fixed_fg.any() else np.zeros_like(disk)
    elif settings.method == "learned":
        from .learned_refinement import refiner_for

        in_window = [(sr - y0, sc - x0, lab) for (sr, sc), lab in seeds if y0 <= sr < y1 and x0 <= sc < x1]
        fg = refiner_for().decide(features[y0:y1, x0:x1], win, disk, in_window)
    else:
        fg = _solve(features[y0:y1, x0:x1], win, fixed_fg, fixed_bg, yy, xx, row, col, radius, seeds, settings,
                    None if prior_logits is None else np.asarray(prior_logits, dtype=np.float32)[y0:y1, x0:x1])
    if settings.keep_direction:
        fg = (win | fg) if label == 1 else (win & fg)
    win[disk] = fg[disk]


def _solve(window, win, fixed_fg, fixed_bg, yy, xx, row, col, radius, seeds, settings, prior) -> np.ndarray:
    """The solver's foreground over the window."""
    data = window.astype(np.float32)
    # edge strength relative to the window's contrast, so that a dim or a low-contrast image behaves the same
    data = (data - data.mean()) / max(float(data.std()), 1e-6)
    if settings.smoothing_sigma > 0:
        data = ndimage.gaussian_filter(data, (settings.smoothing_sigma, settings.smoothing_sigma, 0))
    if settings.method == "random-walker":
        return _random_walker(data, fixed_fg, fixed_bg, settings)
    return _graph_cut(data, win, prior, fixed_fg, fixed_bg, yy, xx, row, col, radius, seeds, settings)


def _random_walker(data, fixed_fg, fixed_bg, settings) -> np.ndarray:
    from skimage.segmentation import random_walker

    seeds = np.zeros(fixed_fg.shape, dtype=np.int32)
    seeds[fixed_bg] = 1
    seeds[fixed_fg] = 2
    if (seeds > 0).all():
        return fixed_fg
    with warnings.catch_warnings():  # the solver's tolerance can leave probabilities a hair outside 0..1
        warnings.simplefilter("ignore", UserWarning)
        out = random_walker(data, seeds, beta=settings.beta, mode="cg_j", tol=1e-3, channel_axis=-1)
    return out == 2


def _graph_cut(data, current, prior, fixed_fg, fixed_bg, yy, xx, row, col, radius, seeds, settings) -> np.ndarray:
    import maxflow

    # unary term: the model's log-odds where they agree with the current mask, else the mask's signed distance
    inside = ndimage.distance_transform_edt(current)
    outside = ndimage.distance_transform_edt(~current)
    odds = np.clip(inside - outside, -4.0, 4.0).astype(np.float32)
    if prior is not None and prior.shape == current.shape:
        agree = (prior > 0) == current
        odds = np.where(agree, np.clip(prior, -8.0, 8.0), odds)
    sigma = max(radius / 2.0, 1.0)
    for (sr, sc), lab in seeds:  # near a click its label replaces the model's (which the click says is wrong)
        near = np.exp(-((yy - sr) ** 2 + (xx - sc) ** 2) / (2 * sigma ** 2))
        odds = (1 - near) * odds + near * (1.0 if lab == 1 else -1.0) * settings.click_pull
    # contrast-sensitive smoothness between 4-neighbours (the same scaling as the random walker's beta)
    scale = 10.0  # the window is standardised: skimage's beta / (10 x std)
    g = maxflow.Graph[float]()
    ids = g.add_grid_nodes(current.shape)
    for axis, structure in ((1, np.array([[0, 0, 0], [0, 0, 1], [0, 0, 0]])),
                            (0, np.array([[0, 0, 0], [0, 0, 0], [0, 1, 0]]))):
        diff = np.sum(np.diff(data, axis=axis) ** 2, axis=-1)
        weight = settings.cut_smoothness * np.exp(-settings.beta / scale * diff)
        pad = [(0, 0), (0, 0)]
        pad[axis] = (0, 1)
        g.add_grid_edges(ids, weights=np.pad(weight, pad), structure=structure, symmetric=True)
    big = 1e6
    # source = foreground: the cost of background is the foreground log-odds where positive
    src = np.where(fixed_fg, big, np.maximum(odds, 0))
    snk = np.where(fixed_bg, big, np.maximum(-odds, 0))
    g.add_grid_tedges(ids, src, snk)
    g.maxflow()
    return ~g.get_grid_segments(ids)  # False = source side = foreground


def refine_prediction(
    image: np.ndarray,
    shown_before: np.ndarray | None,
    model_before: np.ndarray | None,
    model_after: np.ndarray,
    points: Sequence | np.ndarray,
    labels: Sequence | np.ndarray,
    n_new: int,
    settings: str | RefinementSettings | None,
    prior_logits: np.ndarray | None = None,
) -> np.ndarray:
    """One step of the click path after the model: the shown mask with the model's change applied
    (:func:`apply_model_change`; with a refinement on, only near the new clicks: ``model_reach``), then the new
    clicks refined (:func:`refine_clicks`). ``settings`` None/"off": the model's change only."""
    settings = as_refinement(settings)
    near = None
    if settings is not None and settings.model_reach is not None and n_new:
        near = (points, labels, n_new, settings.model_reach)
    base = apply_model_change(shown_before, model_before, model_after, near)
    if settings is None or n_new == 0:
        return base
    return refine_clicks(image, base, points, labels, n_new, settings, prior_logits)
