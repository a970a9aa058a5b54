"""Evaluation samples: 2D image/mask folders (medseg layout) and 3D volumes (one sample per labelled slice).

Layouts found recursively under ``--data``:

- 2D: any folder with ``images/`` and ``masks/`` sub-folders; image and mask share the file stem
  (``<dataset>/images/<id>.png`` + ``<dataset>/masks/<id>.png``). The dataset name is the folder name.
- 3D: any folder holding ``image.<ext>`` and ``labels.<ext>`` (TIFF, NPY, NIfTI, NRRD, MHA; (Z, Y, X)); every
  slice with a non-zero label becomes one sample ``<volume>/z<index>``.

Modality (for the degradations' modality sets): ``--modality`` if given, else from ``MANIFEST.json`` in the
folder or a parent (``datasets[].modality`` / ``volumes[].description``), mapped by keywords to the
degradation library's names; ``generic`` when nothing matches.

Objects: each non-zero label value of a mask is one object (instance masks such as DSB2018 nuclei have one
value per instance); ``objects="components"`` splits every label value into its connected components
(e.g. separate caries lesions). Objects smaller than ``min_object_px`` are skipped, and at most
``max_objects`` per image are kept (seeded choice, sorted) - the protocol of the independent LiteMedSAM
anchor measurement.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from napari_robustmedsam.io import read_image, read_image_geometry
from napari_robustmedsam.io.medical import is_medical_path
from napari_robustmedsam.prompting import rng_for

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".npy", ".nii", ".nii.gz", ".nrrd", ".mha")
VOLUME_SUFFIXES = (".tif", ".tiff", ".npy", ".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")

# Keyword -> degradation-library modality; first match wins (nuclei before microscopy/pathology).
_MODALITY_RULES: tuple[tuple[str, str], ...] = (
    (r"dental", "dental_xray"),
    (r"x-?ray|radiograph|\bcxr\b", "xray"),
    (r"\bmri?\b|magnetic resonance", "mri"),
    (r"\bct\b|computed tomography", "ct"),
    (r"ultrasound|\bus\b|sonograph", "ultrasound"),
    (r"fundus|retina", "fundus"),
    (r"dermoscop|skin lesion", "dermoscopy"),
    (r"nucle", "nuclei"),
    (r"microscop", "microscopy"),
    (r"endoscop|colonoscop|polyp", "endoscopy"),
    (r"\boct\b|optical coherence", "oct"),
    (r"patholog|histolog|h&e", "pathology"),
)


def modality_from_text(text: str | None) -> str:
    """Degradation-library modality name for a free-text modality description ('generic' if unknown)."""
    if not text:
        return "generic"
    low = str(text).lower()
    for pattern, name in _MODALITY_RULES:
        if re.search(pattern, low):
            return name
    return "generic"


@dataclass(frozen=True)
class Sample:
    """One 2D evaluation image (a 2D file, or one slice of a volume) with its label mask."""

    key: str  # unique id: "<dataset>/<image id>" (2D) or "<volume>/z<index>" (slice)
    dataset: str
    image_id: str
    modality: str
    image_path: Path
    mask_path: Path
    slice_index: int | None = None
    instances: bool = False

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        """(image (H, W) or (H, W, 3), label map (H, W) integer)."""
        if self.slice_index is None:
            image = read_image(self.image_path)
            labels = read_image(self.mask_path)
        else:
            image = _read_volume(str(self.image_path))[self.slice_index]
            labels = _read_volume(str(self.mask_path))[self.slice_index]
        labels = np.asarray(labels)
        if labels.ndim == 3:  # an RGB(A) mask saved by mistake: any channel non-zero counts
            labels = labels[..., 0]
        if image.shape[:2] != labels.shape:
            raise ValueError(f"{self.key}: image {image.shape} and mask {labels.shape} differ in size")
        return np.asarray(image), labels


def _read_volume(path: str) -> np.ndarray:
    return _read_volume_geometry(path)[0]


def _read_volume_geometry(path: str):
    """``(array, geometry or None)`` of a volume file or DICOM folder, kept for the next reads: discovery checks
    the grids, and each labelled slice is then loaded from the same arrays. A file written again since is read
    again (the key holds its modification time and size)."""
    stat = Path(path).stat()
    return _read_volume_cached(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _read_volume_cached(path: str, mtime_ns: int, size: int):
    array, geometry = read_image_geometry(path)
    return np.asarray(array), geometry


@dataclass
class DatasetInfo:
    name: str
    root: Path
    kind: str  # "2d" or "3d"
    modality: str
    instances: bool = False
    samples: list[Sample] = field(default_factory=list)
    image_path: Path | None = None  # 3D: the volume files
    mask_path: Path | None = None
    spacing: tuple[float, ...] | None = None  # 3D: (z, y, x) voxel spacing from MANIFEST.json, if given

    def load_volume(self) -> tuple[np.ndarray, np.ndarray]:
        """3D only: (image (Z, Y, X), labels (Z, Y, X))."""
        if self.kind != "3d":
            raise ValueError(f"{self.name} is not a volume")
        return _read_volume(str(self.image_path)), _read_volume(str(self.mask_path))


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def _stem(path: Path) -> str:
    name = path.name
    return name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else path.stem


def _manifests(folder: Path, stop: Path) -> list[dict]:
    """MANIFEST.json files in `folder` and its parents up to `stop` (inclusive), nearest first."""
    out = []
    cur = folder.resolve()
    stop = stop.resolve()
    while True:
        m = cur / "MANIFEST.json"
        if m.is_file():
            try:
                out.append(json.loads(m.read_text()))
            except (OSError, ValueError):
                pass
        if cur == stop or cur.parent == cur:
            break
        cur = cur.parent
    return out


def _manifest_entry(name: str, manifests: list[dict]) -> dict | None:
    for m in manifests:
        for key in ("datasets", "volumes"):
            for entry in m.get(key, []) or []:
                if isinstance(entry, dict) and entry.get("name") == name:
                    return entry
        if m.get("name") == name:
            return m
    return None


def _find_file(folder: Path, stem: str) -> Path | None:
    """``<folder>/<stem>.<volume suffix>``, or ``<folder>/<stem>/`` when it is a DICOM series folder."""
    for suffix in VOLUME_SUFFIXES:
        p = folder / f"{stem}{suffix}"
        if p.is_file():
            return p
    series = folder / stem
    if series.is_dir() and is_medical_path(series):
        return series
    return None


VOLUME_LAYOUT = ("<volume>/image.(tif|nii.gz|nrrd|mha|npy) or <volume>/image/ (a DICOM series) + "
                 "<volume>/labels.(tif|nii.gz|nrrd|mha|npy)")


def discover(root: str | Path, modality: str | None = None) -> list[DatasetInfo]:
    """All 2D datasets and 3D volumes under `root` (sorted by name)."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"data folder not found: {root}")
    found: list[DatasetInfo] = []
    folders = [root] + sorted(p for p in root.rglob("*") if p.is_dir())
    seen: set[Path] = set()
    for folder in folders:
        if any(parent in seen for parent in folder.parents):
            continue  # inside an already-found dataset (e.g. its images/ folder)
        images, masks = folder / "images", folder / "masks"
        if images.is_dir() and masks.is_dir():
            found.append(_read_2d(folder, root, modality))
            seen.add(folder)
            continue
        image, labels = _find_file(folder, "image"), _find_file(folder, "labels")
        if image is not None and labels is not None:
            found.append(_read_3d(folder, image, labels, root, modality))
            seen.add(folder)
    found = [d for d in found if d.samples]
    if not found:
        raise FileNotFoundError(
            f"no image/mask data under {root}: expected <dataset>/images + <dataset>/masks folders or {VOLUME_LAYOUT}"
        )
    return sorted(found, key=lambda d: d.name)


def _entry_modality(entry: dict | None) -> str:
    if not entry:
        return "generic"
    return modality_from_text(entry.get("modality") or entry.get("description"))


def _read_2d(folder: Path, root: Path, modality: str | None) -> DatasetInfo:
    name = folder.name
    entry = _manifest_entry(name, _manifests(folder, root))
    mod = modality or _entry_modality(entry)
    instances = bool(entry) and isinstance(entry.get("label_values"), str) and "instance" in entry["label_values"]
    masks = {_stem(p): p for p in (folder / "masks").iterdir() if p.is_file() and _suffix(p) in IMAGE_SUFFIXES}
    info = DatasetInfo(name, folder, "2d", mod, instances)
    for img in sorted((folder / "images").iterdir()):
        if not img.is_file() or _suffix(img) not in IMAGE_SUFFIXES:
            continue
        mask = masks.get(_stem(img))
        if mask is None:
            continue
        info.samples.append(Sample(f"{name}/{_stem(img)}", name, _stem(img), mod, img, mask, None, instances))
    return info


def _read_3d(folder: Path, image: Path, labels: Path, root: Path, modality: str | None) -> DatasetInfo:
    name = folder.name
    entry = _manifest_entry(name, _manifests(folder, root))
    mod = modality or _entry_modality(entry)
    vol = _read_volume(str(labels))
    if vol.ndim != 3:
        raise ValueError(f"{labels}: expected a (Z, Y, X) label volume, got shape {vol.shape}")
    header_modality = _check_same_grid(image, labels)
    if modality is None and mod == "generic" and header_modality:  # no manifest says it: the DICOM header does
        mod = header_modality
    spacing = None
    if entry and isinstance(entry.get("spacing_zyx_mm"), (list, tuple)) and len(entry["spacing_zyx_mm"]) == 3:
        spacing = tuple(float(v) for v in entry["spacing_zyx_mm"])
    info = DatasetInfo(name, folder, "3d", mod, False, image_path=image, mask_path=labels, spacing=spacing)
    for z in range(vol.shape[0]):
        if vol[z].any():
            info.samples.append(Sample(f"{name}/z{z:03d}", name, f"z{z:03d}", mod, image, labels, z, False))
    return info


def _check_same_grid(image: Path, labels: Path) -> str | None:
    """Refuse labels that do not lie on their image's grid (shape, and spacing, origin and direction where both
    files carry them), naming what differs: training or measuring on misplaced labels gives silent nonsense.
    Returns the degradation modality the image's DICOM header names, if any."""
    from napari_robustmedsam.degradations.modality import modality_from_dicom
    from napari_robustmedsam.io.medical import check_labels_fit

    image_arr, image_geo = _read_volume_geometry(str(image))
    labels_arr, labels_geo = _read_volume_geometry(str(labels))
    check_labels_fit(labels_arr.shape, labels_geo, image_arr.shape[:3], image_geo, what=f"the labels in {labels}")
    return modality_from_dicom(image_geo.modality if image_geo is not None else None)


def select_samples(
    datasets: list[DatasetInfo],
    per_dataset: int | None = None,
    seed: int = 0,
    names: list[str] | None = None,
) -> list[Sample]:
    """Samples of the chosen datasets; at most `per_dataset` per dataset (seeded choice, nested in N, in the
    seeded order), in round-robin order over the datasets."""
    per: list[list[Sample]] = []
    if names:
        known = {d.name for d in datasets}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"unknown dataset(s) {unknown}; found: {sorted(known)}")
    for d in datasets:
        if names and d.name not in names:
            continue
        samples = d.samples
        if per_dataset is not None and len(samples) > per_dataset:
            # the first N of one seeded permutation, in that order: subsets are nested, so growing N reuses
            # finished work, and an interrupted run has finished a prefix = the subset of a smaller N
            idx = rng_for(seed, "subset", d.name).permutation(len(samples))[:per_dataset]
            samples = [samples[i] for i in idx]
        per.append(list(samples))
    # interleave the datasets (1st image of each, then 2nd, ...): an interrupted run covers all datasets evenly
    out: list[Sample] = []
    for i in range(max((len(p) for p in per), default=0)):
        out.extend(p[i] for p in per if i < len(p))
    return out


@dataclass(frozen=True)
class GTObject:
    object_id: str  # "label<v>" or "label<v>_c<k>"
    mask: np.ndarray

    @property
    def size(self) -> int:
        return int(self.mask.sum())


def select_objects(
    labels: np.ndarray,
    sample_key: str,
    seed: int = 0,
    objects: str = "label",
    min_object_px: int = 20,
    max_objects: int | None = 3,
) -> list[GTObject]:
    """The evaluated objects of one label map (see the module docstring)."""
    if objects not in ("label", "components"):
        raise ValueError(f"objects must be 'label' or 'components', got {objects!r}")
    lab = np.asarray(labels)
    found: list[GTObject] = []
    for v in np.unique(lab):
        if v == 0:
            continue
        mask = lab == v
        if objects == "label":
            found.append(GTObject(f"label{int(v)}", mask))
        else:
            comps, n = ndimage.label(mask)
            for k in range(1, n + 1):
                found.append(GTObject(f"label{int(v)}_c{k}", comps == k))
    found = [o for o in found if o.size >= min_object_px]
    if max_objects is not None and len(found) > max_objects:
        idx = rng_for(seed, "objects", sample_key).choice(len(found), size=max_objects, replace=False)
        found = [found[i] for i in sorted(idx)]
    return found
