"""``degrade``: one degradation type at a level, a continuous severity or a target SSIM."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import DegradationError
from .base import check_severity, child_seeds, from_unit, seed_int, to_unit
from .calibrate import calibrate_unit
from .compose import apply_domain
from .levels import level_severity, normalize_level
from .modality import PGESAM_DOMAIN, modality_degradations, normalize_modality
from .registry import degradation_class
from .single import apply_type


def degrade(
    image: Any,
    type_name: str,
    level: str | None = None,
    *,
    severity: float | None = None,
    target_ssim: float | None = None,
    seed: int | np.random.Generator = 0,
    modality: str | None = None,
    return_record: bool = False,
) -> np.ndarray | tuple[np.ndarray, list[dict[str, Any]]]:
    """Degrade `image` with one degradation type; same shape, dtype and intensity range as the input.

    Give at most one of ``level`` ('LQ-1', 'LQ-2', 'LQ-3', 'LQ-3+'; default 'LQ-3'), ``severity``
    (continuous, 0 = clean .. 1 = extreme) or ``target_ssim`` (the severity is calibrated so that the SSIM
    to the clean image matches it, MedFM-Robust style). At a level the severity is drawn inside the
    level's range from the seed. 'LQ-3+' applies the type at LQ-3 and then the domain artifacts of
    ``modality`` (required for LQ-3+) at the DOMAIN_SEVERITY range (see compose.apply_domain). With
    ``return_record=True`` also returns the list of applied transforms and parameters (JSON-serialisable).
    """
    given = [v is not None for v in (level, severity, target_ssim)]
    if sum(given) > 1:
        raise DegradationError("give only one of level=, severity= or target_ssim=")
    if not any(given):
        level = "LQ-3"
    cls = degradation_class(type_name)
    seed = seed_int(seed)
    unit, layout = to_unit(image)
    level_seed, type_seed, domain_seed = child_seeds(seed, 3)
    lvl = normalize_level(level) if level is not None else None
    if lvl == "LQ-3+":
        if modality is None or not modality_degradations(modality)["domain"]:
            with_domain = [m for m, d in PGESAM_DOMAIN.items() if d]
            raise DegradationError(
                "level LQ-3+ adds the domain artifacts of a modality: pass modality= (--modality on the "
                "command line), one of "
                + ", ".join(with_domain)
            )
        normalize_modality(modality)
    calibration = None
    if severity is not None:
        s = check_severity(severity)
    elif target_ssim is not None:
        calibration = calibrate_unit(unit, layout.kind, cls.name, float(target_ssim), type_seed)
        s = calibration.severity
    else:
        s = level_severity("LQ-3" if lvl == "LQ-3+" else lvl, np.random.default_rng(level_seed).random())
    out, entry = apply_type(unit, layout.kind, cls.name, s, type_seed)
    if calibration is not None:
        entry.update(target_ssim=calibration.target_ssim, ssim=round(calibration.ssim, 4), reached=calibration.reached)
    record = [entry]
    if lvl == "LQ-3+":
        out, domain_record = apply_domain(out, layout.kind, modality, domain_seed, exclude=(cls.name,))
        record.extend(domain_record)
    result = from_unit(out, layout)
    return (result, record) if return_record else result
