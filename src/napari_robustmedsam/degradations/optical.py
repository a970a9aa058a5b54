"""Illumination and optics artifacts shared by camera-based and scanned modalities: glare, specular
reflections, vignetting, local shadows, fog / haze, double images (ghosting) and dead pixels."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from ._fields import per_pixel, radius, screen, smooth_noise, soft_ellipse
from .base import Degradation, lerp, register, size_scale
from .blur import gaussian_blur


@register
@dataclass
class Glare(Degradation):
    """Glare: a large, soft bright spot from a light source or reflection flooding part of the field of
    view (bright core with a wide halo).

    intensity: brightness added at the centre (0..1, screen blend); size: halo radius as a fraction of
    the shorter image side; center: (row, col) fractions.
    """

    intensity: float = 0.6
    size: float = 0.25
    center: tuple[float, float] = (0.4, 0.6)
    name = "glare"
    slice_consistent = True
    sources = ("pge-sam",)

    @classmethod
    def from_severity(cls, severity, rng, shape=(512, 512)):
        c = rng.uniform(0.25, 0.75, 2)
        return cls(
            intensity=round(lerp(0.0, 1.0, severity), 4),
            size=round(lerp(0.15, 0.4, severity), 4),
            center=(round(float(c[0]), 4), round(float(c[1]), 4)),
        )

    def apply(self, x, rng):
        h, w = x.shape[:2]
        sigma = max(self.size * min(h, w), 1.0)
        r2 = radius(x.shape, self.center[0] * h, self.center[1] * w) ** 2
        light = 0.6 * np.exp(-r2 / (2 * sigma**2)) + 0.6 * np.exp(-r2 / (2 * (sigma / 3) ** 2))
        light = np.minimum(light, 1.0)
        return screen(x, (np.float32(self.intensity) * light).astype(np.float32))


@register
@dataclass
class SpecularReflection(Degradation):
    """Specular reflections: small saturated highlights where illumination reflects off wet or glossy
    surfaces (mucosa, skin, contact gel, slide / coverslip interfaces).

    spots: per highlight [row, col, radius_y, radius_x, angle], positions as fractions of the image size
    and radii as fractions of the shorter side; intensity: how close to white the highlights get.
    """

    spots: list[list[float]] = field(default_factory=lambda: [[0.3, 0.4, 0.02, 0.04, 0.5]])
    intensity: float = 0.95
    name = "specular_reflection"
    family = "domain"
    slice_consistent = True
    sources = ("pge-sam",)

    MAX_SPOTS = 16

    @classmethod
    def from_severity(cls, severity, rng, shape=(512, 512)):
        n = cls.MAX_SPOTS
        pos = rng.uniform(0.1, 0.9, (n, 2))
        radii = rng.uniform(0.008, 0.03, (n, 2))
        angles = rng.uniform(0, np.pi, n)
        active = int(np.ceil(lerp(0, n, severity)))
        grow = lerp(0.6, 1.5, severity)
        spots = [
            [round(float(p[0]), 4), round(float(p[1]), 4), round(float(r[0] * grow), 5),
             round(float(r[1] * grow), 5), round(float(a), 4)]
            for p, r, a in zip(pos[:active], radii[:active], angles[:active])
        ]
        return cls(spots=spots, intensity=round(lerp(0.5, 1.0, severity), 4))

    def apply(self, x, rng):
        h, w = x.shape[:2]
        side = min(h, w)
        light = np.zeros((h, w), np.float32)
        for cy, cx, ry, rx, angle in self.spots:
            ry_px, rx_px = max(ry * side, 1.0), max(rx * side, 1.0)
            reach = int(np.ceil(2.2 * max(ry_px, rx_px))) + 2
            y0, y1 = max(0, int(cy * h) - reach), min(h, int(cy * h) + reach + 1)
            x0, x1 = max(0, int(cx * w) - reach), min(w, int(cx * w) + reach + 1)
            if y1 <= y0 or x1 <= x0:
                continue
            core = soft_ellipse((y1 - y0, x1 - x0), cy * h - y0, cx * w - x0, ry_px, rx_px, angle, 0.35)
            halo = soft_ellipse((y1 - y0, x1 - x0), cy * h - y0, cx * w - x0, 2 * ry_px, 2 * rx_px, angle, 1.0)
            spot = np.maximum(core, 0.35 * halo)
            light[y0:y1, x0:x1] = np.maximum(light[y0:y1, x0:x1], spot)
        return screen(x, np.float32(self.intensity) * light)


@register
@dataclass
class Vignette(Degradation):
    """Vignetting: intensity falls off towards the periphery (endoscope illumination, lens / transducer
    geometry, limited field of view).

    strength: darkening at the farthest corner (0..1); power: falloff exponent; center: (row, col).
    """

    strength: float = 0.5
    power: float = 2.0
    center: tuple[float, float] = (0.5, 0.5)
    name = "vignette"
    family = "domain"
    slice_consistent = True
    sources = ("pge-sam",)

    @classmethod
    def from_severity(cls, severity, rng, shape=(512, 512)):
        c = rng.uniform(0.42, 0.58, 2)
        return cls(
            strength=round(lerp(0.0, 0.95, severity), 4),
            power=round(lerp(2.5, 1.6, severity), 3),
            center=(round(float(c[0]), 4), round(float(c[1]), 4)),
        )

    def apply(self, x, rng):
        h, w = x.shape[:2]
        cy, cx = self.center[0] * h, self.center[1] * w
        r = radius(x.shape, cy, cx)
        rmax = max(np.hypot(cy, cx), np.hypot(h - cy, cx), np.hypot(cy, w - cx), np.hypot(h - cy, w - cx))
        gain = 1.0 - np.float32(self.strength) * np.clip(r / rmax, 0, 1) ** np.float32(self.power)
        return x * per_pixel(gain.astype(np.float32), x)


@register
@dataclass
class Shadow(Degradation):
    """Local shadow / under-exposure: folds, occluding structures or dense material block part of the
    illumination or beam (endoscopy, dental X-ray).

    regions: per shadow [row, col, radius_y, radius_x, angle] (fractions of the image size / shorter
    side); depth: darkening at the shadow centre (0..1); softness: edge width relative to the radius.
    """

    regions: list[list[float]] = field(default_factory=lambda: [[0.5, 0.3, 0.2, 0.3, 0.0]])
    depth: float = 0.6
    softness: float = 0.8
    name = "shadow"
    family = "domain"
    slice_consistent = True
    sources = ("pge-sam",)

    @classmethod
    def from_severity(cls, severity, rng, shape=(512, 512)):
        n = int(rng.integers(1, 3))
        pos = rng.uniform(0.2, 0.8, (n, 2))
        radii = rng.uniform(0.15, 0.35, (n, 2))
        angles = rng.uniform(0, np.pi, n)
        regions = [[round(float(p[0]), 4), round(float(p[1]), 4), round(float(r[0]), 4), round(float(r[1]), 4),
                    round(float(a), 4)] for p, r, a in zip(pos, radii, angles)]
        return cls(regions=regions, depth=round(lerp(0.0, 0.9, severity), 4), softness=0.8)

    def apply(self, x, rng):
        h, w = x.shape[:2]
        side = min(h, w)
        mask = np.zeros((h, w), np.float32)
        for cy, cx, ry, rx, angle in self.regions:
            m = soft_ellipse(x.shape, cy * h, cx * w, ry * side, rx * side, angle, self.softness)
            mask = np.maximum(mask, m)
        return x * per_pixel(1.0 - np.float32(self.depth) * mask, x)


@register
@dataclass
class Fog(Degradation):
    """Fog / haze: scattered light and defocus veil the image with a bright, low-contrast haze (slide
    preparation, condensation, out-of-focus light in microscopy).

    density: haze fraction blended in (0..1); airlight: haze intensity; blur: defocus sigma in pixels;
    variation: spatial non-uniformity of the haze (0 = uniform).
    """

    density: float = 0.4
    airlight: float = 0.85
    blur: float = 1.0
    variation: float = 0.35
    name = "fog"
    family = "domain"
    sources = ("pge-sam",)

    @classmethod
    def from_severity(cls, severity, rng, shape=(512, 512)):
        return cls(
            density=round(lerp(0.0, 0.8, severity), 4),
            airlight=round(float(rng.uniform(0.75, 0.95)), 4),
            blur=round(lerp(0.0, 2.5, severity) * size_scale(shape), 3),
            variation=0.35,
        )

    def apply(self, x, rng):
        field_ = smooth_noise(x.shape, rng, cells=3)
        t = np.float32(self.density) * (np.float32(1.0 - self.variation) + np.float32(self.variation) * field_)
        hazy = gaussian_blur(x, self.blur)
        # hazy * (1 - t) + airlight * t, with the (H, W) factors broadcast over the colour channels
        out = hazy * per_pixel(np.float32(1.0) - t, x)
        out += per_pixel(np.float32(self.airlight) * t, x)
        return out


def _shift_edge(x: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Shift an image by whole pixels, repeating the edge (no wrap-around)."""
    h, w = x.shape[:2]
    pad = ((abs(dy), abs(dy)), (abs(dx), abs(dx))) + (((0, 0),) if x.ndim == 3 else ())
    padded = np.pad(x, pad, mode="edge")
    y0, x0 = abs(dy) - dy, abs(dx) - dx
    return padded[y0 : y0 + h, x0 : x0 + w]


@register
@dataclass
class Ghosting(Degradation):
    """Optical ghosting / double image: a shifted, fainter duplicate of the scene from camera shake
    between exposures or internal reflections in the optics (dermoscopy).

    offset: (rows, cols) shift of the ghost in pixels; alpha: ghost weight (0..1).
    """

    offset: tuple[int, int] = (6, 10)
    alpha: float = 0.35
    name = "ghosting"
    family = "domain"
    slice_consistent = True
    sources = ("pge-sam",)

    @classmethod
    def from_severity(cls, severity, rng, shape=(512, 512)):
        angle = float(rng.uniform(0, 2 * np.pi))
        dist = lerp(4.0, 40.0, severity) * size_scale(shape)
        return cls(
            offset=(int(round(dist * np.sin(angle))), int(round(dist * np.cos(angle)))),
            alpha=round(lerp(0.0, 0.55, severity), 4),
        )

    def apply(self, x, rng):
        ghost = _shift_edge(x, int(self.offset[0]), int(self.offset[1]))
        a = np.float32(self.alpha)
        return (1.0 - a) * x + a * ghost


@register
@dataclass
class DeadPixels(Degradation):
    """Dead pixels and dropouts: defective detector elements, small dead clusters and missing scan lines
    suppress parts of the image (a few stuck-bright 'hot' pixels too).

    fraction: fraction of isolated defective pixels; clusters: number of small dead blocks; lines:
    number of missing scan lines; vertical: lines are columns if True; hot_ratio: share of isolated
    defects that are stuck bright.
    """

    fraction: float = 0.01
    clusters: int = 10
    lines: int = 2
    vertical: bool = True
    hot_ratio: float = 0.15
    name = "dead_pixels"
    family = "domain"
    slice_consistent = True
    sources = ("pge-sam",)

    MAX_CLUSTERS = 24
    MAX_LINES = 4

    @classmethod
    def from_severity(cls, severity, rng, shape=(512, 512)):
        return cls(
            fraction=round(lerp(0.0, 0.02, severity), 5),
            clusters=int(round(lerp(0, cls.MAX_CLUSTERS, severity))),
            lines=int(round(lerp(0, cls.MAX_LINES, severity))),
            vertical=bool(rng.random() < 0.5),
            hot_ratio=0.15,
        )

    def apply(self, x, rng):
        h, w = x.shape[:2]
        # the layout is drawn in full every time so that a higher severity only adds defects
        u = rng.random((h, w), dtype=np.float32)
        cluster_pos = rng.random((self.MAX_CLUSTERS, 2))
        cluster_size = rng.uniform(1.5, 4.0, (self.MAX_CLUSTERS, 2)) * max(size_scale((h, w)), 0.5)
        line_pos = rng.random(self.MAX_LINES)
        line_width = rng.integers(1, 3, self.MAX_LINES)
        dead = u < self.fraction * (1.0 - self.hot_ratio)
        hot = (u >= self.fraction * (1.0 - self.hot_ratio)) & (u < self.fraction)
        for (py, px), (sy, sx) in zip(cluster_pos[: self.clusters], cluster_size[: self.clusters]):
            y0, x0 = int(py * (h - 1)), int(px * (w - 1))
            dead[y0 : y0 + int(np.ceil(sy)), x0 : x0 + int(np.ceil(sx))] = True
        n_along = w if self.vertical else h
        for pos, width in zip(line_pos[: self.lines], line_width[: self.lines]):
            i = int(pos * (n_along - 1))
            if self.vertical:
                dead[:, i : i + int(width)] = True
            else:
                dead[i : i + int(width), :] = True
        out = x.copy()
        out[hot] = 1.0
        out[dead] = 0.0
        return out

