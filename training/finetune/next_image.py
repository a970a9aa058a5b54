"""Which image next: rank the planes the user has not labelled by the model's own uncertainty.

Each candidate plane is segmented twice with the same prompts, on the plane itself and on a degraded copy
(:data:`PROBE_LEVEL` of the degradation library, seeded by the plane's key), and

    uncertainty = mean over objects of ( (1 - Dice(mask on the plane, mask on the degraded copy))
                                         + (1 - the model's predicted IoU of the mask on the plane) ) / 2

(0 = the model is sure and stable; higher = the masks fall apart under a mild degradation, or the model itself
doubts its mask). The prompts are the tight boxes of the objects on the nearest labelled plane: the nearest
labelled slice of the same volume, or, for a separate 2D image, a labelled image of the same size. It is the
model's own signal; nobody has measured here that labelling the top of this list helps more than another
order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from napari_robustmedsam.degradations import degrade_random
from napari_robustmedsam.metrics import dice
from napari_robustmedsam.prompting import derive_seed, tight_box

#: the degradation of the probe copy: mild, so that a stable model keeps its mask
PROBE_LEVEL = "LQ-2"
#: planes scored at most (evenly spread over the candidates); each costs two image encodings
MAX_RANKED = 24


@dataclass
class PlaneToRank:
    key: str  # shown to the user, e.g. "MRI/z012"
    image: np.ndarray  # (H, W) or (H, W, 3)
    boxes: np.ndarray  # (N, 4) x0, y0, x1, y1: the prompts
    layer: str  # the image layer's name
    z: int | None = None  # the slice of a volume, None for a 2D image
    modality: str = "generic"


@dataclass
class RankedPlane:
    key: str
    layer: str
    z: int | None
    uncertainty: float
    disagreement: float  # mean 1 - Dice(clean mask, degraded mask)
    doubt: float  # mean 1 - predicted IoU
    parts: dict = field(default_factory=dict)


def _boxes_of(labels: np.ndarray) -> np.ndarray:
    ids = [int(v) for v in np.unique(labels) if v != 0]
    return np.stack([tight_box(labels == i) for i in ids]).astype(np.float32) if ids else np.zeros((0, 4), np.float32)


def volume_planes(image: np.ndarray, labels: np.ndarray, layer: str, modality: str = "generic") -> list[PlaneToRank]:
    """The unlabelled slices of a (Z, Y, X[, 3]) volume whose labels cover some slices, with the boxes of the
    nearest labelled slice's objects."""
    labelled = [z for z in range(labels.shape[0]) if labels[z].any()]
    if not labelled:
        return []
    out = []
    for z in range(labels.shape[0]):
        if labels[z].any():
            continue
        near = min(labelled, key=lambda s: (abs(s - z), s))
        out.append(PlaneToRank(f"{layer}/z{z:03d}", np.asarray(image[z]), _boxes_of(labels[near]), layer, z, modality))
    return out


def image_plane(image: np.ndarray, like_labels: np.ndarray, layer: str, modality: str = "generic") -> PlaneToRank:
    """An unlabelled 2D image prompted with the boxes of a labelled image of the same size."""
    return PlaneToRank(layer, np.asarray(image), _boxes_of(like_labels), layer, None, modality)


def spread(planes: list[PlaneToRank], limit: int = MAX_RANKED) -> list[PlaneToRank]:
    """At most ``limit`` planes, evenly spread over the list (a long volume is sampled, not scored whole)."""
    if len(planes) <= limit:
        return list(planes)
    idx = np.unique(np.linspace(0, len(planes) - 1, limit).round().astype(int))
    return [planes[i] for i in idx]


def rank_planes(predictor, planes: list[PlaneToRank], *, seed: int = 0, cancel: Callable[[], bool] | None = None,
                progress: Callable[[int, int, str], None] | None = None) -> list[RankedPlane]:
    """Score every plane (see the module docstring); most uncertain first."""
    out: list[RankedPlane] = []
    for n, plane in enumerate(planes):
        if cancel is not None and cancel():
            break
        if len(plane.boxes) == 0:
            continue
        try:
            degraded, _ = degrade_random(plane.image, PROBE_LEVEL, plane.modality, derive_seed(seed, "probe", plane.key))
        except Exception:  # noqa: BLE001 - a modality the library does not know: its general set
            degraded, _ = degrade_random(plane.image, PROBE_LEVEL, "generic", derive_seed(seed, "probe", plane.key))
        clean = predictor.predict(boxes=plane.boxes, embedding=predictor.compute_embedding(plane.image),
                                  multimask_output=False)
        probe = predictor.predict(boxes=plane.boxes, embedding=predictor.compute_embedding(degraded),
                                  multimask_output=False)
        disagreement = float(np.mean([1.0 - dice(a, b) for a, b in zip(clean.masks, probe.masks)]))
        doubt = float(np.mean(1.0 - np.clip(np.asarray(clean.scores, dtype=float), 0.0, 1.0)))
        out.append(RankedPlane(plane.key, plane.layer, plane.z, (disagreement + doubt) / 2.0, disagreement, doubt))
        if progress is not None:
            progress(n + 1, len(planes), f"ranking {plane.key}")
    return sorted(out, key=lambda r: (-r.uncertainty, r.key))
