"""Degradation library: the corruptions of RobustMedSAM (MedSegBench), PGE-SAM (DM-Seg) and the SSIM
calibration of MedFM-Robust, for live preview, training and evaluation.

Public API
----------
``list_degradations(modality=None, family=None) -> list[str]``
    Registered type names, optionally only those applicable to a modality ('mri', 'ct', 'ultrasound',
    'xray', 'dental_xray', 'endoscopy', 'fundus', 'dermoscopy', 'microscopy', 'pathology', 'oct',
    'nuclei', 'generic') and/or of a family ('general' or 'domain').
``get_degradation(name, **params) -> Degradation``
    An instance with explicit parameters; ``instance(image, seed_or_generator)`` degrades an image,
    ``instance.params`` gives the parameters. ``type(instance).from_severity(s, rng, shape)`` builds one
    from a continuous severity.
``degrade(image, type_name, level="LQ-3" | severity=float | target_ssim=float, seed=0, modality=None,
return_record=False) -> ndarray``
    One type at a PGE-SAM level ('LQ-1', 'LQ-2', 'LQ-3', 'LQ-3+' = LQ-3 plus the modality's domain
    artifacts), at a continuous severity in [0, 1], or calibrated to an SSIM target.
``degrade_random(image, level, modality=None, seed=0) -> (ndarray, record)``
    PGE-SAM random composition (types sampled and applied in random order); ``record`` is a
    JSON-serialisable list of ``{"name", "stage", "severity", "params"}``.
``degrade_levels(image, modality=None, seed=0, levels=LEVELS) -> {level: (ndarray, record)}``
    Every level of one image with the same types across levels (dataset generation).
``LEVELS``
    ('LQ-1', 'LQ-2', 'LQ-3', 'LQ-3+'); ``LEVEL_SEVERITY`` gives each level's severity range and
    ``DOMAIN_SEVERITY`` that of the domain artifacts added at LQ-3+.
``modality_degradations(modality) -> {'general', 'modality', 'domain', 'extra': tuple[str, ...]}``
    The seeds' modality tables (see modality.py).
``calibrate_severity(image, type_name, target_ssim, seed=0) -> Calibration``,
``calibrated_levels(image, type_name, targets=MEDFM_SSIM_TARGETS, seed=0)``
    MedFM-Robust-style SSIM calibration.
``describe(name) -> dict``
    Metadata of a type: family, what it simulates, modalities, volumetric, sources, default parameters.

Inputs and outputs
------------------
2D gray (H, W), RGB (H, W, 3), RGBA (H, W, 4; alpha passed through) and 3D gray volumes (Z, Y, X), in
uint8, uint16, int16 (any integer) or float. The output has the input's shape and dtype and stays in
its intensity range (0..255 for uint8, the image's own min..max otherwise: a CT in HU stays in HU).
Every call is deterministic given ``seed``; different seeds give different results. Bad input (unknown
type, level or modality, empty array, NaN, wrong dims) raises ``napari_robustmedsam.errors.
DegradationError`` with a message saying what to do.
"""

from __future__ import annotations

from . import blur, compression, ct, intensity, mri, noise, optical, ultrasound, xray  # noqa: F401  (register)
from .apply import degrade
from .base import Degradation
from .calibrate import MEDFM_SSIM_TARGETS, Calibration, calibrate_severity, calibrated_levels
from .compose import degrade_levels, degrade_random
from .levels import DOMAIN_SEVERITY, LEVEL_SEVERITY, LEVELS
from .modality import MODALITIES, modality_degradations
from .registry import describe, get_degradation, list_degradations

__all__ = [
    "LEVELS",
    "DOMAIN_SEVERITY",
    "LEVEL_SEVERITY",
    "MEDFM_SSIM_TARGETS",
    "MODALITIES",
    "Calibration",
    "Degradation",
    "calibrate_severity",
    "calibrated_levels",
    "degrade",
    "degrade_levels",
    "degrade_random",
    "describe",
    "get_degradation",
    "list_degradations",
    "modality_degradations",
]
