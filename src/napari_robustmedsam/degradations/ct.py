"""CT reconstruction artifacts: detector ring artifacts and beam hardening (cupping and dark streaks)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from ._fields import luminance, per_pixel, radius, smoothstep, upsample
from .base import Degradation, lerp, register, size_scale


@register
@dataclass
class RingArtifact(Degradation):
    """CT ring artifacts: a miscalibrated or defective detector element gives concentric bright / dark
    rings around the rotation centre.

    radii: ring radii as fractions of half the shorter image side; amplitudes: signed ring intensities
    (fraction of the range); width: ring width in pixels; center: (row, col) fractions.
    """

    radii: list[float] = field(default_factory=lambda: [0.2, 0.45, 0.7])
    amplitudes: list[float] = field(default_factory=lambda: [0.1, -0.1, 0.08])
    width: float = 1.2
    center: tuple[float, float] = (0.5, 0.5)
    name = "ct_ring"
    family = "domain"
    slice_consistent = True
    sources = ("pge-sam",)

    @classmethod
    def from_severity(cls, severity, rng, shape=(512, 512)):
        n = 12
        radii = np.sort(rng.uniform(0.05, 0.98, n))
        signs = rng.choice([-1.0, 1.0], n)
        mags = rng.uniform(0.4, 1.0, n)
        amp = lerp(0.0, 0.3, severity)
        center = rng.uniform(0.47, 0.53, 2)
        return cls(
            radii=[round(float(r), 4) for r in radii],
            amplitudes=[round(float(s * m * amp), 4) for s, m in zip(signs, mags)],
            width=round(1.1 * max(size_scale(shape), 0.6), 3),
            center=(round(float(center[0]), 4), round(float(center[1]), 4)),
        )

    def apply(self, x, rng):
        h, w = x.shape[:2]
        cy, cx = self.center[0] * h, self.center[1] * w
        r = radius(x.shape, cy, cx)
        # 1D radial profile at quarter-pixel resolution, then a lookup: cheap at any image size
        n = int(np.ceil(float(r.max()) * 4)) + 2
        rr = np.arange(n, dtype=np.float32) / 4
        profile = np.zeros(n, np.float32)
        half = min(h, w) / 2
        for rad, amp in zip(self.radii, self.amplitudes):
            profile += np.float32(amp) * np.exp(-0.5 * ((rr - rad * half) / max(self.width, 0.3)) ** 2)
        rings = profile[np.minimum((r * 4).astype(np.int32), n - 1)]
        return x + per_pixel(rings, x)


def _body_and_thickness(lum: np.ndarray, step: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Coarse object mask, a smooth 'path length' map in [0, 1] and the Otsu threshold."""
    from skimage.filters import threshold_otsu  # lazy: skimage.filters is slow to import

    small = lum[::step, ::step]
    thr = float(threshold_otsu(small)) if float(small.max()) > float(small.min()) else 0.5
    body = (small > thr).astype(np.float32)
    sigma = max(small.shape) / 10
    thick = ndimage.gaussian_filter(body, sigma, mode="constant", truncate=3.0)
    thick = thick / max(float(thick.max()), 1e-6)
    return body, thick, thr


@register
@dataclass
class BeamHardening(Degradation):
    """Beam hardening: a polychromatic X-ray beam loses its low-energy photons in dense material, so the
    centre of thick objects reconstructs too dark ('cupping') and dark streaks join dense structures
    (bone, teeth, contrast, metal).

    cupping: darkening at the thickest point (fraction of the range); streaks: depth of the dark streaks;
    streak_width: in pixels; num_streaks: number of streaks between dense points.
    """

    cupping: float = 0.15
    streaks: float = 0.2
    streak_width: float = 4.0
    num_streaks: int = 2
    name = "beam_hardening"
    family = "domain"
    slice_consistent = True
    sources = ("pge-sam",)

    @classmethod
    def from_severity(cls, severity, rng, shape=(512, 512)):
        return cls(
            cupping=round(lerp(0.0, 0.35, severity), 4),
            streaks=round(lerp(0.0, 0.5, severity), 4),
            streak_width=round(float(rng.uniform(3.0, 6.0)) * size_scale(shape), 3),
            num_streaks=int(rng.integers(1, 4)),
        )

    def apply(self, x, rng):
        h, w = x.shape[:2]
        lum = luminance(x)
        step = max(1, max(h, w) // 128)
        body_s, thick_s, thr = _body_and_thickness(lum, step)
        small = lum[::step, ::step]
        dense_thr = max(float(np.quantile(small, 0.98)), float(small.max()) - 0.1)
        # dense points: the brightest pixels (coarse grid), else anywhere in the body
        dense = np.argwhere(small >= dense_thr)
        if len(dense) < 2:
            dense = np.argwhere(body_s > 0) if body_s.sum() >= 2 else np.argwhere(np.ones_like(small))
        # the darkening field is smooth: build it at half resolution (at most), then upsample
        fine = max(1, max(h, w) // 256)
        gh, gw = -(-h // fine), -(-w // fine)
        darkening = np.float32(self.cupping) * upsample(thick_s, (gh, gw)) ** 2
        yy = (np.arange(gh, dtype=np.float32)[:, None] + 0.5) * fine - 0.5
        xx = (np.arange(gw, dtype=np.float32)[None, :] + 0.5) * fine - 0.5
        min_dist = 0.15 * max(h, w)
        for _ in range(int(self.num_streaks)):
            for _attempt in range(8):
                i, j = rng.integers(0, len(dense), 2)
                p0 = dense[i] * step + step / 2
                p1 = dense[j] * step + step / 2
                if np.hypot(*(p1 - p0)) >= min_dist:
                    break
            d = p1 - p0
            length = max(float(np.hypot(*d)), 1.0)
            u = d / length
            t = ((yy - p0[0]) * u[0] + (xx - p0[1]) * u[1]) / length
            dist = np.abs((yy - p0[0]) * u[1] - (xx - p0[1]) * u[0])
            along = smoothstep((t - 0.05) / 0.15) * smoothstep((0.95 - t) / 0.15)
            band = np.exp(-0.5 * (dist / max(self.streak_width, 0.5)) ** 2)
            darkening = darkening + np.float32(self.streaks) * band * along
        if fine > 1:
            darkening = upsample(darkening, (h, w))
        spared = 1.0 - 0.8 * (lum >= dense_thr)  # the dense objects themselves stay bright
        return x - per_pixel((darkening * spared).astype(np.float32), x)
