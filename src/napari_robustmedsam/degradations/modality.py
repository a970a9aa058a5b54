"""Modality -> default degradation sets, from the seed papers' tables.

For each modality three groups:

- ``general``: applied to every modality. PGE-SAM's eight general degradations (Gaussian noise,
  salt & pepper, motion blur, Gaussian blur, brightness/contrast, gamma, JPEG, glare) plus RobustMedSAM's
  all-modality ones (Gaussian noise, Gaussian blur, contrast, brightness).
- ``modality``: RobustMedSAM Table 1 (MedSegBench) acquisition corruptions of that modality.
- ``domain``: PGE-SAM Table 27/28 domain-specific artifacts, added at LQ-3+.
- ``extra``: other registered types that fit the modality (MRI spike), offered in previews only.

Entries marked "ours" in ``NOT_FROM_SEEDS`` are not in the seed tables (the seeds give no domain set for
fundus, OCT or pathology) and were chosen by analogy; they are documented in docs/degradations.md.
"""

from __future__ import annotations

from ..errors import DegradationError

GENERAL_PGESAM: tuple[str, ...] = (
    "gaussian_noise", "salt_pepper", "motion_blur", "gaussian_blur", "brightness_contrast", "gamma", "jpeg",
    "glare",
)
GENERAL_ROBUSTMEDSAM: tuple[str, ...] = ("gaussian_noise", "gaussian_blur", "contrast", "brightness")
GENERAL: tuple[str, ...] = GENERAL_PGESAM + tuple(n for n in GENERAL_ROBUSTMEDSAM if n not in GENERAL_PGESAM)

# RobustMedSAM Table 1 (modality-specific rows)
ROBUSTMEDSAM_TABLE: dict[str, tuple[str, ...]] = {
    "ultrasound": ("speckle_noise", "salt_pepper"),
    "mri": ("rician_noise", "rayleigh_noise", "stepwise_motion"),
    "ct": ("poisson_noise", "stepwise_motion"),
    "xray": ("poisson_noise",),
    "dental_xray": ("poisson_noise",),  # an X-ray modality
    "microscopy": ("poisson_noise",),
    "endoscopy": ("motion_blur", "zoom_blur", "jpeg"),
    "fundus": ("iso_noise", "zoom_blur", "jpeg"),
    "oct": ("speckle_noise",),
    "pathology": ("iso_noise", "color_jitter"),
    "nuclei": ("salt_pepper", "color_jitter"),
    "dermoscopy": ("color_jitter", "jpeg"),
    "generic": (),
}

# PGE-SAM Table 27 / 28 (domain-specific artifacts applied at LQ-3+)
PGESAM_DOMAIN: dict[str, tuple[str, ...]] = {
    "ultrasound": ("speckle_noise", "acoustic_shadow", "bias_field", "vignette", "specular_reflection", "dead_pixels"),
    "mri": ("bias_field", "gibbs_ringing", "mri_ghosting"),
    "ct": ("ct_ring", "beam_hardening"),
    "xray": ("grid_banding",),
    "dental_xray": ("beam_hardening", "shadow", "vignette"),
    "endoscopy": ("specular_reflection", "vignette", "shadow"),
    "dermoscopy": ("ghosting", "dead_pixels", "specular_reflection"),
    "microscopy": ("fog", "specular_reflection"),
    "nuclei": ("fog", "specular_reflection"),  # BBBC038 (= DSB 2018 nuclei) in PGE-SAM Table 28
    "fundus": ("vignette", "specular_reflection"),  # ours
    "oct": ("speckle_noise", "acoustic_shadow"),  # ours: vessel shadows have the acoustic-shadow geometry
    "pathology": ("fog", "dead_pixels"),  # ours: slide-based like microscopy
    "generic": (),
}

# Registered types offered for a modality (gallery, live preview) but not drawn by the random composition.
EXTRA: dict[str, tuple[str, ...]] = {"mri": ("mri_spike",)}

NOT_FROM_SEEDS: dict[str, str] = {
    "fundus": "domain set chosen by us (vignette, specular_reflection); the seeds give none",
    "oct": "domain set chosen by us (speckle_noise, acoustic_shadow as vessel shadow); the seeds give none",
    "pathology": "domain set chosen by us (fog, dead_pixels); the seeds give none",
    "dental_xray": "RobustMedSAM set taken from its X-ray row",
}

MODALITIES: tuple[str, ...] = tuple(ROBUSTMEDSAM_TABLE)

_ALIASES = {
    "mr": "mri", "us": "ultrasound", "x-ray": "xray", "x_ray": "xray", "cxr": "xray", "dental": "dental_xray",
    "dental-xray": "dental_xray", "endoscope": "endoscopy", "dermatology": "dermoscopy", "skin": "dermoscopy",
    "histopathology": "pathology", "histology": "pathology", "cell": "nuclei", "nuclearcell": "nuclei",
    "retina": "fundus", "none": "generic", "other": "generic",
}


# DICOM Modality (0008,0060) codes whose images these sets describe; the others (PET, NM, OT...) have none.
DICOM_MODALITIES = {
    "MR": "mri", "CT": "ct", "US": "ultrasound", "CR": "xray", "DX": "xray", "DR": "xray", "MG": "xray", "RF": "xray",
    "XA": "xray", "IO": "dental_xray", "PX": "dental_xray", "ES": "endoscopy", "OP": "fundus", "OPT": "oct",
    "SM": "pathology", "GM": "microscopy",
}


def modality_from_dicom(code: str | None) -> str | None:
    """The degradation modality of a DICOM Modality code (``"MR"`` -> ``"mri"``), None when there is none."""
    return DICOM_MODALITIES.get(str(code or "").strip().upper())


def normalize_modality(modality: str | None) -> str:
    """Canonical modality name (None -> 'generic'); DegradationError listing the valid ones otherwise."""
    if modality is None:
        return "generic"
    key = str(modality).strip().lower().replace(" ", "_")
    key = _ALIASES.get(key, key)
    if key not in ROBUSTMEDSAM_TABLE:
        raise DegradationError(f"unknown modality {modality!r}; valid modalities: {', '.join(MODALITIES)}")
    return key


def modality_degradations(modality: str | None) -> dict[str, tuple[str, ...]]:
    """The degradation sets of a modality: {'general', 'modality', 'domain', 'extra'} -> names.

    general: all modalities; modality: RobustMedSAM Table 1; domain: PGE-SAM domain artifacts (LQ-3+);
    extra: also applicable (listed for previews) but not used by the random composition.
    """
    key = normalize_modality(modality)
    return {
        "general": GENERAL,
        "modality": ROBUSTMEDSAM_TABLE[key],
        "domain": PGESAM_DOMAIN[key],
        "extra": EXTRA.get(key, ()),
    }


def modalities_using(name: str) -> list[str]:
    """Modalities whose default sets include degradation `name` (['all'] for general ones)."""
    if name in GENERAL:
        return ["all"]
    return [
        m for m in MODALITIES
        if name in ROBUSTMEDSAM_TABLE[m] or name in PGESAM_DOMAIN[m] or name in EXTRA.get(m, ())
    ]
