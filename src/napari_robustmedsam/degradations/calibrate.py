"""SSIM calibration (MedFM-Robust protocol): find the severity at which a degradation brings the SSIM to
the clean image down to a target, by bisection (SSIM falls monotonically with severity for a fixed seed).

MedFM-Robust calibrates five severity levels by SSIM; its exact targets are not in our seed text, so the
default targets below (0.90 .. 0.50) are our choice.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from skimage.metrics import structural_similarity

from ..errors import DegradationError
from .base import child_seeds, seed_int, to_unit
from .registry import degradation_class
from .single import apply_type

MEDFM_SSIM_TARGETS: tuple[float, ...] = (0.90, 0.80, 0.70, 0.60, 0.50)


def ssim(clean_unit: np.ndarray, degraded_unit: np.ndarray, kind: str) -> float:
    """SSIM between two unit-space arrays (data range 1); mean over slices for volumes, over channels for
    RGB."""
    if kind == "volume":
        return float(np.mean([ssim(a, b, "gray") for a, b in zip(clean_unit, degraded_unit)]))
    channel_axis = -1 if kind == "rgb" else None
    return float(
        structural_similarity(clean_unit, degraded_unit, data_range=1.0, channel_axis=channel_axis)
    )


@dataclass(frozen=True)
class Calibration:
    """Result of a calibration: the severity found, the SSIM it gives, and whether the target was met."""

    name: str
    target_ssim: float
    severity: float
    ssim: float
    reached: bool
    params: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def calibrate_unit(
    unit: np.ndarray, kind: str, name: str, target_ssim: float, seed: int, tol: float = 0.01, max_iter: int = 14
) -> Calibration:
    """Bisection on the severity in [0, 1] for a unit-space array (the core of ``calibrate_severity``)."""
    if not 0.0 < target_ssim < 1.0:
        raise DegradationError(f"target SSIM must be in (0, 1), got {target_ssim}")
    cls = degradation_class(name)

    def evaluate(s: float) -> tuple[float, dict[str, Any]]:
        out, entry = apply_type(unit, kind, cls.name, s, seed)
        return ssim(unit, out, kind), entry["params"]

    best: tuple[float, float, dict[str, Any]] | None = None  # (severity, ssim, params)
    lo, hi = 0.0, 1.0
    value, params = evaluate(hi)
    best = (hi, value, params)
    if value > target_ssim + tol:  # even the extreme setting is milder than the target
        return Calibration(cls.name, target_ssim, hi, value, False, params)
    for _ in range(max_iter):
        mid = 0.5 * (lo + hi)
        value, params = evaluate(mid)
        if abs(value - target_ssim) < abs(best[1] - target_ssim):
            best = (mid, value, params)
        if abs(value - target_ssim) <= tol / 2:
            break
        if value > target_ssim:
            lo = mid
        else:
            hi = mid
    s, value, params = best
    return Calibration(cls.name, target_ssim, round(s, 6), value, abs(value - target_ssim) <= tol, params)


def calibrate_severity(
    image: Any, type_name: str, target_ssim: float, seed: int = 0, tol: float = 0.01
) -> Calibration:
    """Severity at which `type_name` (with this seed) gives SSIM ~= `target_ssim` to the clean image.

    ``degrade(image, type_name, severity=result.severity, seed=seed)`` reproduces the calibrated image.
    ``reached`` is False when the target cannot be met within ``tol`` (e.g. a mild artifact such as a
    vignette cannot bring the SSIM down to 0.5): the closest severity is returned.
    """
    unit, layout = to_unit(image)
    _level_seed, type_seed, _domain_seed = child_seeds(seed_int(seed), 3)
    return calibrate_unit(unit, layout.kind, type_name, float(target_ssim), type_seed, tol=tol)


def calibrated_levels(
    image: Any, type_name: str, targets: tuple[float, ...] = MEDFM_SSIM_TARGETS, seed: int = 0, tol: float = 0.01
) -> list[Calibration]:
    """One calibration per SSIM target (MedFM-Robust: five levels)."""
    return [calibrate_severity(image, type_name, t, seed=seed, tol=tol) for t in targets]
