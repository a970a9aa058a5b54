"""Read images and volumes, write masks.

2D: PNG, JPEG, BMP (imageio), TIFF (tifffile), NPY. 3D: TIFF stacks, NPY, and NIfTI / NRRD / MHA
through SimpleITK (already a torchio dependency), returned as (Z, Y, X) like napari shows them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ImageInputError, UserFacingError
from .atomic import atomic_write_path

_IMAGEIO_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}
_TIFF_SUFFIXES = {".tif", ".tiff"}
_ITK_SUFFIXES = {".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd"}
SUPPORTED_SUFFIXES = sorted(_IMAGEIO_SUFFIXES | _TIFF_SUFFIXES | _ITK_SUFFIXES | {".npy"})


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def read_image(path: str | Path) -> np.ndarray:
    """Read a 2D image or 3D volume as a numpy array (no intensity change)."""
    p = Path(path)
    if not p.exists():
        raise ImageInputError(f"image file not found: {p}")
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
        if suffix in _ITK_SUFFIXES:
            import SimpleITK as sitk

            return sitk.GetArrayFromImage(sitk.ReadImage(str(p)))
    except (OSError, ValueError) as err:
        raise ImageInputError(f"cannot read {p}: {err}") from err
    raise ImageInputError(f"unsupported image format {suffix!r} for {p}; supported: {', '.join(SUPPORTED_SUFFIXES)}")


def write_mask(path: str | Path, mask: np.ndarray) -> Path:
    """Write a label/mask array atomically; the format follows the suffix."""
    p = Path(path)
    suffix = _suffix(p)
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
            elif suffix in _ITK_SUFFIXES:
                import SimpleITK as sitk

                sitk.WriteImage(sitk.GetImageFromArray(arr), str(tmp), useCompression=True)
            else:
                raise UserFacingError(f"unsupported mask format {suffix!r}; use .png, .tif, .npy or .nii.gz")
    except OSError as err:
        raise UserFacingError(f"cannot write {p}: {err}") from err
    return p
