"""Ultrasound-specific artifacts: acoustic shadowing (speckle lives in noise.py; bias field, vignette,
reflection and dead pixels are shared with other modalities)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ._fields import per_pixel, smoothstep
from .base import Degradation, lerp, register


@register
@dataclass
class AcousticShadow(Degradation):
    """Acoustic shadowing: a strongly reflecting or absorbing structure (bone, calcification, gas) stops
    the beam, leaving a bright interface and a dark band behind it along the beam direction. Also the
    geometry of OCT vessel shadows.

    shadows: per shadow [column, start row, half width], fractions of the image size; attenuation: signal
    lost in the shadow (0..1); apex: height of the virtual beam source above the image, fraction of the
    height (the shadows fan out from it).
    """

    shadows: list[list[float]] = field(default_factory=lambda: [[0.5, 0.4, 0.06]])
    attenuation: float = 0.7
    apex: float = 0.6
    name = "acoustic_shadow"
    family = "domain"
    slice_consistent = True
    sources = ("pge-sam",)

    @classmethod
    def from_severity(cls, severity, rng, shape=(512, 512)):
        n = int(rng.integers(1, 3))
        cols = rng.uniform(0.25, 0.75, n)
        starts = rng.uniform(0.25, 0.55, n)
        widths = rng.uniform(0.05, 0.1, n)
        return cls(
            shadows=[
                [round(float(c), 4), round(float(s), 4), round(float(w), 4)] for c, s, w in zip(cols, starts, widths)
            ],
            attenuation=round(lerp(0.0, 1.0, severity), 4),
            apex=round(float(rng.uniform(0.4, 1.0)), 4),
        )

    def apply(self, x, rng):
        h, w = x.shape[:2]
        ay, ax = -self.apex * h, 0.5 * w
        gain = np.ones((h, w), np.float32)
        light = np.zeros((h, w), np.float32)
        for col, start, half in self.shadows:
            sy, sx = start * h, col * w
            center = float(np.arctan2(sx - ax, sy - ay))
            half_angle = float(np.arctan2(half * w, sy - ay))
            # only the fan below the reflector is touched: compute on its bounding box
            r0 = max(0, int(sy - 0.05 * h))
            edges = [ax + (y - ay) * np.tan(a) for y in (r0, h) for a in (center - half_angle, center + half_angle)]
            c0, c1 = max(0, int(min(edges)) - 2), min(w, int(np.ceil(max(edges))) + 3)
            if c1 <= c0 or r0 >= h:
                continue
            yy = np.arange(r0, h, dtype=np.float32)[:, None]
            xx = np.arange(c0, c1, dtype=np.float32)[None, :]
            theta = np.arctan2(xx - ax, yy - ay)  # beam angle of each pixel
            dist = np.hypot(yy - ay, xx - ax)  # distance from the virtual source
            d0 = float(np.hypot(sy - ay, sx - ax))
            off = np.abs(theta - center)
            window = smoothstep((half_angle - off) / (0.35 * half_angle))
            depth = smoothstep((dist - d0) / (0.04 * h))
            deeper = 0.85 + 0.15 * np.clip((yy - sy) / max(h - sy, 1.0), 0, 1)
            sub = gain[r0:, c0:c1]
            np.minimum(sub, 1.0 - np.float32(self.attenuation) * window * depth * deeper, out=sub)
            # the reflector: a bright echo, slightly narrower than the shadow, curved like the wavefront
            arc = np.exp(-0.5 * ((dist - d0) / (0.012 * h)) ** 2)
            narrow = smoothstep((0.8 * half_angle - off) / (0.3 * half_angle))
            sub_light = light[r0:, c0:c1]
            np.maximum(sub_light, np.float32(min(1.0, 0.4 + self.attenuation)) * narrow * arc, out=sub_light)
        out = x * per_pixel(gain, x)
        return out + per_pixel(light, x) * (1.0 - out)
