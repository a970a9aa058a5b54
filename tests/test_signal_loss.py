"""degradations.signal_loss: a degraded copy that lost the image's contrast is named, one that keeps it is not."""

from __future__ import annotations

import numpy as np

from napari_robustmedsam.degradations import get_degradation
from napari_robustmedsam.degradations.signal_loss import KEEP_AT_LEAST, contrast_spread, signal_loss_notice


def _nuclei_like(high: int, seed: int = 0) -> np.ndarray:
    """Dark background with brighter blobs, 8-bit, values up to ``high``."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:256, :256]
    img = np.full((256, 256), 6.0) + rng.normal(0, 1.5, (256, 256))
    for cy, cx in rng.integers(20, 236, (12, 2)):
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < 90] = high - 8 + rng.normal(0, 2)
    return np.clip(img, 0, 255).astype(np.uint8)


def _lq3_intensity(image: np.ndarray) -> np.ndarray:
    """The intensity part of an LQ-3 draw that erased a development nuclei image (its recorded parameters)."""
    out = get_degradation("gamma", gamma=2.04)(image, 0)
    return get_degradation("brightness_contrast", contrast=0.4915, brightness=-0.2119)(out, 0)


def test_a_dark_8bit_image_erased_by_an_lq3_draw_is_named():
    dark = _nuclei_like(high=62)
    erased = _lq3_intensity(dark)
    assert erased.max() == 0  # the failure this module exists for
    notice = signal_loss_notice(dark, erased)
    assert notice is not None and "keeps 0% of the image's contrast" in notice and "lower level" in notice


def test_the_same_draw_on_a_bright_image_keeps_its_contrast_and_says_nothing():
    bright = _nuclei_like(high=250)
    kept = _lq3_intensity(bright)
    assert contrast_spread(kept) >= KEEP_AT_LEAST * contrast_spread(bright)
    assert signal_loss_notice(bright, kept) is None


def test_the_threshold_is_the_share_of_contrast_kept():
    clean = np.tile(np.arange(256, dtype=np.uint8), (64, 1))  # spread 1st..99th percentile about 250
    spread = contrast_spread(clean)
    squeezed = (clean.astype(np.float32) * 0.04).astype(np.float32)  # 4 % of it
    assert signal_loss_notice(clean, squeezed) is not None
    assert signal_loss_notice(clean, clean.astype(np.float32) * 0.06) is None
    assert abs(contrast_spread(squeezed) - 0.04 * spread) < 0.5


def test_constant_images_and_colour_images():
    flat = np.full((32, 32), 7, np.uint8)
    assert signal_loss_notice(flat, np.zeros_like(flat)) is None  # nothing to lose
    rgb = np.stack([_nuclei_like(200, seed=s) for s in range(3)], axis=-1)
    assert signal_loss_notice(rgb, rgb) is None
    assert signal_loss_notice(rgb, np.zeros_like(rgb)) is not None


def test_large_images_are_read_on_a_grid_with_the_same_answer():
    big = np.kron(_nuclei_like(120), np.ones((8, 8), np.uint8))  # 2048 x 2048
    assert abs(contrast_spread(big) - contrast_spread(_nuclei_like(120))) <= 2.0
    assert signal_loss_notice(big, np.zeros_like(big)) is not None
