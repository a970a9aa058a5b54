"""Save and load an annotation session: the labels plus the prompts that made them.

``save_session("out/case01.tif", labels, records, ...)`` writes two files, both atomically:

- ``out/case01.tif``: the label image (TIFF, NPY, NIfTI / NRRD / MetaImage through SimpleITK with the image's
  geometry, or PNG for 2D), 0 = background, one id per object;
- ``out/case01.prompts.json``: the session record::

    {"format": "napari-robustmedsam-session", "version": 1, "created": ISO time,
     "labels_file": "case01.tif", "shape": [...], "dtype": "uint32",
     "coordinates": "...",                                # the conventions below
     "image": {"name", "shape", "dtype", "source", "kind",    # what was annotated: the file or DICOM folder,
               "window", "geometry"},                       # the CT window the model saw, spacing/origin/direction
     "model": {"name", "architecture", "decoder", "preprocessing", "sha256"},
     "objects": [{"id": 1, "n_pixels": 812,
                  "slices": {"0": {"points": [[x, y], ...], "point_labels": [1, 0],
                                   "box": [x0, y0, x1, y1] | null, "source": "user" | "propagated",
                                   "end": false}},
                  "propagated_slices": [...], "info": {...},
                  "earlier": [{"slices", "propagated_slices", "info"}, ...]}]}   # only when committed more than
                                                                              # once under this id, oldest first

Points are (x, y) = (column, row) pixel indices; boxes (x0, y0, x1, y1) with exclusive upper corners;
slice keys index the first axis of a volume ("0" for 2D). Loading gives back the labels and the records,
so a session resumes where it stopped, and training can rebuild every (image, prompt, mask) triple.
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserFacingError

SESSION_FORMAT = "napari-robustmedsam-session"
SESSION_VERSION = 1
LABEL_SUFFIXES = (".tif", ".tiff", ".npy", ".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".png")
#: Written but not read back as a session: a DICOM Segmentation of labels drawn on a DICOM series.
SAVE_ONLY_SUFFIXES = (".dcm",)
COORDINATES_NOTE = (
    "points (x, y) = (column, row) pixel indices; boxes (x0, y0, x1, y1) with exclusive upper corners; "
    "slice keys index the first axis of a volume ('0' for a 2D image)"
)


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def _stem(path: Path) -> str:
    suffix = _suffix(path)
    return path.name[: -len(suffix)] if suffix else path.name


def prompts_path_for(labels_path: str | Path) -> Path:
    """``case01.tif`` -> ``case01.prompts.json`` (same folder)."""
    p = Path(labels_path)
    return p.with_name(_stem(p) + ".prompts.json")


def _labels_path_from_json(json_path: Path, data: dict) -> Path:
    name = data.get("labels_file")
    if not name:
        raise UserFacingError(f"{json_path} names no labels file")
    return json_path.with_name(name)


@dataclass
class LoadedSession:
    labels: np.ndarray
    records: list[dict[str, Any]]
    labels_path: Path
    prompts_path: Path | None
    meta: dict[str, Any] = field(default_factory=dict)
    geometry: Any = None  # io.medical.Geometry of a NIfTI / NRRD / MetaImage labels file


def save_session(
    labels_path: str | Path,
    labels: np.ndarray,
    records: list[dict[str, Any]],
    image_meta: dict[str, Any] | None = None,
    model_meta: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    geometry: Any = None,
    class_names: dict[int, str] | None = None,
    *,
    inputs=(),
    overwrite: bool = False,
) -> tuple[Path, Path]:
    """Write the labels and the prompts JSON next to each other (both atomic); return both paths.

    Neither file may be the annotated image (``image_meta["source"]``) or one of ``inputs``; existing files are
    replaced only with ``overwrite=True`` (:mod:`napari_robustmedsam.io.output_paths`). ``geometry``
    (:class:`~napari_robustmedsam.io.medical.Geometry`): NIfTI / NRRD / MetaImage labels are written on the
    image's grid; ``class_names`` (value -> name) name a DICOM-SEG's segments.
    """
    from ..io import atomic_write_path, write_mask
    from ..io.output_paths import check_outputs

    p = Path(labels_path)
    source = (image_meta or {}).get("source")
    check_outputs([p, prompts_path_for(p)], inputs=[*inputs, source], overwrite=overwrite)
    suffix = _suffix(p)
    if suffix not in LABEL_SUFFIXES + SAVE_ONLY_SUFFIXES:
        raise UserFacingError(
            f"cannot save labels as {suffix or 'a file without suffix'!r}; use one of {', '.join(LABEL_SUFFIXES)}"
        )
    arr = np.asarray(labels)
    if suffix == ".png" and arr.ndim != 2:
        raise UserFacingError("a 3D label volume cannot be saved as PNG; use .tif, .npy or .nii.gz")
    if suffix in (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd"):
        try:
            import SimpleITK  # noqa: F401
        except ImportError:
            raise UserFacingError(f"saving {suffix} needs SimpleITK (pip install SimpleITK); or save as .tif / .npy") from None
    if arr.dtype.kind not in "iub":
        raise UserFacingError(f"labels must be integers, got {arr.dtype}")
    if arr.dtype.kind == "u" and arr.dtype.itemsize > 4 or (arr.size and arr.max() > np.iinfo(np.uint32).max):
        raise UserFacingError("label ids above 2**32 - 1 are not supported")
    out = arr.astype(np.uint16 if arr.size == 0 or arr.max() <= 65535 else np.uint32)
    if suffix == ".png" and out.max(initial=0) > 65535:
        raise UserFacingError("label values beyond 65535 do not fit a PNG; use .tif or .npy")
    meta = {
        "format": SESSION_FORMAT,
        "version": SESSION_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "labels_file": p.name,
        "shape": list(arr.shape),
        "dtype": str(out.dtype),
        "coordinates": COORDINATES_NOTE,
        "image": image_meta or {},
        "model": model_meta or {},
        "objects": records,
    }
    if extra:
        meta["extra"] = extra
    text = json.dumps(meta, indent=1, default=_json_default)  # serialise before writing anything
    write_mask(p, out, geometry, class_names, overwrite=True)  # checked above, with the JSON
    json_path = prompts_path_for(p)
    with atomic_write_path(json_path) as tmp:
        tmp.write_text(text)
    return p, json_path


def _json_default(value: Any):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot store {type(value).__name__} in the session JSON")


def load_session(path: str | Path) -> LoadedSession:
    """Load labels (+ prompts when the JSON is there) from the labels file or the ``.prompts.json``."""
    from ..io import read_image_geometry

    p = Path(path)
    if p.name.endswith(".prompts.json"):
        json_path: Path | None = p
    else:
        json_path = prompts_path_for(p)
    data: dict[str, Any] = {}
    if json_path is not None and json_path.exists():
        try:
            data = json.loads(json_path.read_text())
        except (OSError, ValueError) as err:
            raise UserFacingError(f"cannot read the session file {json_path}: {err}") from err
        if data.get("format") != SESSION_FORMAT:
            raise UserFacingError(f"{json_path} is not a {SESSION_FORMAT} file")
        if int(data.get("version", 0)) > SESSION_VERSION:
            raise UserFacingError(f"{json_path} was written by a newer version (format {data['version']}); update the plugin")
        labels_path = _labels_path_from_json(json_path, data) if p == json_path else p
    else:
        if p.name.endswith(".prompts.json"):
            raise UserFacingError(f"session file not found: {p}")
        json_path = None
        labels_path = p
    labels, geometry = read_image_geometry(labels_path)
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iub":
        raise UserFacingError(f"{labels_path} does not hold integer labels ({labels.dtype})")
    if data and list(labels.shape) != list(data.get("shape", labels.shape)):
        raise UserFacingError(f"{labels_path} has shape {labels.shape} but the session says {data.get('shape')}")
    return LoadedSession(
        labels=labels.astype(np.uint32),
        records=list(data.get("objects") or []),
        labels_path=labels_path,
        prompts_path=json_path,
        meta={k: v for k, v in data.items() if k != "objects"},
        geometry=geometry,
    )
