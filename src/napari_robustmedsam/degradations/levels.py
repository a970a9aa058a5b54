"""Quality levels (PGE-SAM's LQ-1, LQ-2, LQ-3, LQ-3+) and their mapping to the continuous severity.

Every degradation maps a severity in [0, 1] to its parameters (0 = clean, 1 = extreme). A level is a
severity range; parameters are drawn uniformly inside it, as PGE-SAM draws them from level-specific
ranges. The ranges do not overlap, so for a given seed LQ-1 < LQ-2 < LQ-3 in strength. LQ-3+ is LQ-3
followed by the modality's domain-specific artifacts (see compose.py) at DOMAIN_SEVERITY.
"""

from __future__ import annotations

from ..errors import DegradationError

LEVELS: tuple[str, ...] = ("LQ-1", "LQ-2", "LQ-3", "LQ-3+")

#: severity range of each level (LQ-3+: the LQ-3 range for the general transforms)
LEVEL_SEVERITY: dict[str, tuple[float, float]] = {
    "LQ-1": (0.20, 0.35),
    "LQ-2": (0.45, 0.60),
    "LQ-3": (0.70, 0.85),
    "LQ-3+": (0.70, 0.85),
}

#: severity range of the domain artifacts added at LQ-3+ (up to three are stacked on an LQ-3 image, so
#: each is applied at the LQ-2 range; PGE-SAM does not give their intensity)
DOMAIN_SEVERITY: tuple[float, float] = (0.45, 0.60)


def normalize_level(level: str) -> str:
    """Canonical level name ('lq3', 'LQ3+', 'lq-2' ... accepted); DegradationError listing the levels."""
    key = str(level).strip().upper().replace("_", "-").replace(" ", "")
    if key.startswith("LQ") and not key.startswith("LQ-"):
        key = "LQ-" + key[2:]
    if key not in LEVEL_SEVERITY:
        raise DegradationError(f"unknown level {level!r}; valid levels: {', '.join(LEVELS)}")
    return key


def level_severity(level: str, u: float) -> float:
    """Severity at relative position `u` in [0, 1] inside the level's range."""
    lo, hi = LEVEL_SEVERITY[normalize_level(level)]
    return lo + (hi - lo) * float(u)
