"""Training data: 2D (image, label map) items from folders, arrays (napari layers), or annotation sessions.

Every item is one 2D plane (a 2D image, or one labelled slice of a volume) with an integer label map of the
same height and width: 0 = background, every other value one object (instance ids and class ids both work).
Items whose labels are all background are dropped with a notice; if nothing is left the error says why.

Sources:

- :func:`items_from_folder` - the ``../shared/data/medseg`` layout (``<dataset>/images/*.png`` +
  ``<dataset>/masks/*.png``, found recursively) and ``<volume>/image.*`` (or a DICOM series folder) + ``labels.*`` volumes, through the
  evaluation package's reader (:mod:`training.evaluation.dataset`), so both tools see the same samples.
- :func:`items_from_arrays` - numpy arrays, e.g. napari Image + Labels layers' ``.data``; a (Z, Y, X) pair gives
  one item per labelled slice.
- :func:`items_from_session` - a session saved by the annotator (``case.tif`` + ``case.prompts.json``).

:func:`split_items` gives a seeded train / validation split (by image, so that no image is in both).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from napari_robustmedsam.annotation.export import load_session
from napari_robustmedsam.errors import ImageInputError, UserFacingError
from napari_robustmedsam.io import read_image
from napari_robustmedsam.prompting import rng_for
from training.evaluation.dataset import discover


class TrainingError(UserFacingError):
    """A problem with the training inputs or run that the user can fix (shown without a traceback)."""


class UnreadableTrainingFileWarning(UserWarning):
    """A file of a training folder cannot be read (damaged, truncated, not an image); it is skipped."""


@dataclass
class TrainItem:
    """One 2D training plane."""

    key: str  # unique name, e.g. "ph2_dermoscopy/IMD002" or "layer 'MRI'/z012"
    image: np.ndarray  # (H, W) or (H, W, 3), any numeric dtype
    labels: np.ndarray  # (H, W) integer; 0 = background
    modality: str = "generic"  # degradation-library modality name
    source: str = ""  # where it came from (file, layer name)
    object_ids: list[int] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.labels.shape[0]), int(self.labels.shape[1])


def _check_image(image: np.ndarray, where: str) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[-1] == 4:
        arr = arr[..., :3]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] == 3)):
        raise TrainingError(f"{where}: image of shape {arr.shape} is not a 2D gray (H, W) or RGB (H, W, 3) image")
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise TrainingError(f"{where}: unsupported pixel type {arr.dtype}")
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise TrainingError(f"{where}: the image has NaN/inf pixels; replace them (numpy.nan_to_num) first")
    if min(arr.shape[:2]) < 8:
        raise TrainingError(f"{where}: image of size {arr.shape[0]} x {arr.shape[1]} px is too small to train on")
    return arr


def _check_labels(labels: np.ndarray, where: str) -> np.ndarray:
    lab = np.asarray(labels)
    if lab.ndim == 3 and lab.shape[-1] in (3, 4):  # an RGB(A) mask saved by mistake
        lab = lab[..., 0]
    if lab.dtype == bool:
        lab = lab.astype(np.uint8)
    if not np.issubdtype(lab.dtype, np.integer):
        if np.issubdtype(lab.dtype, np.floating) and np.isfinite(lab).all() and np.all(lab == np.round(lab)):
            lab = lab.astype(np.int64)
        else:
            raise TrainingError(f"{where}: labels must be integers (0 = background), got {lab.dtype}")
    if lab.ndim != 2:
        raise TrainingError(f"{where}: labels of shape {lab.shape} are not a 2D label image")
    if (lab < 0).any():
        raise TrainingError(f"{where}: labels contain negative values")
    return lab


def make_item(key: str, image: np.ndarray, labels: np.ndarray, modality: str = "generic", source: str = "",
              min_object_px: int = 1) -> TrainItem | None:
    """Validated item, or ``None`` when the labels hold no object of at least ``min_object_px`` pixels."""
    img = _check_image(image, key)
    lab = _check_labels(labels, key)
    if img.shape[:2] != lab.shape:
        raise TrainingError(
            f"{key}: image ({img.shape[0]} x {img.shape[1]}) and labels ({lab.shape[0]} x {lab.shape[1]}) differ in "
            "size; the label image must cover the image pixel for pixel"
        )
    values, counts = np.unique(lab, return_counts=True)
    ids = [int(v) for v, c in zip(values, counts) if v != 0 and c >= max(1, min_object_px)]
    if not ids:
        return None
    return TrainItem(key, img, lab.astype(np.int32, copy=False), modality, source, ids)


def _finish(items: list[TrainItem], empty: list[str], what: str, notices: list[str] | None) -> list[TrainItem]:
    if empty and notices is not None:
        shown = ", ".join(empty[:5]) + (" ..." if len(empty) > 5 else "")
        notices.append(f"{len(empty)} plane(s) of {what} have only background labels and are skipped: {shown}")
    if not items:
        raise TrainingError(
            f"no labelled objects in {what}: every label image is empty (all background). Paint at least one "
            "object (label value > 0) before fine-tuning"
        )
    return items


def items_from_arrays(
    images: Sequence[np.ndarray] | np.ndarray,
    labels: Sequence[np.ndarray] | np.ndarray,
    *,
    names: Sequence[str] | None = None,
    modality: str | Sequence[str] = "generic",
    min_object_px: int = 1,
    notices: list[str] | None = None,
) -> list[TrainItem]:
    """Items from image / label arrays (one pair, or lists of pairs). 3D pairs give their labelled slices.

    Images may differ in size and dtype from pair to pair; each label array must match its image's shape
    ((Z, Y, X) labels for a (Z, Y, X) or (Z, Y, X, 3) volume; (Y, X) labels for a (Y, X[, 3]) image).
    """
    if isinstance(images, np.ndarray) or not isinstance(images, (list, tuple)):
        images, labels = [images], [labels]
    if isinstance(labels, np.ndarray) or not isinstance(labels, (list, tuple)):
        labels = [labels]
    if len(images) != len(labels):
        raise TrainingError(f"{len(images)} images but {len(labels)} label arrays: give one label array per image")
    if not len(images):
        raise TrainingError("no images given")
    mods = [modality] * len(images) if isinstance(modality, str) else list(modality)
    names = list(names) if names is not None else [f"image{i}" for i in range(len(images))]
    out: list[TrainItem] = []
    empty: list[str] = []
    for name, img, lab, mod in zip(names, images, labels, mods):
        img, lab = np.asarray(img), np.asarray(lab)
        is_volume = lab.ndim == 3 and not (lab.shape[-1] in (3, 4) and img.ndim == 3 and img.shape[:2] == lab.shape[:2])
        if is_volume:
            if img.shape[:3] != lab.shape:
                raise TrainingError(
                    f"{name}: image of shape {img.shape} and labels of shape {lab.shape} do not match; a (Z, Y, X) "
                    "label volume needs a (Z, Y, X) or (Z, Y, X, 3) image"
                )
            if not lab.any():
                empty.append(name)
            for z in range(lab.shape[0]):
                if not lab[z].any():
                    continue  # unlabelled slices of a volume are simply not training data
                item = make_item(f"{name}/z{z:03d}", img[z], lab[z], mod, name, min_object_px)
                if item is None:
                    empty.append(f"{name}/z{z:03d}")
                else:
                    out.append(item)
        else:
            if img.shape[:2] != lab.shape[:2] or lab.ndim != 2:
                raise TrainingError(
                    f"{name}: image of shape {img.shape} and labels of shape {lab.shape} do not match; the labels must "
                    "have the image's height and width"
                )
            item = make_item(name, img, lab, mod, name, min_object_px)
            if item is None:
                empty.append(name)
            else:
                out.append(item)
    return _finish(out, empty, "the given label layers", notices)


def items_from_folder(
    root: str | os.PathLike,
    *,
    modality: str | None = None,
    datasets: Sequence[str] | None = None,
    min_object_px: int = 20,
    notices: list[str] | None = None,
) -> list[TrainItem]:
    """Items of every dataset under ``root`` (medseg layout or image/labels volumes), sorted by key."""
    root = Path(root)
    if not root.exists():
        raise TrainingError(f"data folder not found: {root}")
    if root.is_file():
        raise TrainingError(f"--data must be a folder, {root} is a file (use --session for an annotation session)")
    try:
        found = discover(root, modality)
    except FileNotFoundError as err:
        raise TrainingError(str(err)) from None
    if datasets:
        unknown = sorted(set(datasets) - {d.name for d in found})
        if unknown:
            raise TrainingError(f"unknown dataset(s) {unknown}; found {[d.name for d in found]}")
        found = [d for d in found if d.name in datasets]
    out: list[TrainItem] = []
    empty: list[str] = []
    unreadable: dict[Path, str] = {}  # file -> why (a volume's slices share one file: said once)
    for info in found:
        for sample in info.samples:
            if sample.image_path in unreadable or sample.mask_path in unreadable:
                continue
            try:
                image, labels = sample.load()
            except ImageInputError as err:  # a damaged file: skip it, say which, train on the rest
                bad = sample.mask_path if str(sample.mask_path) in str(err) else sample.image_path
                unreadable[bad] = str(err)
                continue
            except ValueError as err:
                raise TrainingError(str(err)) from None
            item = make_item(sample.key, image, labels, sample.modality, str(sample.image_path), min_object_px)
            if item is None:
                empty.append(sample.key)
            else:
                out.append(item)
    for path, why in unreadable.items():
        message = f"skipped {path}: {why}"
        if notices is not None:
            notices.append(message)
        else:
            warnings.warn(message, UnreadableTrainingFileWarning, stacklevel=2)
    if unreadable and not out:
        raise TrainingError(
            f"none of the images under {root} could be used: {len(unreadable)} unreadable file(s), first "
            f"{next(iter(unreadable))}; replace or remove them"
        )
    return _finish(sorted(out, key=lambda it: it.key), empty, str(root), notices)


def items_from_session(
    path: str | os.PathLike,
    image: np.ndarray | str | os.PathLike | None = None,
    *,
    modality: str = "generic",
    min_object_px: int = 1,
    notices: list[str] | None = None,
) -> list[TrainItem]:
    """Items of an annotation session saved by the annotator (labels file or ``.prompts.json``).

    The image is ``image`` (array or file) if given, else the file recorded in the session (``image.source``).
    """
    session = load_session(path)
    if image is None:
        source = (session.meta.get("image") or {}).get("source")
        if not source or not Path(str(source)).is_file():
            raise TrainingError(
                f"the session {path} does not record an existing image file (source: {source!r}); give the image "
                "with --session-image FILE"
            )
        image = source
    arr = np.asarray(read_image(image)) if isinstance(image, (str, os.PathLike)) else np.asarray(image)
    name = Path(str(session.labels_path)).name
    return items_from_arrays([arr], [session.labels], names=[name], modality=modality, min_object_px=min_object_px,
                             notices=notices)


def split_items(items: list[TrainItem], val_fraction: float = 0.2, seed: int = 0,
                notices: list[str] | None = None) -> tuple[list[TrainItem], list[TrainItem]]:
    """Seeded split by source image (all slices of one volume stay together).

    With a single source image there is nothing to hold out: validation then reuses the training items
    (reported in ``notices``).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise TrainingError(f"the validation fraction must be in [0, 1), got {val_fraction}")
    groups: dict[str, list[TrainItem]] = {}
    for it in items:
        groups.setdefault(it.source or it.key, []).append(it)
    names = sorted(groups)
    n_val = int(round(len(names) * val_fraction))
    if val_fraction > 0 and n_val == 0 and len(names) >= 2:
        n_val = 1
    if n_val >= len(names):
        n_val = len(names) - 1
    if n_val <= 0:
        if val_fraction > 0 and notices is not None:
            notices.append("only one image: validation metrics are computed on the training image itself")
        return list(items), list(items) if val_fraction > 0 else []
    order = rng_for(seed, "split").permutation(len(names))
    val_names = {names[i] for i in order[:n_val]}
    train = [it for n in names if n not in val_names for it in groups[n]]
    val = [it for n in names if n in val_names for it in groups[n]]
    return train, val


def describe_items(items: list[TrainItem]) -> dict[str, Any]:
    """JSON-friendly summary (for checkpoint provenance)."""
    per: dict[str, int] = {}
    for it in items:
        per[it.key.split("/")[0]] = per.get(it.key.split("/")[0], 0) + 1
    return {
        "n_planes": len(items),
        "n_objects": int(sum(len(it.object_ids) for it in items)),
        "per_group": per,
        "modalities": sorted({it.modality for it in items}),
    }
