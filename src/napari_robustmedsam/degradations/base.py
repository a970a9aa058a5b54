"""Base class of every degradation and the intensity / layout handling they share.

A degradation works in a float32 "unit" space: the input is mapped to [0, 1] using its intensity range
(0..255 for uint8, the image's own min..max for every other dtype, so a CT in HU comes back in HU), the
artifact is applied, and the result is clipped to [0, 1], mapped back to the input range and cast to the
input dtype (rounded for integer dtypes).

Layouts: 2D gray (H, W); 2D RGB (H, W, 3); 2D RGBA (H, W, 4), whose alpha channel is passed through
untouched; 3D gray volumes (Z, Y, X). A 3D array whose last axis has length 3 or 4 is read as RGB(A).
Volumes are degraded slice by slice (each slice gets its own seed derived from the call's seed, or the
same seed when the artifact is a fixed property of the device, e.g. a dead detector pixel) unless the
artifact is volumetric (MRI k-space artifacts, bias field), in which case the whole volume is processed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ..errors import DegradationError

MIN_SIDE = 8  # SSIM (7x7 window) and most filters need at least this many pixels per side


def as_generator(rng_or_seed: np.random.Generator | int | None) -> np.random.Generator:
    """A numpy Generator from a seed (int) or an existing Generator (never the global RNG)."""
    if isinstance(rng_or_seed, np.random.Generator):
        return rng_or_seed
    if rng_or_seed is None:
        raise DegradationError("a seed is required: pass seed=<int> (degradations are deterministic given a seed)")
    if isinstance(rng_or_seed, (bool, np.bool_)) or not isinstance(rng_or_seed, (int, np.integer)):
        raise DegradationError(f"seed must be a non-negative int or a numpy Generator, got {rng_or_seed!r}")
    if rng_or_seed < 0:
        raise DegradationError(f"seed must be a non-negative int, got {rng_or_seed}")
    return np.random.default_rng(int(rng_or_seed))


def seed_int(rng_or_seed: np.random.Generator | int) -> int:
    """An int seed: the seed itself, or one drawn from a Generator (so Generators can be passed too)."""
    if isinstance(rng_or_seed, np.random.Generator):
        return int(rng_or_seed.integers(2**63))
    as_generator(rng_or_seed)  # validates
    return int(rng_or_seed)


def child_seeds(seed: np.random.Generator | int, n: int) -> list[int]:
    """`n` independent int seeds derived deterministically from `seed` (reusable, unlike Generators)."""
    children = np.random.SeedSequence(seed_int(seed)).spawn(n)
    return [int(c.generate_state(2, np.uint64)[0] >> np.uint64(1)) for c in children]


# ---------------------------------------------------------------------------------------------------------
# Layout and intensity range


@dataclass(frozen=True)
class Layout:
    """How an input array is organised and how to map it to / from the unit working space."""

    kind: str  # "gray", "rgb" or "volume"
    dtype: np.dtype
    low: float  # intensity mapped to 0
    high: float  # intensity mapped to 1
    clip_low: float  # output is clipped to [clip_low, clip_high] (the input's range)
    clip_high: float
    alpha: np.ndarray | None = None  # RGBA alpha channel, passed through

    @property
    def is_volume(self) -> bool:
        return self.kind == "volume"


def check_image(image: Any) -> np.ndarray:
    """Validate an input image and return it as an ndarray; raise DegradationError naming the problem."""
    if image is None:
        raise DegradationError("no image given (got None): pass a 2D, RGB or 3D numpy array")
    arr = np.asarray(image)
    if arr.dtype == object or arr.dtype.kind not in "uif":
        raise DegradationError(
            f"unsupported image dtype {arr.dtype}: use uint8, uint16, int16 (or another integer type) or float"
        )
    if arr.size == 0:
        raise DegradationError(f"the image is empty (shape {arr.shape}): pass a non-empty 2D, RGB or 3D array")
    if arr.ndim not in (2, 3):
        raise DegradationError(
            f"expected a 2D image (H, W), an RGB(A) image (H, W, 3|4) or a 3D volume (Z, Y, X), "
            f"got an array of shape {arr.shape} ({arr.ndim} dims)"
        )
    spatial = arr.shape[:2] if (arr.ndim == 2 or arr.shape[-1] in (3, 4)) else arr.shape[1:]
    if min(spatial) < MIN_SIDE:
        raise DegradationError(
            f"image too small ({arr.shape}): each spatial side must have at least {MIN_SIDE} pixels"
        )
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        raise DegradationError(
            "the image contains NaN or infinite values: replace them first (e.g. numpy.nan_to_num)"
        )
    return arr


def _unit_values(arr: np.ndarray, low: float, high: float) -> np.ndarray:
    """``(arr - low) / (high - low)`` as float32. In float32 for 8/16-bit integers and moderate float32 values
    (exact enough); otherwise in float64, one slab at a time,
    because float32 would turn values beyond its range into inf/NaN, or flush values below it to zero."""
    if arr.dtype.itemsize <= 2 or (arr.dtype == np.float32 and max(abs(low), abs(high)) <= 1e30):
        return (arr.astype(np.float32) - np.float32(low)) * np.float32(1.0 / (high - low))
    scale = 1.0 / (high - low)
    if not np.isfinite(scale) or scale == 0:
        raise DegradationError(
            f"the image's values span {low:g} .. {high:g}, beyond what can be scaled: rescale the image first")
    out = np.empty(arr.shape, np.float32)
    step = max(1, (1 << 22) // max(1, int(np.prod(arr.shape[1:]))))
    for start in range(0, arr.shape[0], step):
        block = arr[start:start + step]
        out[start:start + step] = (block.astype(np.float64) - low) * scale
    return out


def to_unit(image: Any) -> tuple[np.ndarray, Layout]:
    """Validate `image` and map it to float32 in [0, 1]; return the unit array and its Layout."""
    arr = check_image(image)
    alpha = None
    if arr.ndim == 3 and arr.shape[-1] == 4:
        alpha = arr[..., 3].copy()
        arr = arr[..., :3]
    kind = "gray" if arr.ndim == 2 else ("rgb" if arr.shape[-1] == 3 else "volume")
    if arr.dtype == np.uint8:
        low, high = 0.0, 255.0
    else:
        low, high = float(arr.min()), float(arr.max())
    clip_low, clip_high = low, high
    if high <= low:  # constant image: any positive scale works, keep the constant as 0
        high = low + 1.0
    unit = _unit_values(arr, low, high)
    layout = Layout(kind, arr.dtype, low, high, clip_low, clip_high, alpha)
    return unit, layout


def from_unit(unit: np.ndarray, layout: Layout) -> np.ndarray:
    """Map a unit-space array back to the input's intensity range and dtype."""
    # float32 is exact enough for 8/16-bit integers and float32 inputs; wider types go through float64
    work = np.float32 if layout.dtype.itemsize <= 2 or layout.dtype == np.float32 else np.float64
    out = unit.astype(work, copy=True)
    out *= work(layout.high - layout.low)
    out += work(layout.low)
    np.clip(out, work(layout.clip_low), work(layout.clip_high), out=out)
    if layout.dtype.kind in "ui":
        np.rint(out, out=out)
    out = out.astype(layout.dtype, copy=False)
    if layout.alpha is not None:
        out = np.concatenate([out, layout.alpha[..., None].astype(layout.dtype)], axis=-1)
    return out


# ---------------------------------------------------------------------------------------------------------
# Base class


def lerp(a: float, b: float, t: float) -> float:
    """Linear interpolation from a (t = 0) to b (t = 1)."""
    return float(a + (b - a) * t)


def check_severity(severity: float) -> float:
    try:
        s = float(severity)
    except (TypeError, ValueError):
        raise DegradationError(f"severity must be a number in [0, 1], got {severity!r}") from None
    if not np.isfinite(s) or not 0.0 <= s <= 1.0:
        raise DegradationError(f"severity must be in [0, 1] (0 = clean, 1 = extreme), got {severity!r}")
    return s


def size_scale(shape: tuple[int, ...]) -> float:
    """Spatial parameters are designed for a 512-px image and scaled with the image's longer side."""
    return max(shape[0], shape[1]) / 512.0


@dataclass
class Degradation:
    """One artifact with explicit parameters (a dataclass); call it on an image with a seed or Generator.

    Subclasses set the class attributes below, declare their parameters as dataclass fields, and implement
    ``from_severity`` (continuous severity in [0, 1] -> parameters) and ``apply`` (unit-space 2D gray
    (H, W) or RGB (H, W, 3) float32 -> same). Volumetric artifacts also implement ``apply_volume``.
    """

    name: ClassVar[str] = ""
    family: ClassVar[str] = "general"  # "general" (all modalities) or "domain" (modality-specific)
    volumetric: ClassVar[bool] = False  # physics acts on the whole 3D volume (k-space, coil field)
    slice_consistent: ClassVar[bool] = False  # a fixed device property: same layout on every slice
    sources: ClassVar[tuple[str, ...]] = ()  # seed papers that list it
    heavy: ClassVar[bool] = False  # JPEG / k-space: allowed 150 ms instead of 50 ms at 512 x 512

    # -- construction ----------------------------------------------------------------------------------
    @classmethod
    def from_severity(
        cls, severity: float, rng: np.random.Generator, shape: tuple[int, ...] = (512, 512)
    ) -> "Degradation":
        """An instance whose strength matches `severity` in [0, 1]; `rng` draws the layout parameters
        (positions, directions) so that the same rng gives the same layout at every severity."""
        raise NotImplementedError

    @property
    def params(self) -> dict[str, Any]:
        """The explicit parameters, JSON-serialisable."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def simulates(cls) -> str:
        """What the artifact simulates (first paragraph of the class docstring)."""
        doc = (cls.__doc__ or "").strip()
        return " ".join(doc.split("\n\n")[0].split())

    # -- application -----------------------------------------------------------------------------------
    def apply(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Degrade a unit-space 2D image (H, W) or (H, W, 3); may return values outside [0, 1]."""
        raise NotImplementedError

    def apply_volume(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Degrade a unit-space volume (Z, Y, X); only volumetric degradations override this."""
        raise NotImplementedError

    def apply_unit(self, x: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
        """Apply to a unit-space array of a given layout kind; the result is clipped to [0, 1]."""
        if kind == "volume":
            if self.volumetric:
                out = self.apply_volume(x, rng)
            else:
                seed = seed_int(rng)
                seeds = [seed] * x.shape[0] if self.slice_consistent else child_seeds(seed, x.shape[0])
                out = np.stack([self.apply(x[z], np.random.default_rng(s)) for z, s in enumerate(seeds)])
        else:
            out = self.apply(x, rng)
        out = np.asarray(out, dtype=np.float32)
        if np.shares_memory(out, x):  # never clip the caller's array in place
            out = out.copy()
        if out.shape != x.shape:  # pragma: no cover - programming error in a subclass
            raise RuntimeError(f"{self.name} changed the shape {x.shape} -> {out.shape}")
        return np.clip(out, 0.0, 1.0, out=out)

    def __call__(self, image: Any, rng: np.random.Generator | int = 0) -> np.ndarray:
        """Degrade `image` (any supported layout and dtype); same shape, dtype and intensity range."""
        unit, layout = to_unit(image)
        return from_unit(self.apply_unit(unit, layout.kind, as_generator(rng)), layout)


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


REGISTERED: dict[str, type[Degradation]] = {}  # name -> class; looked up through :mod:`.registry`


def register(cls: type[Degradation]) -> type[Degradation]:
    """Class decorator adding a Degradation subclass to the registry under ``cls.name``."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no name")
    if cls.name in REGISTERED and REGISTERED[cls.name] is not cls:
        raise TypeError(f"degradation name {cls.name!r} registered twice")
    if cls.family not in ("general", "domain"):
        raise TypeError(f"{cls.__name__}.family must be 'general' or 'domain'")
    REGISTERED[cls.name] = cls
    return cls
