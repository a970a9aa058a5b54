"""Says when a degraded copy has lost (almost) all of the image's contrast.

Use: ``signal_loss_notice(clean, degraded)`` returns a sentence for the user, or None when the copy keeps
enough contrast. The Degrade tab shows it under the preview.

Why: the intensity degradations (brightness, brightness_contrast, gamma) act on the 0..255 range of 8-bit
images, as the PGE-SAM benchmark's do. A dark 8-bit image (fluorescence nuclei that use values 4-62, say)
can come out black at LQ-3: nothing is left to segment, and a black preview looks like a fault of the tool.

The contrast of an image is the spread between its 1st and 99th percentiles (of the luminance for colour
images). A copy that keeps less than ``keep`` of the clean image's spread has lost its signal.
"""

from __future__ import annotations

import numpy as np

from ._fields import luminance

#: a copy keeping less than this share of the clean image's contrast has lost its signal
KEEP_AT_LEAST = 0.05
#: at most about this many pixels are read (a regular grid): the preview calls this on every change
SAMPLE_PIXELS = 1 << 16


def contrast_spread(image: np.ndarray) -> float:
    """The 1st-to-99th percentile spread of a 2D image's intensities (its luminance if it is RGB / RGBA), read on a
    regular grid of at most about :data:`SAMPLE_PIXELS` pixels."""
    arr = np.asarray(image)
    step = max(1, int(np.ceil(np.sqrt(arr.shape[0] * arr.shape[1] / SAMPLE_PIXELS))))
    gray = luminance(arr[::step, ::step])
    low, high = np.percentile(gray.astype(np.float64, copy=False), [1.0, 99.0])
    return float(high - low)


def signal_loss_notice(clean: np.ndarray, degraded: np.ndarray, keep: float = KEEP_AT_LEAST) -> str | None:
    """A sentence saying the degraded copy lost its contrast, or None when it keeps at least ``keep`` of it."""
    before = contrast_spread(clean)
    if before <= 0:  # a constant image has no contrast to lose
        return None
    after = contrast_spread(degraded)
    if after >= keep * before:
        return None
    return (f"this copy keeps {after / before:.0%} of the image's contrast: the degradation erased it, so no model "
            "can segment it; try a lower level or another seed (8-bit images are shifted on the 0-255 range, which "
            "a dark image does not fill)")
