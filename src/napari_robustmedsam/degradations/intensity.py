"""Global intensity changes: brightness, contrast, gamma and colour jitter (exposure, display calibration,
stain and illumination variation)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._fields import luminance, per_pixel
from .base import Degradation, lerp, register


def _sign(rng: np.random.Generator) -> float:
    return float(rng.choice([-1.0, 1.0]))


def _scale_about_mean(x: np.ndarray, factor: float) -> np.ndarray:
    mean = np.float32(luminance(x).mean())
    return (x - mean) * np.float32(factor) + mean


@register
@dataclass
class Brightness(Degradation):
    """Brightness shift: over- or under-exposure, or a mis-set window level.

    delta: intensity added (fraction of the range; negative darkens).
    """

    delta: float = 0.2
    name = "brightness"
    sources = ("robustmedsam",)

    @classmethod
    def from_severity(cls, severity, rng, shape=(512, 512)):
        return cls(delta=round(_sign(rng) * lerp(0.0, 0.4, severity), 4))

    def apply(self, x, rng):
        return x + np.float32(self.delta)


@register
@dataclass
class Contrast(Degradation):
    """Contrast reduction: intensities squeezed towards the mean (low dose, scatter, a too-wide window).

    factor: contrast multiplier around the mean intensity (1 = unchanged, < 1 flatter).
    """

    factor: float = 0.5
    name = "contrast"
    sources = ("robustmedsam",)

    @classmethod
    def from_severity(cls, severity, rng, shape=(512, 512)):
        return cls(factor=lerp(1.0, 0.12, severity))

    def apply(self, x, rng):
        return _scale_about_mean(x, self.factor)


@register
@dataclass
class BrightnessContrast(Degradation):
    """Brightness/contrast variation: inconsistent illumination, exposure settings or display calibration.

    contrast: multiplier around the mean; brightness: intensity added (fraction of the range).
    """

    contrast: float = 0.7
    brightness: float = 0.15
    name = "brightness_contrast"
    sources = ("pge-sam",)

    @classmethod
    def from_severity(cls, severity, rng, shape=(512, 512)):
        sc, sb = _sign(rng), _sign(rng)
        contrast = 1.0 + lerp(0.0, 0.6 if sc > 0 else -0.6, severity)
        return cls(contrast=round(contrast, 4), brightness=round(sb * lerp(0.0, 0.25, severity), 4))

    def apply(self, x, rng):
        return _scale_about_mean(x, self.contrast) + np.float32(self.brightness)


@register
@dataclass
class Gamma(Degradation):
    """Gamma change: non-linear intensity mapping from display gamma variations or post-processing.

    gamma: exponent applied to the unit-range intensity (> 1 darkens mid-tones, < 1 brightens).
    """

    gamma: float = 2.0
    name = "gamma"
    sources = ("pge-sam",)

    @classmethod
    def from_severity(cls, severity, rng, shape=(512, 512)):
        return cls(gamma=round(float(np.exp(_sign(rng) * lerp(0.0, 1.0, severity))), 4))

    def apply(self, x, rng):
        return np.power(np.clip(x, 0.0, 1.0), np.float32(self.gamma))


def _hue_rotation(turns: float) -> np.ndarray:
    """3x3 matrix rotating hue by `turns` of a full turn (rotation of the I/Q plane of YIQ)."""
    rgb2yiq = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    a = 2 * np.pi * turns
    rot = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    return (np.linalg.inv(rgb2yiq) @ rot @ rgb2yiq).astype(np.float32)


@register
@dataclass
class ColorJitter(Degradation):
    """Colour jitter: stain, illumination and white-balance variation between scanners and cameras
    (pathology, dermoscopy, nuclei). Gray images only get the brightness and contrast parts.

    brightness, contrast, saturation: multipliers (1 = unchanged); hue: shift in fractions of a turn.
    """

    brightness: float = 1.2
    contrast: float = 0.8
    saturation: float = 1.5
    hue: float = 0.05
    name = "color_jitter"
    family = "domain"
    sources = ("robustmedsam",)

    @classmethod
    def from_severity(cls, severity, rng, shape=(512, 512)):
        sb, sc, ss, sh = (_sign(rng) for _ in range(4))
        return cls(
            brightness=round(1.0 + sb * lerp(0.0, 0.35, severity), 4),
            contrast=round(1.0 + sc * lerp(0.0, 0.6, severity), 4),
            saturation=round(max(0.0, 1.0 + ss * lerp(0.0, 0.75, severity)), 4),
            hue=round(sh * lerp(0.0, 0.2, severity), 4),
        )

    def apply(self, x, rng):
        out = x * np.float32(self.brightness)
        out = _scale_about_mean(np.clip(out, 0, 1), self.contrast)
        if x.ndim == 3:
            out = np.clip(out, 0, 1)
            lum = per_pixel(luminance(out), out)
            out = lum + (out - lum) * np.float32(self.saturation)
            if self.hue:
                m = _hue_rotation(self.hue)
                out = np.stack(
                    [m[i, 0] * out[..., 0] + m[i, 1] * out[..., 1] + m[i, 2] * out[..., 2] for i in range(3)],
                    axis=-1,
                )
        return out
