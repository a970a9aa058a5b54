"""Simulated corrective clicks for training the learned click refiner (``python -m training.fit_refiner``).

Use: :func:`build_samples` turns a medseg-layout folder into the refiner's inputs and targets. Each sample is what
the annotator's click refinement hands the network (``engine.learned_refinement.window_inputs`` on the window and
disk of ``engine.click_refinement.click_window``), so training and use see the same thing.

How a sample is made, for one object of one image (clean, or degraded by the degradation library at LQ-1..LQ-3):
1. a "shown" mask with the errors a user corrects: a box start's (the object grown or shrunk, a bite taken out of
   it, a blob added beside it), a point start's (empty, or a part of the object, sometimes with a leak), or a late
   step's (the object with small errors);
2. earlier clicks that were honoured already (inside the object, positive; outside it, negative);
3. the new click at the centre of the largest error, as the evaluation places it; its label is the ground truth's.
The target is the ground truth over the click's window; the loss counts only the disk that the click may change.
The masks are simulated, not any model's, so the refiner serves every model (FocalClick trains its refiner on a
segmenter's masks instead).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from napari_robustmedsam.degradations import degrade_random
from napari_robustmedsam.engine.click_refinement import RefinementSettings, click_window
from napari_robustmedsam.engine.learned_refinement import resize_square, window_inputs
from napari_robustmedsam.models.click_refiner import INPUT_SIZE
from napari_robustmedsam.prompting import rng_for
from training.evaluation.dataset import discover, select_objects

LEVELS = ("LQ-1", "LQ-2", "LQ-3")
SCENARIOS = ("box", "point", "late")
SCENARIO_SHARES = (0.45, 0.35, 0.20)


@dataclass
class SampleSet:
    inputs: np.ndarray  # (N, C, S, S) float16
    targets: np.ndarray  # (N, S, S) bool
    disks: np.ndarray  # (N, S, S) bool
    groups: np.ndarray  # (N,) int: the image each sample came from (for a split by image)


def _disk(shape, row, col, radius) -> np.ndarray:
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    return (yy - row) ** 2 + (xx - col) ** 2 <= radius ** 2


def _boundary_pixel(mask: np.ndarray, rng) -> tuple[int, int]:
    edge = mask & ~ndimage.binary_erosion(mask)
    ys, xs = np.nonzero(edge if edge.any() else mask)
    k = int(rng.integers(len(ys)))
    return int(ys[k]), int(xs[k])


def simulate_shown(gt: np.ndarray, rng, scenario: str) -> np.ndarray:
    """A mask with the errors of ``scenario`` ("box", "point", "late") for ground truth ``gt``."""
    eq = max(np.sqrt(gt.sum() / np.pi), 2.0)
    m = gt.copy()
    if scenario == "box":
        k = int(rng.integers(0, max(int(0.25 * eq), 1) + 1))
        if k:
            m = ndimage.binary_dilation(m, iterations=k) if rng.random() < 0.5 else ndimage.binary_erosion(
                m, iterations=k)
        if rng.random() < 0.6 and m.any():
            m &= ~_disk(m.shape, *_boundary_pixel(m, rng), rng.uniform(0.15, 0.5) * eq)
        if rng.random() < 0.5:
            m |= _disk(m.shape, *_boundary_pixel(gt, rng), rng.uniform(0.15, 0.5) * eq) & ~gt
    elif scenario == "point":
        ys, xs = np.nonzero(gt)
        k = int(rng.integers(len(ys)))
        m = np.zeros_like(gt) if rng.random() < 0.3 else gt & _disk(gt.shape, ys[k], xs[k], rng.uniform(0.1, 0.6) * eq)
        if rng.random() < 0.3:
            m |= _disk(m.shape, *_boundary_pixel(gt, rng), rng.uniform(0.2, 0.7) * eq) & ~gt
    else:
        for _ in range(int(rng.integers(1, 4))):
            blob = _disk(m.shape, *_boundary_pixel(gt, rng), rng.uniform(0.05, 0.2) * eq)
            m = (m | (blob & ~gt)) if rng.random() < 0.5 else (m & ~blob)
    return m


def error_click(shown: np.ndarray, gt: np.ndarray) -> tuple[int, int, int] | None:
    """(row, col, label) at the centre of the largest error region (None: no error)."""
    err = shown ^ gt
    if not err.any():
        return None
    comps, n = ndimage.label(err)
    largest = 1 + int(np.argmax(ndimage.sum(err, comps, index=range(1, n + 1))))
    dist = ndimage.distance_transform_edt(np.pad(comps == largest, 1))[1:-1, 1:-1]
    row, col = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return int(row), int(col), int(gt[row, col])


def earlier_clicks(shown: np.ndarray, gt: np.ndarray, rng, near: np.ndarray) -> list[tuple[int, int, int]]:
    """0-3 clicks that the shown mask honours already: positive inside both, negative outside both (near the
    object)."""
    out = []
    for _ in range(int(rng.integers(0, 4))):
        label = int(rng.random() < 0.5)
        where = (shown & gt) if label else (~shown & ~gt & near)
        ys, xs = np.nonzero(where)
        if len(ys):
            k = int(rng.integers(len(ys)))
            out.append((int(ys[k]), int(xs[k]), label))
    return out


def object_samples(image: np.ndarray, gt: np.ndarray, rng, per_object: int, settings: RefinementSettings,
                   size: int = INPUT_SIZE):
    """Up to ``per_object`` (inputs, target, disk) triples for one object of one image."""
    near = ndimage.binary_dilation(gt, iterations=max(int(0.5 * np.sqrt(gt.sum())), 3))
    for _ in range(per_object):
        shown = simulate_shown(gt, rng, rng.choice(SCENARIOS, p=SCENARIO_SHARES))
        click = error_click(shown, gt)
        if click is None:
            continue
        row, col, label = click
        (y0, y1, x0, x1), disk, _ = click_window(shown, row, col, label, settings)
        seeds = [(r - y0, c - x0, lab) for r, c, lab in earlier_clicks(shown, gt, rng, near) + [click]
                 if y0 <= r < y1 and x0 <= c < x1]
        x = window_inputs(image[y0:y1, x0:x1], shown[y0:y1, x0:x1], disk, seeds, size)
        target = resize_square(gt[y0:y1, x0:x1].astype(np.float32), size).numpy()[0] > 0.5
        yield x, target, x[4] > 0.5


def build_samples(data: str, seed: int = 0, variants: int = 3, per_object: int = 4, max_objects: int = 3,
                  progress=None) -> SampleSet:
    """Samples of every image of the medseg-layout folder ``data``: ``variants`` versions of each image (the
    clean one, then degraded at a random level of LQ-1..LQ-3), ``per_object`` clicks per object and version."""
    settings = RefinementSettings()
    xs, ts, ds, gs = [], [], [], []
    items = [(info, s) for info in discover(data) for s in info.samples]
    for index, (info, sample) in enumerate(items):
        image, labels = sample.load()
        objects = select_objects(labels, sample.key, seed, "components" if info.instances else "label",
                                 max_objects=max_objects)
        for v in range(variants):
            rng = rng_for(seed, "refiner", sample.key, v)
            img = image if v == 0 else degrade_random(image, LEVELS[int(rng.integers(len(LEVELS)))], info.modality,
                                                      int(rng.integers(2 ** 31)))[0]
            img = np.asarray(img, dtype=np.float32)
            for obj in objects:
                for x, t, d in object_samples(img, obj.mask, rng, per_object, settings):
                    xs.append(x.astype(np.float16))
                    ts.append(t)
                    ds.append(d)
                    gs.append(index)
        if progress is not None:
            progress(index + 1, len(items), sample.key)
    if not xs:
        raise ValueError(f"no training samples in {data}: it needs images with labelled objects (medseg layout)")
    return SampleSet(np.stack(xs), np.stack(ts), np.stack(ds), np.asarray(gs))
