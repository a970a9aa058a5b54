"""Synthetic sample images made by the plugin itself (the shared research datasets may not be shipped).

The phantom is an MRI-like axial slice: a bright elliptical body, a darker organ with a lesion inside,
smooth bias and Rician-like noise, so that segmenting the organ with a box is a realistic, non-trivial
task. Deterministic given a seed; the ground truth comes with it.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def _ellipse(shape, center, radii, angle=0.0) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float64)
    y, x = yy - center[0], xx - center[1]
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * x + s * y, -s * x + c * y
    return (u / radii[1]) ** 2 + (v / radii[0]) ** 2 <= 1.0


def mri_phantom(size: int = 256, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(image uint16 (size, size), labels uint8)``; label 1 = organ, 2 = lesion."""
    rng = np.random.default_rng(seed)
    shape = (size, size)
    s = size / 256.0
    body = _ellipse(shape, (128 * s, 128 * s), (100 * s, 118 * s))
    organ = _ellipse(shape, ((118 + rng.uniform(-6, 6)) * s, (100 + rng.uniform(-6, 6)) * s), (44 * s, 58 * s), angle=0.35)
    lesion = _ellipse(shape, (122 * s, 112 * s), (11 * s, 14 * s)) & organ
    image = np.zeros(shape)
    image[body] = 900.0
    image[organ] = 420.0
    image[lesion] = 1300.0
    texture = ndimage.gaussian_filter(rng.normal(0, 1, shape), 3 * s) * 120.0
    image = ndimage.gaussian_filter(image, 1.2 * s) + texture * body
    yy, xx = np.mgrid[: shape[0], : shape[1]] / size
    image *= 0.8 + 0.4 * xx  # coil bias field
    noise_sigma = 40.0
    image = np.hypot(image + rng.normal(0, noise_sigma, shape), rng.normal(0, noise_sigma, shape))
    labels = np.zeros(shape, np.uint8)
    labels[organ] = 1
    labels[lesion] = 2
    return np.clip(image, 0, 65535).astype(np.uint16), labels


def mri_phantom_volume(n_slices: int = 16, size: int = 256, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A (Z, Y, X) stack of phantom slices whose organ grows and shrinks along Z like a real organ."""
    images, labels = [], []
    for z in range(n_slices):
        scale = 0.55 + 0.45 * np.sin(np.pi * (z + 0.5) / n_slices)
        img, lab = mri_phantom(size, seed)
        zoomed_lab = ndimage.zoom(lab, scale, order=0)
        zoomed_img = ndimage.zoom(img.astype(np.float32), scale, order=1)
        pad = [(size - zoomed_lab.shape[0]) // 2, (size - zoomed_lab.shape[1]) // 2]
        out_lab = np.zeros((size, size), np.uint8)
        out_img = np.full((size, size), float(np.median(img[:8, :8])), np.float32)
        out_lab[pad[0] : pad[0] + zoomed_lab.shape[0], pad[1] : pad[1] + zoomed_lab.shape[1]] = zoomed_lab
        out_img[pad[0] : pad[0] + zoomed_img.shape[0], pad[1] : pad[1] + zoomed_img.shape[1]] = zoomed_img
        images.append(out_img.astype(np.uint16))
        labels.append(out_lab)
    return np.stack(images), np.stack(labels)
