"""Noise models: sensor (Gaussian, ISO), photon counting (Poisson), coherent imaging (speckle), impulse
(salt & pepper) and MRI magnitude noise (Rician, Rayleigh). Intensities are fractions of the image range."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ._fields import luminance, per_pixel, upsample
from .base import Degradation, lerp, register

ROBUSTMEDSAM = "robustmedsam"
PGESAM = "pge-sam"


def _normal(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32)


@register
@dataclass
class GaussianNoise(Degradation):
    """Additive Gaussian noise: electronic sensor noise and thermal fluctuations of the detector.

    sigma: standard deviation, as a fraction of the intensity range.
    """

    sigma: float = 0.1
    name = "gaussian_noise"
    sources = (ROBUSTMEDSAM, PGESAM)

    @classmethod
    def from_severity(cls, severity, rng, shape=(512, 512)):
        return cls(sigma=lerp(0.0, 0.18, severity))

    def apply(self, x, rng):
        return x + np.float32(self.sigma) * _normal(rng, x.shape)


def _normal_counts(lam: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Photon counts from the normal approximation N(lam, lam) of Poisson(lam), float32: lam + sqrt(lam) z,
    clipped at 0 (`z` is overwritten)."""
    z *= np.sqrt(lam)
    z += lam
    return np.maximum(z, np.float32(0.0), out=z)


def _poisson_small(rng: np.random.Generator, lam: np.ndarray, full_steps: int = 7) -> np.ndarray:
    """Poisson(lam) draws for small expected counts `lam` (float32, 1-D), as float32: inversion of the
    CDF with one float32 uniform per draw. The first `full_steps` CDF terms are computed for all draws at
    once (vectorised, that is where most of the mass is), the rest on the shrinking subset of draws still
    above the CDF. Exact up to float32 rounding (tail terms below 1e-10 are dropped); faster than
    ``Generator.poisson`` for small counts, where the time goes in the degradation's latency budget."""
    u = rng.random(lam.shape, dtype=np.float32)
    p = np.exp(-lam)
    c = p.copy()
    above = np.greater(u, c)
    counts = above.astype(np.float32)
    for k in range(1, full_steps + 1):
        p *= lam
        p *= np.float32(1.0 / k)
        c += p
        np.greater(u, c, out=above)
        counts += above
    ids = np.flatnonzero(above)
    u, lam, p, c = u[ids], lam[ids], p[ids], c[ids]
    k = full_steps
    while ids.size:
        k += 1
        p *= lam
        p *= np.float32(1.0 / k)
        c += p
        keep = (u > c) & (p > np.float32(1e-10))
        ids, u, lam, p, c = ids[keep], u[keep], lam[keep], p[keep], c[keep]
        counts[ids] += 1
    return counts


@register
@dataclass
class PoissonNoise(Degradation):
    """Poisson (shot / quantum) noise: too few photons reach the detector, as in low-dose CT and X-ray or
    dim fluorescence microscopy.

    peak: expected photon count at the brightest intensity (lower = noisier). Counts are drawn exactly
    (CDF inversion, float32) where fewer than 5 photons are expected and from the normal approximation
    N(n, n) elsewhere (fast, and indistinguishable at those counts).
    """

    peak: float = 30.0
    name = "poisson_noise"
    family = "domain"
    sources = (ROBUSTMEDSAM,)

    @classmethod
    def from_severity(cls, severity, rng, shape=(512, 512)):
        return cls(peak=round(float(10 ** lerp(3.0, 0.5, severity)), 3))

    EXACT_BELOW = 5.0

    def apply(self, x, rng):
        peak = np.float32(max(float(self.peak), 1e-3))
        lam = np.clip(x, 0, None)
        lam *= peak
        low = lam < self.EXACT_BELOW
        n_low = int(np.count_nonzero(low))
        if n_low == lam.size:
            counts = _poisson_small(rng, lam.ravel()).reshape(lam.shape)
        elif n_low == 0:
            counts = _normal_counts(lam, _normal(rng, lam.shape))
        else:  # normal draws only where the approximation is used, exact counts elsewhere (float32 path)
            high = ~low
            counts = np.empty_like(lam)
            lam_high = lam[high]
            counts[high] = _normal_counts(lam_high, _normal(rng, lam_high.shape))
            counts[low] = _poisson_small(rng, lam[low])
        counts *= np.float32(1.0 / peak)
        return counts


@register
@dataclass
class SpeckleNoise(Degradation):
    """Speckle: multiplicative granular noise from the interference of coherent waves (ultrasound, OCT).

    sigma: standard deviation of the multiplicative noise; grain: speckle size in pixels (correlation
    length of the noise; 0 = independent pixels).
    """

    sigma: float = 0.4
    grain: float = 1.0
    name = "speckle_noise"
    family = "domain"
    sources = (ROBUSTMEDSAM, PGESAM)

    @classmethod
    def from_severity(cls, severity, rng, shape=(512, 512)):
        scale = max(shape[0], shape[1]) / 512.0
        return cls(sigma=lerp(0.0, 0.65, severity), grain=round(max(0.7, 1.5 * scale), 2))

    def apply(self, x, rng):
        field = _normal(rng, x.shape[:2])
        if self.grain > 0:
            field = ndimage.gaussian_filter(field, self.grain, truncate=3.0)
            field /= max(float(field.std()), 1e-6)
        return x * (1.0 + np.float32(self.sigma) * per_pixel(field, x))


@register
@dataclass
class SaltPepperNoise(Degradation):
    """Salt-and-pepper (impulse) noise: transmission errors, defective detector pixels or faulty
    analog-to-digital conversion set isolated pixels to white or black.

    amount: fraction of corrupted pixels; salt_ratio: fraction of those that are white.
    """

    amount: float = 0.05
    salt_ratio: float = 0.5
    name = "salt_pepper"
    sources = (ROBUSTMEDSAM, PGESAM)

    @classmethod
    def from_severity(cls, severity, rng, shape=(512, 512)):
        return cls(amount=lerp(0.0, 0.12, severity), salt_ratio=0.5)

    def apply(self, x, rng):
        u = rng.random(x.shape[:2], dtype=np.float32)
        salt = u < self.amount * self.salt_ratio
        pepper = u > 1.0 - self.amount * (1.0 - self.salt_ratio)
        out = x.copy()
        out[salt] = 1.0
        out[pepper] = 0.0
        return out


@register
@dataclass
class RicianNoise(Degradation):
    """Rician noise: MRI magnitude images are |signal + complex Gaussian noise|, which biases dark regions
    upward and makes noise signal-dependent.

    sigma: standard deviation of the noise in each of the real and imaginary channels.
    """

    sigma: float = 0.1
    name = "rician_noise"
    family = "domain"
    sources = (ROBUSTMEDSAM,)

    @classmethod
    def from_severity(cls, severity, rng, shape=(512, 512)):
        return cls(sigma=lerp(0.0, 0.16, severity))

    def apply(self, x, rng):
        s = np.float32(self.sigma)
        real = x + s * _normal(rng, x.shape)
        imag = s * _normal(rng, x.shape)
        return np.sqrt(real * real + imag * imag)


@register
@dataclass
class RayleighNoise(Degradation):
    """Rayleigh noise: the noise floor of magnitude MRI (and envelope-detected ultrasound) where there is
    no signal; adds positive, Rayleigh-distributed noise that greys the background.

    scale: Rayleigh scale parameter (mode of the added noise), fraction of the intensity range.
    """

    scale: float = 0.08
    name = "rayleigh_noise"
    family = "domain"
    sources = (ROBUSTMEDSAM,)

    @classmethod
    def from_severity(cls, severity, rng, shape=(512, 512)):
        return cls(scale=lerp(0.0, 0.13, severity))

    def apply(self, x, rng):
        if self.scale <= 0:
            return x
        return x + rng.rayleigh(self.scale, x.shape).astype(np.float32)


@register
@dataclass
class ISONoise(Degradation):
    """ISO noise of a digital colour camera at high gain: signal-dependent luminance grain plus blotchy
    chroma noise (fundus cameras, whole-slide scanners).

    luminance_sigma: luminance noise at mid-grey; color_sigma: chroma noise (RGB only).
    """

    luminance_sigma: float = 0.08
    color_sigma: float = 0.05
    name = "iso_noise"
    family = "domain"
    sources = (ROBUSTMEDSAM,)

    @classmethod
    def from_severity(cls, severity, rng, shape=(512, 512)):
        return cls(luminance_sigma=lerp(0.0, 0.1, severity), color_sigma=lerp(0.0, 0.04, severity))

    def apply(self, x, rng):
        grain = np.sqrt(luminance(x) + np.float32(0.05))
        grain *= _normal(rng, x.shape[:2])
        grain *= np.float32(self.luminance_sigma * 1.4)
        out = x + per_pixel(grain, x)
        if x.ndim == 3:  # blotchy chroma noise: drawn at half resolution, interpolated
            h, w = x.shape[:2]
            chroma = upsample(_normal(rng, ((h + 1) // 2, (w + 1) // 2, 3)), x.shape)
            chroma *= np.float32(self.color_sigma) / max(float(chroma.std()), 1e-6)
            out += chroma
        return out
