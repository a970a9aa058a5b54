"""Lossy compression (JPEG, encoded and decoded in memory with Pillow)."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .base import Degradation, register


def jpeg_roundtrip(x: np.ndarray, quality: int) -> np.ndarray:
    """Encode a unit-space (H, W) or (H, W, 3) image as 8-bit JPEG at `quality` and decode it."""
    u8 = np.rint(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(u8, mode="L" if x.ndim == 2 else "RGB").save(buffer, format="JPEG", quality=int(quality))
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return np.asarray(decoded, dtype=np.float32) * np.float32(1.0 / 255.0)


@register
@dataclass
class JPEGCompression(Degradation):
    """JPEG compression: 8x8 block and ringing artifacts (and colour bleeding) of lossy archiving or
    transmission. The image is quantised to 8 bits for encoding, as JPEG baseline requires.

    quality: JPEG quality 1 (worst) .. 95.
    """

    quality: int = 20
    name = "jpeg"
    sources = ("robustmedsam", "pge-sam")
    heavy = True

    @classmethod
    def from_severity(cls, severity, rng, shape=(512, 512)):
        return cls(quality=int(max(1, round(95 * (1.0 - severity) ** 1.7))))

    def apply(self, x, rng):
        if not 1 <= int(self.quality) <= 100:
            from ..errors import DegradationError

            raise DegradationError(f"jpeg quality must be in 1..100, got {self.quality}")
        return jpeg_roundtrip(x, int(self.quality))
