"""Medical volumes in and labels out, with their geometry: DICOM, NIfTI, NRRD and MetaImage.

``read_medical(path)`` returns ``(array, Geometry)``; the array is in napari's axis order (Z, Y, X) (or (Y, X)
for one DICOM frame), intensities as stored after the modality rescale (CT in Hounsfield units).
``write_labels(path, labels, geometry)`` writes a label volume on the same grid, so that 3D Slicer, ITK-SNAP
or nibabel place it where the image is.

Libraries, no hand-written parsers: SimpleITK (ITK's NIfTI, NRRD, MetaImage and GDCM readers) for files and
DICOM series; pydicom for one DICOM file (classic or enhanced multi-frame) and for the header checks of a
series (slice positions).

Geometry follows ITK / DICOM: physical coordinates in millimetres, LPS, axes in (x, y, z) = (column, row,
slice) order; ``direction`` is the 3 x 3 (or 2 x 2) matrix whose columns are the axes' unit vectors. napari's
layer ``scale`` and ``translate`` are the reversed spacing and origin (the rotation in ``direction`` is kept
in the layer's metadata, not shown).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ImageInputError, UserFacingError

#: Suffixes read and written through SimpleITK with their geometry.
ITK_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
#: Layer metadata keys under which the plugin keeps a layer's geometry (a dict) and the intensity window.
GEOMETRY_KEY = "robustmedsam_geometry"
#: Layer metadata key of the file an image layer was read from (formats without geometry).
SOURCE_KEY = "robustmedsam_source"
#: Two geometries are "the same grid" within these tolerances (mm; direction cosines; relative spacing).
ORIGIN_TOLERANCE_MM = 1e-3
DIRECTION_TOLERANCE = 1e-4
SPACING_RELATIVE_TOLERANCE = 1e-4
#: Slice positions may deviate this much (fraction of the median step) before a series counts as uneven.
SLICE_STEP_TOLERANCE = 0.01


class MedicalReadWarning(UserWarning):
    """A volume was read, but with a choice the user should know of (e.g. one series out of several)."""


@dataclass(frozen=True)
class Geometry:
    """Where an array's voxels are in the patient: ITK (x, y, z) order, millimetres, LPS."""

    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]  # row-major ndim x ndim, columns are the axes' directions
    source: str | None = None  # the file or DICOM folder read
    name: str | None = None  # series description, or the file name without suffix
    file_format: str | None = None  # "nifti", "nrrd", "metaimage", "dicom"
    modality: str | None = None  # DICOM modality ("CT", "MR", ...) when known
    series_uid: str | None = None
    timepoint: int | None = None  # the volume of a 4D file this grid was read from

    @property
    def ndim(self) -> int:
        return len(self.spacing)

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=np.float64).reshape(self.ndim, self.ndim)

    def napari_scale(self, ndim: int | None = None) -> tuple[float, ...]:
        """Layer ``scale`` for an array of ``ndim`` axes (napari's order: slowest axis first)."""
        values = tuple(float(v) for v in self.spacing[::-1])
        return values[-(ndim or self.ndim):]

    def napari_translate(self, ndim: int | None = None) -> tuple[float, ...]:
        values = tuple(float(v) for v in self.origin[::-1])
        return values[-(ndim or self.ndim):]

    def affine(self) -> np.ndarray:
        """(ndim + 1) square matrix from voxel index (x, y, z) to LPS millimetres."""
        n = self.ndim
        out = np.eye(n + 1)
        out[:n, :n] = self.direction_matrix @ np.diag(self.spacing)
        out[:n, n] = self.origin
        return out

    def slab(self, z: int) -> "Geometry":
        """Geometry of the one-slice volume at slice ``z`` (its origin moved along the slice axis)."""
        if self.ndim != 3:
            raise ValueError("a slab needs a 3D geometry")
        step = self.direction_matrix[:, 2] * self.spacing[2]
        return replace(self, origin=tuple(float(v) for v in np.asarray(self.origin) + z * step))

    def to_json(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, data: dict) -> "Geometry":
        kw = dict(data)
        for key in ("spacing", "origin", "direction"):
            kw[key] = tuple(float(v) for v in kw[key])
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in kw.items() if k in names})

    def differences(self, other: "Geometry") -> list[str]:
        """What differs between two grids (spacing, origin, direction), in words; empty when they match."""
        out = []
        if self.ndim != other.ndim:
            return [f"dimension {self.ndim} vs {other.ndim}"]
        a, b = np.asarray(self.spacing), np.asarray(other.spacing)
        if not np.allclose(a, b, rtol=SPACING_RELATIVE_TOLERANCE, atol=0):
            out.append(f"spacing {_fmt(self.spacing)} vs {_fmt(other.spacing)} mm")
        if not np.allclose(self.origin, other.origin, rtol=0, atol=ORIGIN_TOLERANCE_MM):
            out.append(f"origin {_fmt(self.origin)} vs {_fmt(other.origin)} mm")
        if not np.allclose(self.direction, other.direction, rtol=0, atol=DIRECTION_TOLERANCE):
            out.append(f"direction {_fmt(self.direction)} vs {_fmt(other.direction)}")
        return out


def _fmt(values) -> str:
    return "(" + ", ".join(f"{float(v):.4g}" for v in values) + ")"


def geometry_from_layer(layer_or_metadata: Any) -> Geometry | None:
    """The :class:`Geometry` stored in a layer's metadata (or a metadata dict), or None."""
    meta = getattr(layer_or_metadata, "metadata", layer_or_metadata)
    data = (meta or {}).get(GEOMETRY_KEY) if isinstance(meta, dict) else None
    return Geometry.from_json(data) if data else None


def source_of(layer: Any) -> str | None:
    """The file or DICOM folder a layer was read from: its geometry, the plugin's metadata, or napari's source."""
    geometry = geometry_from_layer(layer)
    if geometry is not None and geometry.source:
        return geometry.source
    meta = getattr(layer, "metadata", None) or {}
    if meta.get(SOURCE_KEY):
        return str(meta[SOURCE_KEY])
    path = getattr(getattr(layer, "source", None), "path", None)
    return str(path) if path else None


def copy_geometry(source_layer: Any, target_layer: Any) -> None:
    """Give ``target_layer`` the geometry metadata of ``source_layer`` (labels drawn on an image)."""
    data = (getattr(source_layer, "metadata", None) or {}).get(GEOMETRY_KEY)
    if data:
        target_layer.metadata[GEOMETRY_KEY] = data
    else:
        target_layer.metadata.pop(GEOMETRY_KEY, None)


def layer_kwargs(geometry: Geometry, ndim: int, name: str | None = None) -> dict:
    """napari layer keyword arguments (scale, translate, name, metadata) for an array on ``geometry``."""
    kwargs: dict[str, Any] = {
        "scale": geometry.napari_scale(ndim),
        "translate": geometry.napari_translate(ndim),
        "metadata": {GEOMETRY_KEY: geometry.to_json()},
    }
    if name is None and geometry.name and geometry.timepoint is not None:  # one volume of a 4D file
        name = f"{geometry.name} t={geometry.timepoint}"
    if name or geometry.name:
        kwargs["name"] = name or geometry.name
    return kwargs


# ------------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------------
def suffix_of(path: str | Path) -> str:
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def is_medical_path(path: str | Path) -> bool:
    """True for the files and folders :func:`read_medical` reads (a folder counts if it holds DICOM files)."""
    p = Path(path)
    if p.is_dir():
        return _has_dicom_files(p)
    return suffix_of(p) in ITK_SUFFIXES + DICOM_SUFFIXES or (p.is_file() and p.suffix == "" and _is_dicom_file(p))


def read_medical(path: str | Path, series: str | int | None = None, timepoint: int | None = None) -> tuple[np.ndarray, Geometry]:
    """Read a DICOM folder or file, NIfTI, NRRD or MetaImage: ``(array, geometry)``.

    ``series``: a DICOM folder with several series is read as its largest series (a
    :class:`MedicalReadWarning` lists them all) unless this names one, by its SeriesInstanceUID or by its
    number in that list (0, 1, ...). ``timepoint``: which volume of a 4D file (NIfTI, NRRD) to read.
    """
    p = Path(path)
    if not p.exists():
        raise ImageInputError(f"file or folder not found: {p}")
    if p.is_dir():
        return _read_dicom_folder(p, series)
    suffix = suffix_of(p)
    if suffix in ITK_SUFFIXES:
        return _read_itk_file(p, timepoint)
    if suffix in DICOM_SUFFIXES or _is_dicom_file(p):
        return _read_dicom_file(p)
    raise ImageInputError(
        f"{p.name} is not a medical volume this plugin reads; use NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), "
        "MetaImage (.mha, .mhd), a DICOM file (.dcm) or a DICOM folder"
    )


def _sitk():
    import SimpleITK as sitk

    return sitk


def _check_orthogonal(direction: np.ndarray, what: str) -> None:
    n = direction.shape[0]
    gram = direction.T @ direction
    if not np.allclose(gram, np.eye(n), atol=DIRECTION_TOLERANCE):
        raise ImageInputError(
            f"{what} has non-orthogonal direction cosines (a sheared or gantry-tilted grid): resample it onto an "
            "orthogonal grid first (e.g. 3D Slicer's 'Resample Image (BRAINS)' or SimpleITK.Resample)"
        )


def _geometry_from_sitk(image, **info) -> Geometry:
    direction = np.asarray(image.GetDirection(), dtype=np.float64)
    n = image.GetDimension()
    _check_orthogonal(direction.reshape(n, n), info.get("source") or "the image")
    return Geometry(
        spacing=tuple(float(v) for v in image.GetSpacing()),
        origin=tuple(float(v) for v in image.GetOrigin()),
        direction=tuple(float(v) for v in direction),
        **info,
    )


_FORMATS = {".nii": "nifti", ".nii.gz": "nifti", ".nrrd": "nrrd", ".nhdr": "nrrd", ".mha": "metaimage", ".mhd": "metaimage"}


def _read_itk_file(p: Path, timepoint: int | None) -> tuple[np.ndarray, Geometry]:
    return _itk_volume(_read_itk_image(p), p, timepoint)


def _read_itk_image(p: Path):
    try:
        return _sitk().ReadImage(str(p))
    except RuntimeError as err:
        raise ImageInputError(f"cannot read {p.name}: {str(err).strip().splitlines()[-1]}") from err


def _itk_volume(image, p: Path, timepoint: int | None) -> tuple[np.ndarray, Geometry]:
    """``(array, geometry)`` of a read image: a 4D one's volume ``timepoint`` (required when it holds several)."""
    sitk = _sitk()
    suffix = suffix_of(p)
    n = image.GetSize()[3] if image.GetDimension() == 4 else 1
    if image.GetDimension() == 4:
        if timepoint is None:
            if n == 1:
                timepoint = 0
            else:
                raise ImageInputError(
                    f"{p.name} is a 4D image with {n} volumes: choose one with --timepoint T (0..{n - 1}), "
                    "or timepoint=T when reading it"
                )
        if not 0 <= timepoint < n:
            raise ImageInputError(f"--timepoint {timepoint} is outside 0..{n - 1} for {p.name}")
        size = list(image.GetSize())
        size[3] = 0
        image = sitk.Extract(image, size, [0, 0, 0, int(timepoint)], sitk.ExtractImageFilter.DIRECTIONCOLLAPSETOSUBMATRIX)
    elif timepoint not in (None, 0):
        raise ImageInputError(f"--timepoint {timepoint} was given but {p.name} is {image.GetDimension()}D, not 4D")
    if image.GetDimension() > 4:
        raise ImageInputError(f"{p.name} is {image.GetDimension()}D; only 2D, 3D and 4D (one volume at a time) are read")
    name = p.name[: -len(suffix)]
    geometry = _geometry_from_sitk(image, source=str(p), name=name, file_format=_FORMATS[suffix],
                                   timepoint=int(timepoint) if timepoint is not None and n > 1 else None)
    return sitk.GetArrayFromImage(image), geometry


def read_timepoints(path: str | Path, timepoints) -> list[tuple[np.ndarray, Geometry]]:
    """``(array, geometry)`` of each of ``timepoints`` of a 4D NIfTI / NRRD / MetaImage file, the file read once."""
    p = Path(path)
    image = _read_itk_image(p)
    return [_itk_volume(image, p, int(t)) for t in timepoints]


def count_timepoints(path: str | Path) -> int:
    """How many volumes a NIfTI / NRRD / MetaImage file holds (its 4th axis; 1 for 2D and 3D files), from the
    header alone. Other paths count as 1."""
    p = Path(path)
    if p.is_dir() or suffix_of(p) not in ITK_SUFFIXES:
        return 1
    reader = _sitk().ImageFileReader()
    reader.SetFileName(str(p))
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        raise ImageInputError(f"cannot read {p.name}: {str(err).strip().splitlines()[-1]}") from err
    size = reader.GetSize()
    return int(size[3]) if len(size) == 4 else 1


# ---- DICOM ---------------------------------------------------------------------------------------
def _is_dicom_file(p: Path) -> bool:
    try:
        with open(p, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _has_dicom_files(folder: Path, limit: int = 50) -> bool:
    for i, child in enumerate(sorted(folder.iterdir())):
        if i >= limit:
            break
        if child.is_file() and (suffix_of(child) in DICOM_SUFFIXES or _is_dicom_file(child)):
            return True
    return False


def _pydicom():
    try:
        import pydicom
    except ImportError:  # pragma: no cover - a dependency
        raise ImageInputError("reading DICOM needs pydicom: pip install pydicom") from None
    return pydicom


def _decoder_hint(ds) -> str:
    """Which package decodes this file's transfer syntax, from pydicom's own list of decoders."""
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if ts is None or not ts.is_compressed:
        return ""
    try:
        from pydicom.pixels import get_decoder

        missing = get_decoder(ts).missing_dependencies
    except Exception:  # an unknown syntax has no decoder entry at all
        missing = []
    packages = sorted({_package_of(m) for m in missing} - {""}) or ["python-gdcm", "pylibjpeg"]
    return (f"its transfer syntax {ts.name} ({ts}) is compressed and no installed decoder reads it: "
            f"pip install {' or '.join(packages)}")


def _package_of(requirement: str) -> str:
    """pydicom's 'pylibjpeg - requires pylibjpeg>=2.0 and pylibjpeg-openjpeg>=2.0' -> 'pylibjpeg pylibjpeg-openjpeg'."""
    _, _, needs = requirement.partition("requires")
    names = []
    for part in needs.replace(",", " and ").split(" and "):
        token = part.strip().split(">")[0].split("=")[0].split("<")[0].strip()
        if token and token != "numpy":
            names.append("python-gdcm" if token == "gdcm" else token)
    return " ".join(names)


def _pixel_array(ds, p: Path) -> np.ndarray:
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ImageInputError(
            f"{p.name} holds no image (a DICOM {ds.get('Modality', '')} {ds.get('SOPClassUID', '')!s} object "
            "without pixel data): open the folder or file of the image series instead"
        )
    try:
        return np.asarray(ds.pixel_array)
    except Exception as err:  # pydicom raises RuntimeError / NotImplementedError / ValueError per handler
        hint = _decoder_hint(ds)
        if hint:
            raise ImageInputError(f"cannot decode {p.name}: {hint}") from err
        raise ImageInputError(f"cannot decode the pixels of {p.name}: {err}") from err


def _first(item, name: str):
    """``item.<name>[0]`` for a functional-group sequence, or None."""
    seq = getattr(item, name, None)
    return seq[0] if seq else None


def _frame_group(ds, index: int, name: str):
    """A functional group of frame ``index``: per-frame first, then the shared groups (enhanced multi-frame)."""
    per_frame = getattr(ds, "PerFrameFunctionalGroupsSequence", None)
    if per_frame is not None and index < len(per_frame):
        found = _first(per_frame[index], name)
        if found is not None:
            return found
    shared = getattr(ds, "SharedFunctionalGroupsSequence", None)
    return _first(shared[0], name) if shared else None


def _rescale(ds, frame_index: int | None = None) -> tuple[float, float]:
    """(slope, intercept) of the modality LUT: from the frame's PixelValueTransformation if enhanced."""
    group = _frame_group(ds, frame_index, "PixelValueTransformationSequence") if frame_index is not None else None
    source = group if group is not None else ds
    slope = float(getattr(source, "RescaleSlope", 1.0) or 1.0)
    intercept = float(getattr(source, "RescaleIntercept", 0.0) or 0.0)
    return slope, intercept


def _apply_rescale(arr: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    if slope == 1.0 and intercept == 0.0:
        return arr
    if float(slope).is_integer() and float(intercept).is_integer():
        out = arr.astype(np.int32) * int(slope) + int(intercept)
        if out.min(initial=0) >= np.iinfo(np.int16).min and out.max(initial=0) <= np.iinfo(np.int16).max:
            return out.astype(np.int16)
        return out
    return arr.astype(np.float32) * np.float32(slope) + np.float32(intercept)


def _orientation(values, what: str) -> np.ndarray:
    iop = np.asarray([float(v) for v in values], dtype=np.float64)
    if iop.shape != (6,):
        raise ImageInputError(f"{what} has an ImageOrientationPatient of {len(iop)} values instead of 6")
    row, col = iop[:3], iop[3:]
    if abs(float(row @ col)) > DIRECTION_TOLERANCE * 10:
        raise ImageInputError(
            f"{what} has non-orthogonal direction cosines (row . column = {float(row @ col):.4f}): "
            "resample it onto an orthogonal grid first (e.g. with 3D Slicer)"
        )
    return iop


def _check_slice_positions(positions: np.ndarray, normal: np.ndarray, what: str, names: list[str] | None = None) -> float:
    """Check that sorted slice positions step evenly along the slice normal; return the step (mm)."""
    if len(positions) < 2:
        return float("nan")
    along = positions @ normal
    steps = np.diff(along)
    if np.any(np.abs(steps) < 1e-4):
        i = int(np.argmin(np.abs(steps)))
        label = f" ({names[i]} and {names[i + 1]})" if names else ""
        raise ImageInputError(
            f"{what} has two slices at the same position{label}: it mixes acquisitions (echoes, phases or a "
            "repeated scan); split the series (e.g. by EchoTime or AcquisitionNumber) or choose another series"
        )
    step = float(np.median(steps))
    uneven = np.abs(steps - step) > SLICE_STEP_TOLERANCE * abs(step)
    if np.any(uneven):
        where = ", ".join(f"{int(i)}->{int(i) + 1} ({steps[i]:.3g} mm)" for i in np.flatnonzero(uneven)[:5])
        missing = np.round(steps[uneven] / step - 1).astype(int)
        kind = f"{int(missing[missing > 0].sum())} missing slice(s)" if np.all(missing >= 1) and missing.sum() else "uneven slice spacing"
        raise ImageInputError(
            f"{what} has {kind}: the step between slices is {step:.3g} mm except at slices {where}; "
            "re-export the complete series, or resample it to even spacing first"
        )
    # the slice step must follow the normal (a gantry tilt shears the grid)
    offsets = np.diff(positions, axis=0)
    lateral = offsets - np.outer(offsets @ normal, normal)
    if np.max(np.linalg.norm(lateral, axis=1)) > max(1e-3, 0.01 * abs(step)):
        raise ImageInputError(
            f"{what} has non-orthogonal direction cosines: its slices step sideways as well as along the normal "
            "(a gantry tilt); resample it onto an orthogonal grid first (e.g. 3D Slicer's 'Gantry tilt correction')"
        )
    return abs(step)


def _read_dicom_file(p: Path) -> tuple[np.ndarray, Geometry]:
    pydicom = _pydicom()
    try:
        ds = pydicom.dcmread(str(p))
    except Exception as err:
        raise ImageInputError(f"cannot read {p.name} as DICOM: {err}") from err
    arr = _pixel_array(ds, p)
    n_frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    name = str(getattr(ds, "SeriesDescription", "") or "") or p.stem
    info = dict(source=str(p), name=name, file_format="dicom", modality=str(getattr(ds, "Modality", "")) or None,
                series_uid=str(getattr(ds, "SeriesInstanceUID", "")) or None)
    samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    if n_frames == 1:
        slope, intercept = _rescale(ds, 0 if "SharedFunctionalGroupsSequence" in ds else None)
        if samples == 1:
            arr = _apply_rescale(arr, slope, intercept)
        iop_values = getattr(ds, "ImageOrientationPatient", None)
        spacing = [float(v) for v in getattr(ds, "PixelSpacing", None) or getattr(ds, "ImagerPixelSpacing", None) or (1.0, 1.0)]
        if iop_values is None:
            direction = np.eye(3)
        else:
            iop = _orientation(iop_values, p.name)
            direction = np.stack([iop[:3], iop[3:], np.cross(iop[:3], iop[3:])], axis=1)
        origin = [float(v) for v in getattr(ds, "ImagePositionPatient", None) or (0.0, 0.0, 0.0)]
        thickness = float(getattr(ds, "SpacingBetweenSlices", None) or getattr(ds, "SliceThickness", None) or 1.0)
        geometry = Geometry(spacing=(spacing[1], spacing[0], thickness), origin=tuple(origin),
                            direction=tuple(direction.ravel()), **info)
        return arr, geometry
    return _enhanced_frames(ds, arr, p, info)


def _enhanced_frames(ds, arr: np.ndarray, p: Path, info: dict) -> tuple[np.ndarray, Geometry]:
    """An enhanced (multi-frame) image: frames sorted along the normal, each rescaled with its own LUT."""
    n = arr.shape[0]
    orientation = _frame_group(ds, 0, "PlaneOrientationSequence")
    measures = _frame_group(ds, 0, "PixelMeasuresSequence")
    iop_values = getattr(orientation, "ImageOrientationPatient", None) or getattr(ds, "ImageOrientationPatient", None)
    if iop_values is None:
        raise ImageInputError(f"{p.name} is a multi-frame DICOM without plane orientation: it is not a volume")
    iop = _orientation(iop_values, p.name)
    normal = np.cross(iop[:3], iop[3:])
    positions = []
    for i in range(n):
        plane = _frame_group(ds, i, "PlanePositionSequence")
        if plane is None or not hasattr(plane, "ImagePositionPatient"):
            raise ImageInputError(f"frame {i} of {p.name} has no ImagePositionPatient: the frames cannot be placed")
        positions.append([float(v) for v in plane.ImagePositionPatient])
    positions = np.asarray(positions)
    order = np.argsort(positions @ normal, kind="stable")
    positions = positions[order]
    step = _check_slice_positions(positions, normal, p.name)
    frames = []
    for i in order:
        slope, intercept = _rescale(ds, int(i))
        frames.append(_apply_rescale(arr[i], slope, intercept))
    kinds = {f.dtype for f in frames}
    volume = np.stack([f.astype(np.float32) for f in frames]) if len(kinds) > 1 else np.stack(frames)
    pixel_spacing = [float(v) for v in getattr(measures, "PixelSpacing", None) or (1.0, 1.0)]
    if math.isnan(step):
        step = float(getattr(measures, "SliceThickness", None) or 1.0)
    direction = np.stack([iop[:3], iop[3:], normal], axis=1)
    geometry = Geometry(spacing=(pixel_spacing[1], pixel_spacing[0], step), origin=tuple(positions[0]),
                        direction=tuple(direction.ravel()), **info)
    return volume, geometry


@dataclass
class DicomSeries:
    uid: str
    files: list[str]
    description: str = ""
    modality: str = ""
    number: str = ""
    extra: dict = field(default_factory=dict)

    def label(self) -> str:
        what = " ".join(v for v in (self.modality, f"#{self.number}" if self.number else "", repr(self.description) if self.description else "") if v)
        return f"{self.uid} ({what + ', ' if what else ''}{len(self.files)} files)"


def _series_name(folder: Path, chosen: DicomSeries, all_series: list[DicomSeries]) -> str:
    """A layer name for a series: its description; without one, the folder's name (a long UID means nothing to
    a reader), with the series number or the UID's end when the folder holds several series."""
    if chosen.description:
        return chosen.description
    if len(all_series) == 1:
        return folder.name
    if chosen.number and sum(other.number == chosen.number for other in all_series) == 1:
        return f"{folder.name} series {chosen.number}"
    return f"{folder.name} (UID ...{chosen.uid[-8:].lstrip('.')})"


def list_dicom_series(folder: str | Path) -> list[DicomSeries]:
    """The DICOM series in ``folder`` (largest first), as GDCM groups them."""
    sitk = _sitk()
    folder = Path(folder)
    uids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    out = []
    pydicom = _pydicom()
    for uid in uids:
        files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid))
        series = DicomSeries(uid=uid, files=files)
        try:
            ds = pydicom.dcmread(files[0], stop_before_pixels=True)
            series.description = str(getattr(ds, "SeriesDescription", "") or "")
            series.modality = str(getattr(ds, "Modality", "") or "")
            series.number = str(getattr(ds, "SeriesNumber", "") or "")
        except Exception:  # the listing still names the series by its UID
            pass
        out.append(series)
    out.sort(key=lambda s: -len(s.files))
    return out


def _choose_series(folder: Path, all_series: list[DicomSeries], series: str | int | None) -> DicomSeries:
    listing = "; ".join(f"[{i}] {s.label()}" for i, s in enumerate(all_series))
    if series is None:
        chosen = all_series[0]
        if len(all_series) > 1:
            warnings.warn(
                f"{folder.name} holds {len(all_series)} DICOM series; reading the largest, [0] {chosen.label()}. "
                f"Choose another with --series UID or its number: {listing}",
                MedicalReadWarning, stacklevel=3,
            )
        return chosen
    text = str(series).strip()
    for s in all_series:
        if s.uid == text:
            return s
    if text.isdigit() and int(text) < len(all_series):
        return all_series[int(text)]
    raise ImageInputError(f"{folder.name} has no DICOM series {text!r}; it holds: {listing}")


def _read_dicom_folder(folder: Path, series: str | int | None) -> tuple[np.ndarray, Geometry]:
    sitk = _sitk()
    all_series = list_dicom_series(folder)
    if not all_series:
        n_files = sum(1 for c in folder.iterdir() if c.is_file())
        raise ImageInputError(
            f"no DICOM image series in {folder} ({n_files} file(s), none a readable DICOM image): "
            "choose the folder that holds the .dcm files of one series"
        )
    chosen = _choose_series(folder, all_series, series)
    files = chosen.files
    pydicom = _pydicom()
    headers = []
    for f in files:
        try:
            headers.append(pydicom.dcmread(f, stop_before_pixels=True))
        except Exception as err:
            raise ImageInputError(f"cannot read the DICOM header of {Path(f).name}: {err}") from err
    what = f"DICOM series {chosen.uid} in {folder.name}"
    if not any("PixelData" in h or h.get("Rows") for h in headers):
        raise ImageInputError(f"{what} holds no images (no pixel data): choose an image series")
    if len(files) == 1 and int(getattr(headers[0], "NumberOfFrames", 1) or 1) > 1:
        return _read_dicom_file(Path(files[0]))
    iop = _orientation(getattr(headers[0], "ImageOrientationPatient", [1, 0, 0, 0, 1, 0]), what)
    normal = np.cross(iop[:3], iop[3:])
    for h, f in zip(headers, files):
        other = np.asarray([float(v) for v in getattr(h, "ImageOrientationPatient", iop)])
        if not np.allclose(other, iop, atol=1e-3):
            raise ImageInputError(
                f"{what} mixes slice orientations ({Path(f).name} differs): it holds more than one stack; "
                "split it or choose another series with --series"
            )
    positions = np.asarray([[float(v) for v in getattr(h, "ImagePositionPatient", (0, 0, i))] for i, h in enumerate(headers)])
    order = np.argsort(positions @ normal, kind="stable")
    _check_slice_positions(positions[order], normal, what, [Path(files[i]).name for i in order])
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        image = reader.Execute()
    except RuntimeError as err:
        ds = pydicom.dcmread(files[0], stop_before_pixels=True)
        hint = _decoder_hint(ds)
        detail = hint or str(err).strip().splitlines()[-1]
        raise ImageInputError(f"cannot read {what}: {detail}") from err
    geometry = _geometry_from_sitk(image, source=str(folder), name=_series_name(folder, chosen, all_series),
                                   file_format="dicom",
                                   modality=chosen.modality or None, series_uid=chosen.uid)
    return sitk.GetArrayFromImage(image), geometry


# ------------------------------------------------------------------------------------------------
# writing
# ------------------------------------------------------------------------------------------------


def _same_file(a: str | Path, b: str | Path) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:  # pragma: no cover
        return False


def refuse_source_overwrite(path: str | Path, geometry: Geometry | None) -> None:
    """Raise if ``path`` is the image the labels were drawn on (or one file of its DICOM folder)."""
    if geometry is None or not geometry.source:
        return
    target, source = Path(path), Path(geometry.source)
    inside = source.is_dir() and _same_file(target.parent, source) and suffix_of(target) in DICOM_SUFFIXES
    if _same_file(target, source):
        raise UserFacingError(
            f"{target.name} is the image being annotated ({source}); labels never overwrite it: "
            "choose another file name, e.g. one ending in _labels.nii.gz"
        )
    if inside:
        raise UserFacingError(
            f"{target.name} would go into the DICOM folder being annotated ({source}), among the image's files: "
            "save the labels outside it, e.g. as labels.nii.gz beside the folder"
        )


def check_labels_fit(labels_shape, labels_geometry: Geometry | None, image_shape, image_geometry: Geometry | None,
                     what: str = "the labels") -> None:
    """Refuse labels that are not on the image's grid, saying what differs (shape, spacing, origin, direction)."""
    problems = []
    if tuple(labels_shape) != tuple(image_shape):
        problems.append(f"shape {tuple(labels_shape)} vs {tuple(image_shape)}")
    if labels_geometry is not None and image_geometry is not None:
        problems += labels_geometry.differences(image_geometry)
    if problems:
        raise UserFacingError(
            f"{what} do not fit the image: " + "; ".join(problems) + ". Open the matching image, or resample the "
            "labels onto it (e.g. 3D Slicer's 'Resample Scalar/Vector/DWI Volume', nearest neighbour)"
        )
