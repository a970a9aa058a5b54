"""Minimal image reading / writing for the degradation CLI (PNG, JPEG, BMP, TIFF, NPY), atomic writes.

(The project's general image IO lives in napari_robustmedsam.io; this keeps the degradation commands
self-contained.)
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import DegradationError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".npy")


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image or volume as a numpy array (dtype as stored)."""
    p = Path(path)
    if not p.is_file():
        raise DegradationError(f"input image not found: {p}")
    suffix = p.suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        raise DegradationError(f"unsupported image format {suffix!r} for {p}; use one of {', '.join(IMAGE_SUFFIXES)}")
    from ..io.images import read_image as read_any

    return read_any(p)  # one reader for the project: every unreadable or too large file is a one-line error


def _write(path: Path, array: np.ndarray) -> None:
    suffix = path.suffix.lower()
    if suffix == ".npy":
        with open(path, "wb") as fh:
            np.save(fh, array, allow_pickle=False)
    elif suffix in (".tif", ".tiff"):
        import tifffile

        tifffile.imwrite(path, array, compression="zlib")
    elif suffix in (".jpg", ".jpeg"):
        from PIL import Image

        if array.dtype != np.uint8:
            raise DegradationError(f"JPEG output needs uint8 data, got {array.dtype}: write .png, .tif or .npy")
        Image.fromarray(array).save(path, format="JPEG", quality=95)
    else:
        import imageio.v3 as iio

        if array.dtype not in (np.uint8, np.uint16):
            raise DegradationError(
                f"{suffix} output needs uint8 or uint16 data, got {array.dtype}: write .tif or .npy instead"
            )
        iio.imwrite(path, array, extension=suffix)


def atomic_path(path: str | os.PathLike):
    """The project's atomic write (:func:`napari_robustmedsam.io.atomic.atomic_write_path`)."""
    from ..io.atomic import atomic_write_path

    return atomic_write_path(path)


def write_image(path: str | os.PathLike, array: np.ndarray, *, inputs=(), overwrite: bool = False) -> Path:
    """Write atomically: to a temporary file in the target folder, then rename over the target.

    Never over one of ``inputs``; over an existing file only with ``overwrite=True`` (io.output_paths)."""
    from ..io.output_paths import check_output

    p = check_output(path, inputs=inputs, overwrite=overwrite)
    suffix = p.suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        raise DegradationError(f"unsupported output format {suffix!r} for {p}; use one of {', '.join(IMAGE_SUFFIXES)}")
    with atomic_path(p) as tmp:
        _write(tmp, np.ascontiguousarray(array))
    return p


def write_text(path: str | os.PathLike, text: str, *, inputs=(), overwrite: bool = False) -> Path:
    """Atomic text write (manifests); the same output checks as :func:`write_image`."""
    from ..io.output_paths import check_output

    check_output(path, inputs=inputs, overwrite=overwrite)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
