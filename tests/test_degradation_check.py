"""benchmarks/degradation_check.py: each no-reference score moves the way its degradation should move it."""

from __future__ import annotations


import numpy as np
from scipy import ndimage

from napari_robustmedsam.degradations import degrade
from benchmark_loading import load_benchmark  # tests/ is on sys.path under pytest


def _module():
    return load_benchmark("degradation_check")


def _phantom() -> np.ndarray:
    yy, xx = np.mgrid[:256, :256]
    img = 0.2 + 0.6 * (((yy - 128) ** 2 + (xx - 120) ** 2) < 70**2) + 0.1 * (xx > 200)
    return (ndimage.gaussian_filter(img, 1.0) * 255).astype(np.uint8)


def test_noise_blur_and_jpeg_move_their_scores():
    check = _module()
    clean = _phantom()
    base = check.scores(clean)
    noisy = clean.astype(float) + np.random.default_rng(0).normal(0, 12, clean.shape)
    assert check.scores(np.clip(noisy, 0, 255).astype(np.uint8))["noise"] > 5 * base["noise"] + 0.01
    blurred = ndimage.gaussian_filter(clean.astype(float), 4)
    assert check.scores(blurred)["sharpness"] < 0.8 * base["sharpness"]
    jpeg = degrade(clean, "jpeg", "LQ-3", seed=0)
    assert check.scores(jpeg)["blockiness"] > base["blockiness"] + 0.02


def test_thresholds_keep_the_clean_false_positive_rate():
    check = _module()
    rng = np.random.default_rng(1)
    rows = [dict(dataset="a", condition="clean", noise=rng.uniform(0, 0.01), sharpness=rng.uniform(0.8, 1.2),
                 blockiness=rng.uniform(1.0, 1.05)) for _ in range(50)]
    rows += [dict(dataset="a", condition="LQ-3", noise=rng.uniform(0.02, 0.05), sharpness=1.0, blockiness=1.0)
             for _ in range(50)]
    t = check.choose(rows)
    recall, fpr = check.rates(rows, t)
    assert fpr <= check.MAX_FPR and recall == 1.0
