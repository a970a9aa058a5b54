"""Label maps out, on their image's grid: NIfTI, NRRD and MetaImage through SimpleITK, DICOM-SEG through
:mod:`.dicom_seg`; and any other array on a grid (a degraded copy of a volume, :func:`write_on_grid`). Reading and
the geometry itself are in :mod:`.medical`; :func:`.images.write_mask` picks this module for those suffixes."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ..errors import UserFacingError
from .atomic import atomic_write_path
from .dicom_seg import write_dicom_seg
from .medical import DICOM_SUFFIXES, ITK_SUFFIXES, Geometry, refuse_source_overwrite, suffix_of

LABEL_WRITE_SUFFIXES = ITK_SUFFIXES


def labels_image(labels: np.ndarray, geometry: Geometry | None):
    """A SimpleITK image of ``labels`` placed on ``geometry`` (a 2D label on a 3D grid becomes one slice)."""
    import SimpleITK as sitk

    arr = np.asarray(labels)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if geometry is not None and arr.ndim == geometry.ndim - 1:
        arr = arr[None]
    if geometry is not None and arr.ndim != geometry.ndim:
        raise UserFacingError(f"labels of shape {arr.shape} do not fit a {geometry.ndim}D image geometry")
    image = sitk.GetImageFromArray(np.ascontiguousarray(arr))
    if geometry is not None:
        image.SetSpacing(tuple(float(v) for v in geometry.spacing))
        image.SetOrigin(tuple(float(v) for v in geometry.origin))
        image.SetDirection(tuple(float(v) for v in geometry.direction))
    return image


def write_labels(path: str | Path, labels: np.ndarray, geometry: Geometry | None,
                 class_names: dict[int, str] | None = None) -> Path:
    """Write ``labels`` as NIfTI / NRRD / MetaImage on ``geometry`` (atomic; never over the source image).

    A DICOM source gives NIfTI, NRRD or MetaImage out (its geometry kept), or a DICOM-SEG (``.dcm``, through
    highdicom, :mod:`.dicom_seg`) referencing the series, its segments named after ``class_names`` (value -> name).
    A detached header (``.nhdr``, ``.mhd``) and its data file are each replaced atomically, data first.
    """
    p = Path(path)
    suffix = suffix_of(p)
    refuse_source_overwrite(p, geometry)
    if suffix in DICOM_SUFFIXES:
        if geometry is None or geometry.file_format != "dicom":
            raise UserFacingError(
                f"labels are written as DICOM-SEG ({p.name}) only for a DICOM image; save them as .nii.gz"
            )
        return write_dicom_seg(p, labels, geometry, class_names)
    if suffix not in LABEL_WRITE_SUFFIXES:
        raise UserFacingError(f"{p.name}: labels with geometry are written as {', '.join(LABEL_WRITE_SUFFIXES)}")
    return write_on_grid(p, labels, geometry)


def write_on_grid(path: str | Path, array: np.ndarray, geometry: Geometry | None) -> Path:
    """Write ``array`` (labels or intensities, any dtype SimpleITK takes) as NIfTI / NRRD / MetaImage placed on
    ``geometry`` (spacing 1 at the origin when None); atomic, and never over the source image."""
    p = Path(path)
    suffix = suffix_of(p)
    refuse_source_overwrite(p, geometry)
    if suffix not in ITK_SUFFIXES:
        raise UserFacingError(f"{p.name}: an image with geometry is written as {', '.join(ITK_SUFFIXES)}")
    image = labels_image(array, geometry)
    import SimpleITK as sitk

    try:
        if suffix in (".nhdr", ".mhd"):
            _write_detached(sitk, image, p)
        else:
            with atomic_write_path(p) as tmp:
                sitk.WriteImage(image, str(tmp), useCompression=True)
    except RuntimeError as err:  # ITK reports a failed write (e.g. a full disk) as RuntimeError
        raise UserFacingError(f"cannot write {p}: {str(err).strip().splitlines()[-1]}; the earlier file is unchanged") from err
    except OSError as err:
        raise UserFacingError(f"cannot write {p}: {err.strerror or err}; the earlier file is unchanged") from err
    return p


def _write_detached(sitk, image, p: Path) -> None:
    """Header + data files: written in a temporary folder beside the target, then moved in, header last."""
    p.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{p.name}.", dir=p.parent))
    try:
        sitk.WriteImage(image, str(tmpdir / p.name), useCompression=True)
        written = sorted(tmpdir.iterdir(), key=lambda f: f.name == p.name)  # header last
        for f in written:
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(f, p.parent / f.name)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
