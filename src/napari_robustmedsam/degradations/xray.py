"""Projection radiography artifacts: anti-scatter grid banding."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._fields import grid, per_pixel
from .base import Degradation, lerp, register, size_scale


@register
@dataclass
class GridBanding(Degradation):
    """Grid banding: a misaligned or stationary anti-scatter grid leaves fine periodic lines whose
    aliasing with the detector pitch gives broader Moire bands.

    amplitude: relative intensity modulation; period: grid-line period in pixels; beat_period: Moire band
    period in pixels; vertical: lines run along columns if True, along rows otherwise; phase: radians.
    """

    amplitude: float = 0.2
    period: float = 5.0
    beat_period: float = 90.0
    vertical: bool = True
    phase: float = 0.0
    name = "grid_banding"
    family = "domain"
    slice_consistent = True
    sources = ("pge-sam",)

    @classmethod
    def from_severity(cls, severity, rng, shape=(512, 512)):
        scale = size_scale(shape)
        return cls(
            amplitude=round(lerp(0.0, 0.45, severity), 4),
            period=round(float(rng.uniform(4.0, 9.0)) * max(scale, 0.5), 3),
            beat_period=round(float(rng.uniform(60.0, 140.0)) * scale, 3),
            vertical=bool(rng.random() < 0.5),
            phase=round(float(rng.uniform(0, 2 * np.pi)), 4),
        )

    def apply(self, x, rng):
        yy, xx = grid(x.shape)
        u = (xx if self.vertical else yy).ravel()
        lines = np.sin(2 * np.pi * u / max(self.period, 1.0) + self.phase)
        beat = 0.5 + 0.5 * np.cos(2 * np.pi * u / max(self.beat_period, 2.0))
        bands = np.sin(2 * np.pi * u / max(self.beat_period * 2.7, 2.0) + 1.3 * self.phase)
        profile = (1.0 + self.amplitude * (0.7 * lines * beat + 0.3 * bands)).astype(np.float32)
        f = profile[None, :] if self.vertical else profile[:, None]
        f = np.broadcast_to(f, x.shape[:2])
        return x * per_pixel(f, x)
