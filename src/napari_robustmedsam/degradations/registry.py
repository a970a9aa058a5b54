"""THE registry of degradations: name -> class, with metadata (family, modalities, what it simulates).

Degradation modules register their classes with the ``@register`` decorator (:func:`.base.register`); this
module imports them all, so a lookup here sees every built-in type. Everything else (levels, composition, CLI,
gallery, benchmark) looks types up here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..errors import DegradationError
from . import blur, compression, ct, intensity, mri, noise, optical, ultrasound, xray  # noqa: F401  (they register)
from .base import REGISTERED, Degradation
from .modality import modalities_using, modality_degradations


def degradation_class(name: str) -> type[Degradation]:
    """The class registered as `name`; DegradationError listing the valid names otherwise."""
    key = str(name).strip().lower().replace("-", "_").replace(" ", "_")
    try:
        return REGISTERED[key]
    except KeyError:
        raise DegradationError(
            f"unknown degradation type {name!r}; valid types: {', '.join(sorted(REGISTERED))}"
        ) from None


def get_degradation(name: str, **params: Any) -> Degradation:
    """An instance of degradation `name` with explicit parameters (defaults for the ones not given).

    The instance is callable as ``instance(image, seed_or_rng)`` and exposes ``instance.params``.
    """
    cls = degradation_class(name)
    try:
        return cls(**params)
    except TypeError as err:
        valid = [f.name for f in dataclasses.fields(cls)]
        raise DegradationError(f"bad parameters for {cls.name!r} ({err}); its parameters are: {valid}") from None


def list_degradations(modality: str | None = None, family: str | None = None) -> list[str]:
    """Registered names (sorted), optionally only those applicable to `modality` and/or of `family`
    ('general' or 'domain')."""
    names = sorted(REGISTERED)
    if modality is not None:
        groups = modality_degradations(modality)
        applicable = {n for group in groups.values() for n in group}
        names = [n for n in names if n in applicable]
    if family is not None:
        if family not in ("general", "domain"):
            raise DegradationError(f"unknown family {family!r}; valid families: general, domain")
        names = [n for n in names if REGISTERED[n].family == family]
    return names


def describe(name: str) -> dict[str, Any]:
    """Metadata of one type: name, family, what it simulates, modalities, volumetric, sources, defaults."""
    cls = degradation_class(name)
    return {
        "name": cls.name,
        "family": cls.family,
        "simulates": cls.simulates(),
        "modalities": modalities_using(cls.name),
        "volumetric": cls.volumetric,
        "sources": list(cls.sources),
        "default_params": cls().params,
    }
