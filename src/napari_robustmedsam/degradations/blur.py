"""Blur: defocus (Gaussian), linear motion during exposure, and zoom (radial) blur of moving scopes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
import scipy.fft
from scipy import ndimage

from ._fields import upsample
from .base import Degradation, lerp, register, size_scale


REDUCED_FROM = 1.7  # px: wider Gaussian blurs are computed at half (or lower) resolution


def _gaussian(x: np.ndarray, sigma: float) -> np.ndarray:
    sig = (sigma, sigma, 0) if x.ndim == 3 else sigma
    return ndimage.gaussian_filter(x, sig, mode="reflect", truncate=3.0)


def block_mean(x: np.ndarray, factor: int) -> np.ndarray:
    """Mean over factor x factor blocks of a (H, W[, C]) float32 image whose sides are multiples of
    `factor` (strided slice sums: much faster than a reshaped mean, notably for channel-last RGB)."""
    rows = x[0::factor].copy()
    for i in range(1, factor):
        rows += x[i::factor]
    small = rows[:, 0::factor].copy()
    for j in range(1, factor):
        small += rows[:, j::factor]
    small *= np.float32(1.0 / (factor * factor))
    return small


def gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of a (H, W) or (H, W, C) float image over its two spatial axes. Blurs with
    sigma >= 1.7 px are computed at a reduced resolution (factor 2 up to sigma 4.5 px, then 3, then 4)
    and interpolated back (the block averaging and the interpolation are counted in the blur's width),
    which keeps them fast: at sigma 1.7 px the result is within 0.1 % of the range of the exact Gaussian
    on average (at most ~2 % at the sharpest edges), closer for wider blurs."""
    if sigma <= 0:
        return x
    factor = min(4, int(sigma // 1.5))
    if factor < 2 and sigma >= REDUCED_FROM:
        factor = 2
    if factor < 2:
        return _gaussian(x, sigma)
    h, w = x.shape[:2]
    ph, pw = -h % factor, -w % factor
    pad = ((0, ph), (0, pw)) + (((0, 0),) if x.ndim == 3 else ())
    padded = np.pad(x, pad, mode="reflect") if (ph or pw) else x
    small = block_mean(padded.astype(np.float32, copy=False), factor)
    # variance added by block averaging ((f^2 - 1) / 12) and linear interpolation (~ f^2 / 6), in pixels^2
    rest = np.sqrt(max(sigma**2 - (factor**2 - 1) / 12 - factor**2 / 6, 0.25)) / factor
    blurred = _gaussian(small, rest)
    return upsample(blurred, padded.shape)[:h, :w]


@register
@dataclass
class GaussianBlur(Degradation):
    """Gaussian blur: defocus, limited resolution or suboptimal reconstruction kernel.

    sigma: standard deviation of the blur kernel in pixels.
    """

    sigma: float = 3.0
    name = "gaussian_blur"
    sources = ("robustmedsam", "pge-sam")

    @classmethod
    def from_severity(cls, severity, rng, shape=(512, 512)):
        return cls(sigma=round(lerp(0.0, 7.0, severity) * size_scale(shape), 3))

    def apply(self, x, rng):
        return gaussian_blur(x, self.sigma)


def line_kernel(length: float, angle_deg: float) -> np.ndarray:
    """Normalised anti-aliased line of `length` pixels at `angle_deg` (bilinear splatting)."""
    length = max(float(length), 1.0)
    size = int(np.ceil(length)) | 1
    half = size // 2
    kernel = np.zeros((size + 2, size + 2), np.float32)
    t = np.linspace(-(length - 1) / 2, (length - 1) / 2, max(2, int(length * 4)))
    a = np.deg2rad(angle_deg)
    ys, xs = half + 1 + t * np.sin(a), half + 1 + t * np.cos(a)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    fy, fx = (ys - y0).astype(np.float32), (xs - x0).astype(np.float32)
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            np.add.at(kernel, (y0 + dy, x0 + dx), wy * wx)
    return kernel / kernel.sum()


def convolve_reflect(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """FFT convolution of a (H, W[, C]) image with a 2D kernel, reflect-padded so borders stay unbiased.
    The kernel's centre is its middle pixel; the kernel is cropped to its non-zero box (a line at an angle
    fills little of its square) to keep the padded FFT small. Colour channels are transformed as contiguous
    (C, H, W) planes, in float32 (complex64 spectra)."""
    cy, cx = kernel.shape[0] // 2, kernel.shape[1] // 2
    rows, cols = np.nonzero(kernel)
    if rows.size:  # the box of the non-zero taps and the centre
        r0, r1 = min(int(rows.min()), cy), max(int(rows.max()), cy) + 1
        c0, c1 = min(int(cols.min()), cx), max(int(cols.max()), cx) + 1
        kernel, cy, cx = kernel[r0:r1, c0:c1], cy - r0, cx - c0
    ky, kx = kernel.shape
    h, w = x.shape[:2]
    planes = np.moveaxis(x, -1, 0) if x.ndim == 3 else x[None]
    padded = np.pad(planes.astype(np.float32, copy=False), ((0, 0), (ky - 1 - cy, cy), (kx - 1 - cx, cx)),
                    mode="reflect")
    # circular FFT convolution of the padded image; the wrap-around only touches the discarded border
    fh, fw = scipy.fft.next_fast_len(padded.shape[1], real=True), scipy.fft.next_fast_len(padded.shape[2], real=True)
    spec = scipy.fft.rfft2(padded, s=(fh, fw))
    spec *= scipy.fft.rfft2(kernel.astype(np.float32, copy=False), s=(fh, fw))
    out = scipy.fft.irfft2(spec, s=(fh, fw))[:, ky - 1 : ky - 1 + h, kx - 1 : kx - 1 + w]
    out = np.ascontiguousarray(np.moveaxis(out, 0, -1)) if x.ndim == 3 else out[0]
    return out.astype(np.float32, copy=False)


@register
@dataclass
class MotionBlur(Degradation):
    """Linear motion blur: the patient or the camera moves in one direction during the exposure.

    length: blur length in pixels; angle: direction in degrees (0 = horizontal).
    """

    length: float = 15.0
    angle: float = 0.0
    name = "motion_blur"
    sources = ("robustmedsam", "pge-sam")

    @classmethod
    def from_severity(cls, severity, rng, shape=(512, 512)):
        angle = float(rng.uniform(0.0, 180.0))
        return cls(length=round(lerp(1.0, 36.0, severity) * size_scale(shape), 2), angle=round(angle, 2))

    def apply(self, x, rng):
        if self.length <= 1.0:
            return x
        return convolve_reflect(x, line_kernel(self.length, self.angle))


def _zoom(img: Image.Image, zoom: float, cy: float, cx: float) -> Image.Image:
    """`img` magnified by `zoom` about (cy, cx) (crop + bilinear resize in one Pillow call)."""
    w, h = img.size
    hh, hw = h / (2 * zoom), w / (2 * zoom)
    cy, cx = min(max(cy, hh), h - hh), min(max(cx, hw), w - hw)  # keep the crop inside the image
    box = (max(cx - hw, 0.0), max(cy - hh, 0.0), min(cx + hw, float(w)), min(cy + hh, float(h)))
    return img.resize((w, h), Image.BILINEAR, box=box)


@register
@dataclass
class ZoomBlur(Degradation):
    """Zoom blur: the scope moves along its optical axis during the exposure (endoscopy, handheld fundus
    cameras), smearing structures radially away from the centre.

    max_zoom: zoom factor reached at the end of the exposure (1 = none); steps: number of averaged,
    geometrically spaced zooms (rounded up to a power of two); center: (row, col) fraction of the image
    size that stays fixed. RGB images are resampled at 8 bits.
    """

    max_zoom: float = 1.2
    steps: int = 16
    center: tuple[float, float] = (0.5, 0.5)
    name = "zoom_blur"
    family = "domain"
    sources = ("robustmedsam",)

    @classmethod
    def from_severity(cls, severity, rng, shape=(512, 512)):
        center = tuple(round(float(c), 3) for c in rng.uniform(0.4, 0.6, 2))
        return cls(max_zoom=round(lerp(1.0, 1.18, severity), 4), steps=16, center=center)

    def apply(self, x, rng):
        if self.max_zoom <= 1.0:
            return x
        h, w = x.shape[:2]
        cy, cx = self.center[0] * h, self.center[1] * w
        doublings = max(1, int(np.ceil(np.log2(max(2, int(self.steps))))))
        # mean over zooms s^0 .. s^(2^d - 1) by repeated doubling: A <- (A + zoom(A, s^(2^k))) / 2, since
        # zooms about the same centre compose by multiplying their factors (d resizes instead of 2^d - 1)
        step = float(self.max_zoom) ** (1.0 / (2**doublings - 1))
        if x.ndim == 3:  # colour: resampled as one 8-bit RGB image (colour images are 8-bit in practice);
            # the running average is kept in uint16 fixed point (8-bit levels with 7 fractional bits)
            rgb = np.clip(x, 0, 1) * np.float32(255 * 128)
            acc = np.rint(rgb, out=rgb).astype(np.uint16)
            for k in range(doublings):
                acc8 = ((acc + np.uint16(64)) >> 7).astype(np.uint8)  # rounded to 8-bit levels
                zoomed = np.asarray(_zoom(Image.fromarray(acc8, mode="RGB"), step ** (2**k), cy, cx))
                acc += zoomed.astype(np.uint16) << 7  # <= 2 * 255 * 128 + 1 < 2**16
                acc += np.uint16(1)
                acc >>= 1
            return acc.astype(np.float32) * np.float32(1 / (255 * 128))
        acc = np.clip(x, 0, 1).astype(np.float32)
        for k in range(doublings):
            img = Image.fromarray(np.ascontiguousarray(acc), mode="F")
            zoomed = np.asarray(_zoom(img, step ** (2**k), cy, cx), dtype=np.float32)
            acc = 0.5 * (acc + zoomed)
        return acc
