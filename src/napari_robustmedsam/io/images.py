"""Read images and volumes, write masks.

2D: PNG, JPEG, BMP (imageio), TIFF (tifffile), NPY. 3D: TIFF stacks, NPY, and the medical formats of
:mod:`.medical` (DICOM folders and files, NIfTI, NRRD, MetaImage, with their geometry), returned as
(Z, Y, X) like napari shows them.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from pathlib import Path

import numpy as np

from ..errors import ImageInputError, UserFacingError
from .atomic import atomic_write_path
from .medical import (
    DICOM_SUFFIXES,
    ITK_SUFFIXES,
    Geometry,
    check_labels_fit,
    is_medical_path,
    read_medical,
    refuse_source_overwrite,
)
from .medical_labels import write_labels
from .output_paths import check_output

_IMAGEIO_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}
_TIFF_SUFFIXES = {".tif", ".tiff"}
_ITK_SUFFIXES = set(ITK_SUFFIXES)
SUPPORTED_SUFFIXES = sorted(_IMAGEIO_SUFFIXES | _TIFF_SUFFIXES | _ITK_SUFFIXES | set(DICOM_SUFFIXES) | {".npy"})


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


# Reading an image needs its decoded array plus the working copies made of it downstream (a float copy, the
# resized model input): the decoded size times this factor must fit in the available memory.
MEMORY_FACTOR = 3
# Optional hard cap on the pixels (height x width x slices) of an image, e.g. on shared machines.
MAX_PIXELS_ENV = "ROBUSTMEDSAM_MAX_IMAGE_PIXELS"

_PIL_LOCK = threading.Lock()
_pil_uncapped_readers = 0  # reads in progress that need PIL's pixel cap lifted (threads may read at once)
_pil_saved_cap: int | None = None


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"  # pragma: no cover


def available_memory() -> int:
    """Bytes of memory available to a new allocation now (psutil; /proc/meminfo as a fallback)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001 - no psutil, or it cannot tell on this platform
        pass
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62  # unknown: do not refuse on memory grounds


def pixel_limit() -> int | None:
    """The pixel cap set in ``$ROBUSTMEDSAM_MAX_IMAGE_PIXELS`` (None when unset)."""
    text = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not text:
        return None
    try:
        value = int(float(text))
    except ValueError:
        raise ImageInputError(f"${MAX_PIXELS_ENV}={text!r} is not a number of pixels") from None
    return value if value > 0 else None


def check_image_size(path: Path, shape: tuple[int, ...], itemsize: int) -> None:
    """Refuse, naming the size and the limit, an image too large to read into the memory available."""
    shape = tuple(int(v) for v in shape)
    channels = shape[-1] if len(shape) >= 3 and shape[-1] in (3, 4) else 1
    pixels = math.prod(shape) // channels
    need = math.prod(shape) * max(1, int(itemsize))
    size = " x ".join(str(v) for v in shape)
    cap = pixel_limit()
    if cap is not None and pixels > cap:
        raise ImageInputError(
            f"{path} is {size} ({pixels:,} pixels), above the limit of {cap:,} pixels set in ${MAX_PIXELS_ENV}; "
            "crop or downsample it first, or raise the limit"
        )
    free = available_memory()
    if need * MEMORY_FACTOR > free:
        raise ImageInputError(
            f"{path} is {size} ({pixels:,} pixels, {_human_bytes(need)} decoded); reading and segmenting it needs "
            f"about {_human_bytes(need * MEMORY_FACTOR)} but {_human_bytes(free)} of memory is available; crop or "
            "downsample it first (or free memory)"
        )


@contextlib.contextmanager
def _pil_without_pixel_cap():
    """PIL refuses images above its fixed pixel count (a decompression-bomb guard); the size is bounded here by
    :func:`check_image_size` against the real memory instead, so legitimately large images can be read."""
    global _pil_uncapped_readers, _pil_saved_cap
    from PIL import Image

    with _PIL_LOCK:
        if _pil_uncapped_readers == 0:
            _pil_saved_cap = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
        _pil_uncapped_readers += 1
    try:
        yield Image
    finally:
        with _PIL_LOCK:
            _pil_uncapped_readers -= 1
            if _pil_uncapped_readers == 0:
                Image.MAX_IMAGE_PIXELS = _pil_saved_cap


def _probe(path: Path, suffix: str) -> tuple[tuple[int, ...], int]:
    """(shape, bytes per sample) from the file's header, without decoding the pixels."""
    if suffix in _IMAGEIO_SUFFIXES:
        with _pil_without_pixel_cap() as Image:
            with Image.open(path) as im:
                bands = len(im.getbands())
                itemsize = 2 if im.mode.startswith("I;16") else 4 if im.mode in ("I", "F") else 1
                shape = (im.height, im.width) + ((bands,) if bands > 1 else ())
                # a palette image is expanded to RGB(A) when read
                return (shape + (4,) if im.mode == "P" else shape), itemsize
    if suffix in _TIFF_SUFFIXES:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            return tuple(series.shape), series.dtype.itemsize
    if suffix == ".npy":
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
        return tuple(arr.shape), arr.dtype.itemsize
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    size = tuple(reversed(reader.GetSize()))
    components = reader.GetNumberOfComponents()
    try:
        itemsize = sitk.Image([1] * reader.GetDimension(), reader.GetPixelID()).GetSizeOfPixelComponent()
    except Exception:  # noqa: BLE001 - an unusual pixel type: assume the widest common one
        itemsize = 8
    return size + ((components,) if components > 1 else ()), itemsize


def _reason(err: BaseException) -> str:
    """The informative line of a reader's error (SimpleITK puts it last, after where in its C++ it was thrown)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = lines[-1] if lines else ""
    if "ERROR:" in text:
        text = text.split("ERROR:", 1)[1].strip()
    text = text[:200]
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def image_files(folder: str | Path) -> list[Path]:
    """The image files of a folder (an image series), sorted by name; an error when there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageInputError(f"{folder} is not a folder of images")
    files = sorted(
        p for p in folder.iterdir() if p.is_file() and any(p.name.lower().endswith(s) for s in SUPPORTED_SUFFIXES)
    )
    if not files:
        raise ImageInputError(f"no images ({', '.join(SUPPORTED_SUFFIXES)}) in {folder}")
    return files


def check_image_file(path: str | Path) -> tuple[tuple[int, ...], int]:
    """Check a file from its header alone, without decoding it: it exists, has a supported suffix, is not empty,
    is the format its suffix says, and fits the memory. Returns (shape, bytes per sample); raises
    :class:`~napari_robustmedsam.errors.ImageInputError` naming the file otherwise. Cheap: for checking a
    whole folder before slow work starts."""
    p = Path(path)
    if not p.exists():
        raise ImageInputError(f"image file not found: {p}")
    if p.is_dir():
        raise ImageInputError(f"{p} is a folder, not an image file")
    suffix = _suffix(p)
    if suffix not in SUPPORTED_SUFFIXES:
        raise ImageInputError(
            f"unsupported image format {suffix!r} for {p}; supported: {', '.join(SUPPORTED_SUFFIXES)}"
        )
    try:
        if p.stat().st_size == 0:
            raise ImageInputError(f"cannot read {p}: the file is empty (0 bytes)")
        shape, itemsize = _probe(p, suffix)
    except ImageInputError:
        raise
    except Exception as err:  # noqa: BLE001 - every decoder failure means a damaged or mislabelled file
        raise _unreadable(p, suffix, err) from None
    check_image_size(p, shape, itemsize)
    return shape, itemsize


def _unreadable(p: Path, suffix: str, err: BaseException) -> ImageInputError:
    return ImageInputError(
        f"cannot read {p}: it is not a readable {suffix} file (truncated, damaged or another format; {_reason(err)})"
    )


def read_image(path: str | Path, series: str | int | None = None, timepoint: int | None = None) -> np.ndarray:
    """Read a 2D image or 3D volume as a numpy array (no intensity change but DICOM's rescale to HU).

    Any file that cannot be read (missing, empty, truncated, not really of its suffix's format, too large for
    the memory available) raises :class:`~napari_robustmedsam.errors.ImageInputError` naming the file.
    """
    return read_image_geometry(path, series=series, timepoint=timepoint)[0]


def read_image_geometry(path: str | Path, series: str | int | None = None,
                        timepoint: int | None = None) -> tuple[np.ndarray, Geometry | None]:
    """``(array, geometry)``: the geometry of medical formats (:mod:`.medical`), None for the others."""
    p = Path(path)
    if not p.exists():
        raise ImageInputError(f"image file not found: {p}")
    suffix = _suffix(p)
    if p.is_dir():
        if not is_medical_path(p):
            raise ImageInputError(f"{p} is a folder without DICOM files; give an image file or a DICOM series folder")
        return read_medical(p, series=series, timepoint=timepoint)
    if suffix in _ITK_SUFFIXES:
        check_image_file(p)  # header, size and memory before decoding
        return read_medical(p, series=series, timepoint=timepoint)
    if suffix in DICOM_SUFFIXES or is_medical_path(p):  # pydicom reports what it cannot decode, and why
        return read_medical(p, series=series, timepoint=timepoint)
    return _read_plain(p), None


def _read_plain(p: Path) -> np.ndarray:
    check_image_file(p)
    suffix = _suffix(p)
    try:
        if suffix in _IMAGEIO_SUFFIXES:
            import imageio.v3 as iio

            with _pil_without_pixel_cap():
                return np.asarray(iio.imread(p))
        if suffix in _TIFF_SUFFIXES:
            import tifffile

            return tifffile.imread(p)
        if suffix == ".npy":
            return np.load(p, allow_pickle=False)
    except ImageInputError:
        raise
    except MemoryError:
        raise ImageInputError(f"cannot read {p}: not enough memory to decode it; crop or downsample it first") from None
    except Exception as err:  # noqa: BLE001 - every decoder failure means a damaged or mislabelled file
        raise _unreadable(p, suffix, err) from None


MASK_SUFFIXES = (".png", ".tif", ".tiff", ".npy", *sorted(_ITK_SUFFIXES), ".dcm")  # .dcm: a DICOM-SEG


def check_mask_format(path: str | Path) -> str:
    """The suffix of a mask file to write, or a UserFacingError when labels cannot be stored that way (a lossy or
    unknown format). Cheap: commands call it before their slow work."""
    suffix = _suffix(Path(path))
    if suffix in _IMAGEIO_SUFFIXES - {".png"}:
        raise UserFacingError(f"{suffix} is lossy and would corrupt labels; write the mask as .png, .tif, .npy or .nii.gz")
    if suffix not in MASK_SUFFIXES:
        raise UserFacingError(f"unsupported mask format {suffix or '(no suffix)'!r}; use .png, .tif, .npy or .nii.gz")
    return suffix


def write_mask(path: str | Path, mask: np.ndarray, geometry: Geometry | None = None,
               class_names: dict[int, str] | None = None, *, inputs=(), overwrite: bool = False) -> Path:
    """Write a label/mask array atomically; the format follows the suffix.

    ``inputs``: files this mask was made from, never written over; an existing ``path`` is replaced only with
    ``overwrite=True`` (:mod:`.output_paths`). NIfTI / NRRD / MetaImage keep ``geometry`` (the image's spacing,
    origin and direction; ``.dcm`` writes a DICOM-SEG on a DICOM series, its segments named by ``class_names``);
    no format ever writes over the image the geometry came from.
    """
    p = check_output(path, inputs=inputs, overwrite=overwrite)
    refuse_source_overwrite(p, geometry)
    suffix = check_mask_format(p)
    if suffix in _ITK_SUFFIXES or suffix in DICOM_SUFFIXES:
        arr = np.asarray(mask)
        return write_labels(p, arr.astype(np.uint8) if arr.dtype == bool else arr, geometry, class_names)
    arr = np.asarray(mask)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    try:
        with atomic_write_path(p) as tmp:
            if suffix == ".png":
                if arr.ndim != 2:
                    raise UserFacingError(f"a {arr.ndim}D mask cannot be a PNG; use .tif, .npy or .nii.gz")
                if arr.max(initial=0) > 65535 or arr.min(initial=0) < 0:
                    raise UserFacingError("label values beyond 0..65535 do not fit a PNG; use .tif or .npy")
                from PIL import Image  # directly: imageio's plugin would first load every format PIL has

                Image.fromarray(arr.astype(np.uint8 if arr.max(initial=0) <= 255 else np.uint16)).save(tmp, format="PNG")
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


def write_slice_into(path: str | Path, slice_labels: np.ndarray, z: int, volume_shape, geometry: Geometry | None) -> Path:
    """Write a 2D label map into slice ``z`` of a full-volume label file on the image's grid.

    An existing file must be on the image's grid (else refused, saying what differs); its other slices and,
    on slice ``z``, its labels outside the new masks are kept. A missing file is created (zeros elsewhere).
    """
    p = Path(path)
    refuse_source_overwrite(p, geometry)
    shape = tuple(int(s) for s in volume_shape)
    new = np.asarray(slice_labels)
    if new.shape != shape[1:]:
        raise UserFacingError(f"a slice of shape {new.shape} does not fit a volume of shape {shape}")
    if p.exists():
        existing, existing_geometry = read_image_geometry(p)
        check_labels_fit(existing.shape, existing_geometry, shape, geometry, what=f"the labels in {p.name}")
        if existing.dtype.kind not in "iub":
            raise UserFacingError(f"{p.name} does not hold integer labels ({existing.dtype}); choose another file")
        labels = np.asarray(existing)
    else:
        labels = np.zeros(shape, np.uint8)
    top = max(int(new.max(initial=0)), int(labels.max(initial=0)))
    dtype = np.result_type(labels.dtype, np.uint8 if top <= 255 else np.uint16 if top <= 65535 else np.uint32)
    labels = labels.astype(dtype, copy=True)
    plane = labels[z]
    plane[new > 0] = new[new > 0]
    return write_mask(p, labels, geometry, overwrite=True)  # updating this file is the point
