"""Random composition for training, PGE-SAM style.

For each image 1-3 types are drawn from the general set (PGE-SAM's eight) plus the modality's
RobustMedSAM corruptions and applied in random order, with severities drawn inside the level's range.
The draw depends only on the seed, not on the level, so LQ-1, LQ-2 and LQ-3 of an image use the same
types in the same order and differ only in intensity (PGE-SAM's "semantic consistency"). LQ-3+ is the
LQ-3 chain followed by the modality's domain artifacts (all of them if there are at most three, else
three drawn at random), in random order, at the DOMAIN_SEVERITY range (that of LQ-2: they are stacked on
an LQ-3 image).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import DegradationError
from .base import child_seeds, from_unit, seed_int, to_unit
from .levels import DOMAIN_SEVERITY, LEVELS, level_severity, normalize_level
from .modality import GENERAL_PGESAM, modality_degradations, normalize_modality
from .single import apply_type

MAX_GENERAL = 3  # general types per image: 1..MAX_GENERAL
MAX_DOMAIN = 3  # domain artifacts per image at LQ-3+


def general_pool(modality: str | None) -> list[str]:
    """Types the composition draws from for LQ-1..LQ-3: PGE-SAM general + RobustMedSAM modality set."""
    groups = modality_degradations(modality)
    return list(dict.fromkeys(GENERAL_PGESAM + groups["modality"]))


def apply_domain(
    unit: np.ndarray, kind: str, modality: str | None, seed: int, exclude: tuple[str, ...] = ()
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Apply the modality's domain artifacts (LQ-3+ stage) to a unit-space array."""
    pool = [n for n in modality_degradations(modality)["domain"] if n not in exclude]
    choose_seed, level_seed, *type_seeds = child_seeds(seed, 2 + MAX_DOMAIN)
    rng = np.random.default_rng(choose_seed)
    chosen = list(rng.permutation(pool)[:MAX_DOMAIN]) if pool else []
    u = np.random.default_rng(level_seed).random(MAX_DOMAIN)
    lo, hi = DOMAIN_SEVERITY
    record = []
    for i, name in enumerate(chosen):
        unit, entry = apply_type(unit, kind, str(name), lo + (hi - lo) * u[i], type_seeds[i], stage="domain")
        record.append(entry)
    return unit, record


def _compose_unit(
    unit: np.ndarray, kind: str, level: str, modality: str | None, seed: int
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    lvl = normalize_level(level)
    choose_seed, level_seed, domain_seed, *type_seeds = child_seeds(seed, 3 + MAX_GENERAL)
    rng = np.random.default_rng(choose_seed)
    pool = general_pool(modality)
    k = int(rng.integers(1, MAX_GENERAL + 1))
    chosen = [str(n) for n in rng.permutation(pool)[:k]]  # the permutation is also the order
    u = np.random.default_rng(level_seed).random(MAX_GENERAL)
    base_level = "LQ-3" if lvl == "LQ-3+" else lvl
    record = []
    for i, name in enumerate(chosen):
        unit, entry = apply_type(unit, kind, name, level_severity(base_level, u[i]), type_seeds[i], stage="general")
        record.append(entry)
    if lvl == "LQ-3+":
        unit, domain_record = apply_domain(unit, kind, modality, domain_seed)
        record.extend(domain_record)
    return unit, record


def degrade_random(
    image: Any, level: str = "LQ-3", modality: str | None = None, seed: int | np.random.Generator = 0
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Randomly composed degradation of `image` at `level` for `modality` (see module docstring).

    Returns ``(degraded, record)``: the degraded image (same shape, dtype, range) and a JSON-serialisable
    list of the applied transforms, in order: ``{"name", "stage", "severity", "params"}``.
    """
    normalize_modality(modality)
    seed = seed_int(seed)
    unit, layout = to_unit(image)
    out, record = _compose_unit(unit, layout.kind, level, modality, seed)
    return from_unit(out, layout), record


def degrade_levels(
    image: Any, modality: str | None = None, seed: int = 0, levels: tuple[str, ...] | list[str] = LEVELS
) -> dict[str, tuple[np.ndarray, list[dict[str, Any]]]]:
    """All requested levels of one image with consistent types across levels (for datasets/manifests)."""
    normalize_modality(modality)
    if not levels:
        raise DegradationError(f"no levels requested; valid levels: {', '.join(LEVELS)}")
    seed = seed_int(seed)
    unit, layout = to_unit(image)
    out = {}
    for level in levels:
        lvl = normalize_level(level)
        degraded, record = _compose_unit(unit, layout.kind, lvl, modality, seed)
        out[lvl] = (from_unit(degraded, layout), record)
    return out
