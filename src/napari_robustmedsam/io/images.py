"""Read images and volumes, write masks.

2D: PNG, JPEG, BMP (imageio), TIFF (tifffile), NPY. 3D: TIFF stacks, NPY, and the medical formats of
:mod:`.medical` (DICOM folders and files, NIfTI, NRRD, MetaImage, with their geometry), returned as
(Z, Y, X) like napari shows them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ImageInputError, UserFacingError
from .atomic import atomic_write_path
from .medical import DICOM_SUFFIXES, ITK_SUFFIXES, Geometry, is_medical_path, read_medical, refuse_source_overwrite

_IMAGEIO_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}
_TIFF_SUFFIXES = {".tif", ".tiff"}
_ITK_SUFFIXES = set(ITK_SUFFIXES)
SUPPORTED_SUFFIXES = sorted(_IMAGEIO_SUFFIXES | _TIFF_SUFFIXES | _ITK_SUFFIXES | set(DICOM_SUFFIXES) | {".npy"})


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def read_image(path: str | Path, series: str | int | None = None, timepoint: int | None = None) -> np.ndarray:
    """Read a 2D image or 3D volume as a numpy array (no intensity change but DICOM's rescale to HU)."""
    return read_image_geometry(path, series=series, timepoint=timepoint)[0]


def read_image_geometry(path: str | Path, series: str | int | None = None,
                        timepoint: int | None = None) -> tuple[np.ndarray, Geometry | None]:
    """``(array, geometry)``: the geometry of medical formats (:mod:`.medical`), None for the others."""
    p = Path(path)
    if not p.exists():
        raise ImageInputError(f"image file not found: {p}")
    if p.is_dir() or _suffix(p) in _ITK_SUFFIXES or _suffix(p) in DICOM_SUFFIXES or is_medical_path(p):
        if p.is_dir() and not is_medical_path(p):
            raise ImageInputError(f"{p} is a folder without DICOM files; give an image file or a DICOM series folder")
        return read_medical(p, series=series, timepoint=timepoint)
    return _read_plain(p), None


def _read_plain(p: Path) -> np.ndarray:
    suffix = _suffix(p)
    try:
        if suffix in _IMAGEIO_SUFFIXES:
            import imageio.v3 as iio

            return np.asarray(iio.imread(p))
        if suffix in _TIFF_SUFFIXES:
            import tifffile

            return tifffile.imread(p)
        if suffix == ".npy":
            return np.load(p, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ImageInputError(f"cannot read {p}: {err}") from err
    raise ImageInputError(f"unsupported image format {suffix!r} for {p}; supported: {', '.join(SUPPORTED_SUFFIXES)}")


def write_mask(path: str | Path, mask: np.ndarray, geometry: Geometry | None = None,
               class_names: dict[int, str] | None = None) -> Path:
    """Write a label/mask array atomically; the format follows the suffix.

    NIfTI / NRRD / MetaImage keep ``geometry`` (the image's spacing, origin and direction); no format
    ever writes over the image the geometry came from.
    """
    p = Path(path)
    suffix = _suffix(p)
    refuse_source_overwrite(p, geometry)
    if suffix in _ITK_SUFFIXES or suffix in DICOM_SUFFIXES:
        from .medical import write_labels

        arr = np.asarray(mask)
        return write_labels(p, arr.astype(np.uint8) if arr.dtype == bool else arr, geometry, class_names)
    arr = np.asarray(mask)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if suffix in _IMAGEIO_SUFFIXES - {".png"}:
        raise UserFacingError(f"{suffix} is lossy and would corrupt labels; write the mask as .png, .tif, .npy or .nii.gz")
    try:
        with atomic_write_path(p) as tmp:
            if suffix == ".png":
                if arr.ndim != 2:
                    raise UserFacingError(f"a {arr.ndim}D mask cannot be a PNG; use .tif, .npy or .nii.gz")
                if arr.max(initial=0) > 65535 or arr.min(initial=0) < 0:
                    raise UserFacingError("label values beyond 0..65535 do not fit a PNG; use .tif or .npy")
                import imageio.v3 as iio

                iio.imwrite(tmp, arr.astype(np.uint8 if arr.max(initial=0) <= 255 else np.uint16))
            elif suffix in _TIFF_SUFFIXES:
                import tifffile

                tifffile.imwrite(tmp, arr, compression="zlib", photometric="minisblack")
            elif suffix == ".npy":
                with open(tmp, "wb") as fh:
                    np.save(fh, arr)
            else:
                raise UserFacingError(f"unsupported mask format {suffix!r}; use .png, .tif, .npy or .nii.gz")
    except OSError as err:
        raise UserFacingError(f"cannot write {p}: {err}") from err
    return p
