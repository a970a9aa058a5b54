"""npe2 contributions that need no Qt: sample data made by the plugin itself, and a labels writer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def sample_phantom_2d() -> list[tuple[Any, dict, str]]:
    """Synthetic MRI phantom slice (256 x 256, uint16) with its ground truth (organ 1, lesion 2)."""
    from ..sample_data import mri_phantom

    image, labels = mri_phantom(256, seed=0)
    return [
        (image, {"name": "MRI phantom"}, "image"),
        (labels, {"name": "MRI phantom ground truth", "visible": False, "opacity": 0.4}, "labels"),
    ]


def sample_phantom_3d() -> list[tuple[Any, dict, str]]:
    """Synthetic MRI phantom volume (16 x 256 x 256, uint16) whose organ grows and shrinks along z."""
    from ..sample_data import mri_phantom_volume

    image, labels = mri_phantom_volume(16, 256, seed=0)
    return [
        (image, {"name": "MRI phantom volume"}, "image"),
        (labels, {"name": "MRI phantom volume ground truth", "visible": False, "opacity": 0.4}, "labels"),
    ]


def write_labels(path: str, data: Any, meta: dict) -> list[str]:
    """Write one Labels layer as TIFF, NPY or NIfTI (atomic; the format follows the suffix)."""
    from ..io import write_mask

    arr = np.asarray(data)
    if arr.dtype.kind not in "iub":
        arr = arr.astype(np.uint32)
    return [str(write_mask(Path(path), arr, overwrite=True))]  # napari's save dialog asked to replace
