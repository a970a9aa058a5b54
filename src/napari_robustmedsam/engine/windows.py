"""CT intensity windows: what the model sees and what the display shows, from one level / width.

The image keeps its values (CT in Hounsfield units); a window maps [level - width/2, level + width/2] to
0..255 (uint8) for the model, as MedSAM prepares CT before inference, and sets the layer's contrast limits
to the same range. Without a window (MRI, ultrasound, photographs) the pixels reach the model unchanged and
its own preprocessing normalises them (min-max over the slice); the display keeps its percentile limits.

The presets are the common radiology windows. ``parse_window`` reads a preset name or ``"L,W"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import UserFacingError


@dataclass(frozen=True)
class Window:
    level: float
    width: float
    name: str = "custom"

    @property
    def low(self) -> float:
        return self.level - self.width / 2.0

    @property
    def high(self) -> float:
        return self.level + self.width / 2.0

    @property
    def spec(self) -> str:
        """The text that gives this window back through :func:`parse_window` (preset name or ``L,W``)."""
        return self.name if self.name in PRESETS else f"{self.level:g},{self.width:g}"

    def apply(self, values: Any) -> np.ndarray:
        """Values -> uint8 0..255 (below the window 0, above it 255)."""
        x = np.asarray(values, dtype=np.float32)
        out = (x - np.float32(self.low)) * np.float32(255.0 / self.width)
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)

    def contrast_limits(self) -> tuple[float, float]:
        return float(self.low), float(self.high)

    def to_json(self) -> dict:
        return {"name": self.name, "level": self.level, "width": self.width}


#: Common CT windows (level, width) in HU. Soft tissue is MedSAM's CT window.
PRESETS: dict[str, Window] = {
    "soft-tissue": Window(40.0, 400.0, "soft-tissue"),
    "lung": Window(-600.0, 1500.0, "lung"),
    "bone": Window(400.0, 1800.0, "bone"),
    "brain": Window(40.0, 80.0, "brain"),
}
#: The window a CT gets when none is chosen.
DEFAULT_CT_WINDOW = "soft-tissue"
NO_WINDOW = "none"
#: Layer metadata key of the window an image layer is shown and segmented with (its ``spec``).
WINDOW_KEY = "robustmedsam_window"
#: An image whose lowest values reach this are taken for CT in HU (air is -1000 HU; MRI and photographs
#: have no such values) when the file does not say its modality.
CT_AIR_HU = -900.0


def parse_window(text: str | Window | None) -> Window | None:
    """``"soft-tissue"``, ``"lung"``, ``"bone"``, ``"brain"``, ``"L,W"`` (e.g. ``"50,350"``) or ``"none"``."""
    if text is None or isinstance(text, Window):
        return text
    key = str(text).strip().lower().replace("_", "-").replace(" ", "-")
    if key in ("", NO_WINDOW, "off"):
        return None
    if key in ("soft", "softtissue"):
        key = "soft-tissue"
    if key in PRESETS:
        return PRESETS[key]
    parts = key.split(",")
    try:
        level, width = (float(v) for v in parts)
    except ValueError:
        raise UserFacingError(
            f"unknown window {text!r}: use {', '.join(PRESETS)}, none, or LEVEL,WIDTH in HU (e.g. 40,400)"
        ) from None
    if not np.isfinite(level) or not np.isfinite(width) or width <= 0:
        raise UserFacingError(f"window {text!r}: the width must be a positive number of HU (e.g. 40,400)")
    return Window(level, width)


def looks_like_ct(array: Any, modality: str | None = None) -> bool:
    """True for CT: the modality says so, or (no modality) the values reach air's HU."""
    if modality:
        return modality.upper() == "CT"
    arr = np.asarray(array)
    if arr.dtype.kind not in "if" or arr.size == 0:
        return False
    step = max(1, arr.size // 1_000_000)  # a strided sample is enough to find air
    return float(np.min(arr.reshape(-1)[::step])) <= CT_AIR_HU


def default_window(array: Any, modality: str | None = None) -> Window | None:
    """The soft-tissue window for CT, none otherwise."""
    return PRESETS[DEFAULT_CT_WINDOW] if looks_like_ct(array, modality) else None


class WindowedView:
    """What the model sees of an image or volume: each read is windowed to uint8, the data stay as they are."""

    def __init__(self, data: Any, window: Window) -> None:
        self.data = data
        self.window = window
        self.shape = tuple(int(s) for s in np.shape(data))
        self.ndim = len(self.shape)
        self.dtype = np.dtype(np.uint8)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key):
        return self.window.apply(np.asarray(self.data[key]))

    def __array__(self, dtype=None, copy=None):
        out = self.window.apply(np.asarray(self.data))
        return out if dtype is None else out.astype(dtype)


def model_view(data: Any, window: Window | None) -> Any:
    """``data`` as the model should see it under ``window`` (unchanged without a window)."""
    return data if window is None else WindowedView(data, window)


def layer_window(metadata: dict | None, data: Any = None) -> Window | None:
    """The window stored in a layer's metadata; without one, the default for ``data`` (given) or none."""
    meta = metadata or {}
    if WINDOW_KEY in meta:
        return parse_window(meta[WINDOW_KEY])
    if data is None:
        return None
    modality = (meta.get("robustmedsam_geometry") or {}).get("modality")
    return default_window(data, modality)
