"""The fine-tune tab's training data, found in the viewer: every Labels layer that matches an image layer.

A Labels layer matches an image layer when it covers it pixel for pixel (the same (Y, X) or (Z, Y, X) shape; an
RGB image's colour axis aside). The annotator's ``committed objects (<image>)`` layers belong to their image; for
other Labels layers, an image whose name the labels' name contains wins ("scan" for "scan labels"), else the only
image of that shape, else the first. Every labelled slice of a volume is one training plane. The planes nobody
labelled (the other slices of those volumes, and 2D images of a labelled image's size without labels) are the
candidates of "Which image next".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._common import role_of, spatial_shape, unwrap

#: annotator layers that hold the user's labels (the prompt and current-object layers are not labels)
LABEL_ROLES = (None, "committed")


@dataclass
class LayerPair:
    image: object  # napari Image layer
    labels: object  # napari Labels layer
    labelled_planes: int  # labelled slices of a volume, or 1 for a labelled 2D image

    @property
    def is_volume(self) -> bool:
        return np.ndim(self.labels.data) == 3

    @property
    def title(self) -> str:
        what = f"{self.labelled_planes} labelled slice(s)" if self.is_volume else "2D image"
        return f"{self.image.name}  ←  {self.labels.name}  ({what})"


def image_layers(viewer) -> list:
    from napari.layers import Image

    return [unwrap(l) for l in viewer.layers
            if isinstance(unwrap(l), Image) and role_of(l) is None and not getattr(unwrap(l), "multiscale", False)
            and len(spatial_shape(unwrap(l))) in (2, 3)]


def labels_layers(viewer) -> list:
    from napari.layers import Labels

    return [unwrap(l) for l in viewer.layers if isinstance(unwrap(l), Labels) and role_of(l) in LABEL_ROLES]


def _labelled_planes(data) -> int:
    arr = np.asarray(data)
    if arr.ndim == 3:
        return int(np.count_nonzero(arr.reshape(arr.shape[0], -1).any(axis=1)))
    return int(bool(arr.any()))


def _image_for(labels, candidates: list):
    owner = labels.metadata.get("robustmedsam_image")
    for image in candidates:
        if owner is not None and id(image) == owner:
            return image
    named = [im for im in candidates if im.name and im.name in labels.name]
    if named:
        return max(named, key=lambda im: len(im.name))
    return candidates[0] if candidates else None


def find_pairs(viewer) -> list[LayerPair]:
    """Every (image, Labels) pair of the viewer with at least one labelled plane (see the module docstring)."""
    images = image_layers(viewer)
    out = []
    for labels in labels_layers(viewer):
        shape = tuple(np.shape(labels.data))
        image = _image_for(labels, [im for im in images if spatial_shape(im) == shape])
        if image is None:
            continue
        n = _labelled_planes(labels.data)
        if n:
            out.append(LayerPair(image, labels, n))
    return out


def _unpaired_images_like_a_labelled_one(viewer, pairs: list[LayerPair]) -> list:
    shapes = {spatial_shape(p.image) for p in pairs if not p.is_volume}
    paired = {id(p.image) for p in pairs}
    return [im for im in image_layers(viewer) if id(im) not in paired and spatial_shape(im) in shapes]


def _volume_labels(pairs: list[LayerPair]) -> dict:
    """Per volume image: its labels, every Labels layer of it merged (a slice labelled in any layer is labelled)."""
    out: dict = {}
    for p in pairs:
        if p.is_volume:
            lab = np.asarray(p.labels.data)
            image, old = out.get(id(p.image), (p.image, None))
            out[id(p.image)] = (image, lab if old is None else np.where(old != 0, old, lab))
    return out


def count_planes_to_rank(viewer, pairs: list[LayerPair]) -> int:
    """How many planes :func:`planes_to_rank` gives (for the time estimate)."""
    volumes = 0
    for _image, lab in _volume_labels(pairs).values():
        volumes += int(lab.shape[0] - np.count_nonzero(lab.reshape(lab.shape[0], -1).any(axis=1)))
    return volumes + len(_unpaired_images_like_a_labelled_one(viewer, pairs))


def planes_to_rank(viewer, pairs: list[LayerPair], modality: str = "generic") -> list:
    """The unlabelled planes to rank after a fine-tune (:mod:`training.finetune.next_image`)."""
    from training.finetune.next_image import image_plane, volume_planes

    out = []
    for image, lab in _volume_labels(pairs).values():
        out.extend(volume_planes(np.asarray(image.data), lab, image.name, modality))
    labelled_2d = {}
    for pair in pairs:
        if not pair.is_volume:
            labelled_2d.setdefault(spatial_shape(pair.image), np.asarray(pair.labels.data))
    for image in _unpaired_images_like_a_labelled_one(viewer, pairs):
        out.append(image_plane(np.asarray(image.data), labelled_2d[spatial_shape(image)], image.name, modality))
    return out
