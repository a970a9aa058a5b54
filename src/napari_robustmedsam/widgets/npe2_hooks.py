"""npe2 contributions that need no Qt: sample data made by the plugin itself, a reader for medical volumes
(DICOM, NIfTI, NRRD, MetaImage, with their geometry) and a labels writer that keeps that geometry."""

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


def get_reader(path: str | list[str]):
    """napari's File > Open and drag-and-drop: a reader for one medical file or DICOM folder, else None."""
    from ..io.medical import is_medical_path

    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    return read_medical_layers if is_medical_path(path) else None


#: a 4D file (NIfTI, NRRD) opens as one 3D image layer per volume up to this many; beyond, the first only
MAX_TIMEPOINT_LAYERS = 8


def read_medical_layers(path: str | list[str]) -> list[tuple[Any, dict, str]]:
    """One image layer: scale and translate from the geometry, named after the series or file, the geometry
    (and, for CT, the window shown) in its metadata. A folder with several series opens the largest (a
    warning lists the others). A 4D file opens one layer per volume (``<name> t=0``, ...), to choose from in the
    annotator's Image field; one with more than :data:`MAX_TIMEPOINT_LAYERS` volumes opens its first, and a
    warning says how to open another (``napari-robustmedsam --volume FILE --timepoint T``)."""
    import warnings

    from ..io.medical import MedicalReadWarning, count_timepoints, read_medical, read_timepoints

    if isinstance(path, (list, tuple)):
        path = path[0]
    n = count_timepoints(path)
    if n <= 1:
        return [_image_layer(*read_medical(path))]
    if n > MAX_TIMEPOINT_LAYERS:
        warnings.warn(MedicalReadWarning(
            f"{Path(path).name} holds {n} volumes; opened the first. Another one: napari-robustmedsam --volume "
            f"{path} --timepoint T (0..{n - 1})"), stacklevel=2)
        return [_image_layer(*read_medical(path, timepoint=0))]
    return [_image_layer(*volume) for volume in read_timepoints(path, range(n))]


def _image_layer(array, geometry) -> tuple[Any, dict, str]:
    from ..engine.windows import WINDOW_KEY, default_window
    from ..io.medical import layer_kwargs

    kwargs = layer_kwargs(geometry, array.ndim)
    window = default_window(array, geometry.modality)
    if window is not None:
        kwargs["contrast_limits"] = window.contrast_limits()
        kwargs["metadata"][WINDOW_KEY] = window.spec
    return (array, kwargs, "image")


def write_labels(path: str, data: Any, meta: dict) -> list[str]:
    """Write one Labels layer (atomic; the format follows the suffix). NIfTI, NRRD and MetaImage get the
    geometry of the image the labels were drawn on (from the layer's metadata); the image itself is never
    overwritten."""
    from ..io import write_mask
    from ..io.medical import geometry_from_layer

    arr = np.asarray(data)
    if arr.dtype.kind not in "iub":
        arr = arr.astype(np.uint32)
    geometry = geometry_from_layer(meta.get("metadata") or {})
    return [str(write_mask(Path(path), arr, geometry, overwrite=True))]  # napari's save dialog asked to replace
