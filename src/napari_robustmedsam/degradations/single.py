"""One registered degradation type applied to a unit-space array at a severity: the step that ``degrade``
(:mod:`.apply`), the SSIM calibration (:mod:`.calibrate`) and the random composition (:mod:`.compose`) build on."""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import check_severity, child_seeds
from .registry import degradation_class


def spatial_shape(unit: np.ndarray, kind: str) -> tuple[int, int]:
    """(H, W) of a 2D image or of the slices of a volume."""
    return (unit.shape[1], unit.shape[2]) if kind == "volume" else (unit.shape[0], unit.shape[1])


def apply_type(
    unit: np.ndarray, kind: str, name: str, severity: float, seed: int, stage: str = "single"
) -> tuple[np.ndarray, dict[str, Any]]:
    """Apply type `name` at `severity` to a unit-space array; return it and its record entry.

    The seed gives two generators: one for the layout parameters (positions, directions), one for the
    noise realisation. Both are independent of the severity, so the same seed gives the same layout at
    every severity and the artifact only grows with it.
    """
    cls = degradation_class(name)
    param_seed, apply_seed = child_seeds(seed, 2)
    rng = np.random.default_rng
    deg = cls.from_severity(check_severity(severity), rng(param_seed), spatial_shape(unit, kind))
    out = deg.apply_unit(unit, kind, rng(apply_seed))
    return out, {"name": cls.name, "stage": stage, "severity": round(float(severity), 6), "params": deg.params}
