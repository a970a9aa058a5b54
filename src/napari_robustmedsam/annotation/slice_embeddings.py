"""Per-slice image embeddings of the image being annotated (2D, RGB, volume or RGB volume).

A 2D image has one slice (z = 0); a volume (Z, Y, X) has Z, each embedded on its own, lazily: a slice is
encoded the first time it is prompted or propagated into, or all at once by :meth:`SliceEmbeddings.compute`
("Compute embeddings", with progress and cancel). Embeddings are kept in memory and, when the project's
embedding engine (:func:`napari_robustmedsam.engine.embeddings.open_engine`) is given, also read from / written to
its disk cache so that re-opening the same image with the same model does not encode it again.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from ..errors import ImageInputError

IMAGE_KINDS = ("2d", "rgb", "volume", "rgb_volume")


def image_kind(shape: tuple[int, ...], rgb: bool = False) -> str:
    """Classify an image layer's data: '2d' (Y, X), 'rgb' (Y, X, 3|4), 'volume' (Z, Y, X), 'rgb_volume'.

    Raises :class:`ImageInputError` with what to do for anything else (4D stacks, channel axes...).
    """
    ndim = len(shape)
    if rgb and ndim == 3 and shape[-1] in (3, 4):
        kind = "rgb"
    elif rgb and ndim == 4 and shape[-1] in (3, 4):
        kind = "rgb_volume"
    elif not rgb and ndim == 2:
        kind = "2d"
    elif not rgb and ndim == 3:
        kind = "volume"
    else:
        raise ImageInputError(
            f"cannot annotate an image layer of shape {tuple(shape)}{' (RGB)' if rgb else ''}: the annotator takes "
            "a 2D image (Y, X), an RGB image (Y, X, 3), or a 3D volume (Z, Y, X). Split channels or time points "
            "into separate layers first (right-click the layer > Split Stack)."
        )
    plane = shape[1:3] if kind in ("volume", "rgb_volume") else shape[:2]
    if min(plane) < 2:
        raise ImageInputError(f"image planes of {plane[0]} x {plane[1]} px are too small to segment")
    return kind


def plane_shape(shape: tuple[int, ...], kind: str) -> tuple[int, int]:
    return tuple(shape[1:3]) if kind in ("volume", "rgb_volume") else tuple(shape[:2])  # type: ignore[return-value]


def n_slices(shape: tuple[int, ...], kind: str) -> int:
    return int(shape[0]) if kind in ("volume", "rgb_volume") else 1


class Cancelled(Exception):
    """Raised inside a worker when the user pressed Cancel."""


class EnginePredictor:
    """A Predictor-like front of the embedding engine: ``predict`` accepts plain and tiled embeddings,
    ``compute_embedding`` runs the engine's (BN-folded) encoder without caching (degraded copies)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.model = engine.model
        self.preprocessing = engine.preprocessing
        self.box_primary = engine.predictor.box_primary

    def compute_embedding(self, image: np.ndarray):
        return self.engine.encode(image)

    def predict(self, *args, **kwargs):
        return self.engine.tiled_predictor.predict(*args, **kwargs)

    def prepare_mask_prompt(self, mask_input, embedding=None) -> None:
        self.engine.tiled_predictor.prepare_mask_prompt(mask_input, embedding=embedding)


class SliceEmbeddings:
    """Embeddings of every slice of one image for one model.

    With an ``engine`` (:class:`napari_robustmedsam.engine.embeddings.EmbeddingEngine`) slices come from
    its memory / disk cache or are computed and written there; without one, ``predictor.compute_embedding``
    is used and results are kept in memory only. Slices already fetched are also kept here, so that a
    look-up never waits for another slice being encoded in another thread.
    """

    def __init__(self, predictor, data: Any, kind: str, engine: Any = None) -> None:
        if kind not in IMAGE_KINDS:
            raise ValueError(f"unknown image kind {kind!r}")
        self.engine = engine
        self.predictor = EnginePredictor(engine) if engine is not None else predictor
        self.data = data
        self.kind = kind
        self.shape = tuple(int(s) for s in np.shape(data))
        self.n_slices = n_slices(self.shape, kind)
        self.plane_shape = plane_shape(self.shape, kind)
        self._cache: dict[int, Any] = {}
        self._crops: dict[tuple, Any] = {}  # (z, focus crop plan) -> embedding of that crop
        self._lock = threading.RLock()
        self._in_flight: dict[int, threading.Event] = {}  # slices being encoded now, by any thread
        self.computed = 0  # slices encoded now (by the model)
        self.from_disk = 0  # slices read from the disk cache

    # ---- slices ---------------------------------------------------------------------------------
    def slice_image(self, z: int) -> np.ndarray:
        z = int(z)
        if not 0 <= z < self.n_slices:
            raise ImageInputError(f"slice {z} is outside the image (0..{self.n_slices - 1})")
        arr = np.asarray(self.data[z]) if self.kind in ("volume", "rgb_volume") else np.asarray(self.data)
        if arr.ndim == 3 and arr.shape[-1] == 4:
            arr = arr[..., :3]
        return arr

    def has(self, z: int) -> bool:
        with self._lock:
            return int(z) in self._cache

    @property
    def n_ready(self) -> int:
        with self._lock:
            return len(self._cache)

    @property
    def complete(self) -> bool:
        return self.n_ready == self.n_slices

    @property
    def cache_dir(self):
        return getattr(self.engine, "cache_dir", None) if self.engine is not None else None

    def get(self, z: int):
        """The embedding of slice ``z`` (encoded now if needed: call from a worker). A slice that another thread
        is encoding (the background prefetch) is waited for, not encoded twice."""
        z = int(z)
        while True:
            with self._lock:
                if z in self._cache:
                    return self._cache[z]
                running = self._in_flight.get(z)
                if running is None:
                    self._in_flight[z] = threading.Event()
                    break
            running.wait()  # then take its result, or encode it here if that thread failed
        try:
            return self._encode(z)
        finally:
            with self._lock:
                self._in_flight.pop(z).set()

    def _encode(self, z: int):
        image = self.slice_image(z)
        if self.engine is not None:
            stats = self.engine.stats
            before_disk, before_computed = stats["from_disk"], stats["computed"]
            emb = self.engine.embed_image(image)
            self.from_disk += int(stats["from_disk"] > before_disk)
            self.computed += int(stats["computed"] > before_computed)
        else:
            emb = self.predictor.compute_embedding(image)
            self.computed += 1
        with self._lock:
            self._cache[z] = emb
        return emb

    def compute(
        self,
        slices: list[int] | None = None,
        progress: Callable[[int, int], None] | None = None,
        is_cancelled: Callable[[], bool] | None = None,
    ) -> int:
        """Embed the given slices (default: all), reporting ``progress(done, total)``; return how many."""
        todo = list(range(self.n_slices)) if slices is None else [int(z) for z in slices]
        total = len(todo)
        for i, z in enumerate(todo):
            if is_cancelled is not None and is_cancelled():
                raise Cancelled(f"cancelled after {i} of {total} slices (finished slices are kept)")
            self.get(z)
            if progress is not None:
                progress(i + 1, total)
        return total

    # ---- focus crops ----------------------------------------------------------------------------
    def has_crop(self, z: int, plan) -> bool:
        with self._lock:
            return (int(z), plan) in self._crops

    def crop(self, z: int, plan):
        """The embedding of ``plan.crop(slice z)`` (a :class:`..engine.focus_crop.CropPlan`; encoded now if needed:
        call from a worker), kept like the slices' own."""
        key = (int(z), plan)
        with self._lock:
            if key in self._crops:
                return self._crops[key]
        pixels = np.ascontiguousarray(plan.crop(self.slice_image(z)))
        emb = self.engine.embed_image(pixels) if self.engine is not None else self.predictor.compute_embedding(pixels)
        with self._lock:
            self._crops[key] = emb
        return emb

    def drop(self) -> None:
        with self._lock:
            self._cache.clear()
            self._crops.clear()
