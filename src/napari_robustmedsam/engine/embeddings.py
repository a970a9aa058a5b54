"""Embedding engine: compute image embeddings (and a robust decoder's image-level features) once, cache
them on disk, reuse them on every click and in every later session.

Usage::

    from napari_robustmedsam.checkpoints import load_model
    from napari_robustmedsam.engine.embeddings import EmbeddingEngine

    engine = EmbeddingEngine(load_model("litemedsam"))          # cache: $ROBUSTMEDSAM_CACHE_DIR/embeddings
    emb = engine.embed_image(image2d)                           # ImageEmbedding (or TiledEmbedding if large)
    prediction = engine.predictor.predict(boxes=[x0, y0, x1, y1], embedding=emb)

    volume = engine.volume(zyx_array)                           # lazy: volume[z] embeds slice z on demand
    volume.compute(progress=print_progress, cancel=event)       # or all slices up front
    series = engine.series("folder/of/images")                  # lazy per image, .compute() for all

Every 2D plane (an image, a slice of a volume, an image of a series) is its own cache entry, addressed by
its content (see :mod:`.signature`): re-opening the same data with the same model and settings reuses it,
whatever the file is called, and a slice embedded through a volume is found again by the annotator's
per-slice look-ups. Images whose longer side exceeds ``tile_threshold`` are embedded per tile (see
:mod:`.tiling`); predict on them with :class:`~.tiling.TiledPredictor` (``engine.tiled_predictor``).

Long computations report ``progress(done, total, message)`` per slice / tile / image and stop between
two of them when ``cancel`` is set (a ``threading.Event``, anything with ``is_set()``, or a callable
returning ``True``), raising :class:`EmbeddingCancelled`; slices finished before that are complete cache
entries, the one in flight is never written. :meth:`EmbeddingEngine.start` runs any of these in a
background thread (the napari widget's worker).

When the cache directory cannot be used (unwritable, full), the engine warns once with a
:class:`~napari_robustmedsam.errors.CacheError` message and keeps working in memory.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import warnings
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CacheError, ImageInputError, UserFacingError
from .cache import DEFAULT_STORAGE_DTYPE, STORAGE_DTYPES, EmbeddingCache, EmbeddingStore
from .fast_cpu import EncoderRunner
from .predictor import ImageEmbedding, Predictor, require_finite
from .preprocessing import frame_for, model_input_size, preprocess, validate_image
from .signature import Signature, image_fields, model_hashes
from .tiling import DEFAULT_HALO, DEFAULT_TILE_THRESHOLD, TiledEmbedding, TiledPredictor, Tile, needs_tiling, tile_layout

ProgressFn = Callable[[int, int, str], None]
log = logging.getLogger("napari_robustmedsam")

__all__ = [
    "EmbeddingCacheWarning",
    "EmbeddingCancelled",
    "EmbeddingEngine",
    "EmbeddingJob",
    "SeriesEmbeddings",
    "VolumeEmbeddings",
    "annotation_cache",
    "is_cancelled",
    "open_engine",
]


class EmbeddingCancelled(UserFacingError):
    """The user cancelled a precomputation; finished slices stay cached, nothing partial is served."""


class EmbeddingCacheWarning(UserWarning):
    """Something about the disk cache the user should know (fallback to memory, reused old version...)."""


def is_cancelled(cancel: Any) -> bool:
    if cancel is None:
        return False
    if hasattr(cancel, "is_set"):
        return bool(cancel.is_set())
    if callable(cancel):
        return bool(cancel())
    return bool(cancel)


def _plane_kind(arr: np.ndarray) -> str:
    if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (3, 4)):
        return "2d"
    if arr.ndim == 3 or (arr.ndim == 4 and arr.shape[-1] in (3, 4)):
        return "volume"
    raise ImageInputError(
        f"an array of shape {arr.shape} is neither a 2D image (H, W)/(H, W, 3) nor a volume (Z, H, W)/(Z, H, W, 3)"
    )


def _resolve_model(model: Any, preprocessing: str | None, box_primary: bool | None):
    """Accept a LoadedModel, a Predictor or a PromptableSegmenter."""
    sha = name = None
    if hasattr(model, "model") and hasattr(model, "preprocessing"):  # LoadedModel or Predictor
        preprocessing = preprocessing or model.preprocessing
        if box_primary is None:
            box_primary = getattr(model, "box_primary", False)
        sha = getattr(model, "sha256", None)
        name = getattr(model, "name", None)
        model = model.model
    if preprocessing is None:
        raise ValueError("give the preprocessing ('sam', 'medsam' or 'litemedsam') with a bare model")
    if not hasattr(model, "encode") or not hasattr(model, "architecture"):
        raise TypeError(f"expected a PromptableSegmenter, LoadedModel or Predictor, got {type(model).__name__}")
    return model, preprocessing, bool(box_primary), sha, name


class EmbeddingEngine:
    """Computes, caches and serves :class:`~.predictor.ImageEmbedding` objects for one model.

    Args:
        model: a ``LoadedModel`` (from :func:`napari_robustmedsam.checkpoints.load_model`), a
            :class:`~.predictor.Predictor`, or a ``PromptableSegmenter`` with ``preprocessing``.
        cache_dir: cache directory (default ``$ROBUSTMEDSAM_CACHE_DIR/embeddings`` or the user cache
            dir); ``use_cache=False`` keeps everything in memory.
        precision: ``"auto"`` (fp32 on CPU, fp16 autocast on CUDA), ``"fp32"``, ``"bf16"``, ``"fp16"``.
        cpu_fast: channels_last on the CPU; ``None`` (default): on for encoders with folded batch norms
            (LiteMedSAM), off for ViTs (see :mod:`.fast_cpu`); ``compile`` tries ``torch.compile``.
        storage_dtype: ``"float16"`` (default, zstd-compressed) or ``"float32"`` on disk. With a disk cache the
            embeddings served are the stored values (float16 rounded), so a slice gives the same mask whether it
            was just computed or read back (docs/results/encoder-speed/results.md has the effect on masks).
        tile_threshold / halo / tile_shape: tiling of large 2D images (``tile_threshold=None`` disables it).
        memory_entries: how many embeddings to keep in memory (LRU) when the disk cache works; without a
            disk cache every computed embedding is kept.
    """

    def __init__(
        self,
        model: Any,
        preprocessing: str | None = None,
        *,
        cache_dir: str | os.PathLike | None = None,
        use_cache: bool = True,
        precision: str = "auto",
        cpu_fast: bool | None = None,
        compile: bool = False,
        storage_dtype: str = DEFAULT_STORAGE_DTYPE,
        tile_threshold: int | None = DEFAULT_TILE_THRESHOLD,
        halo: int = DEFAULT_HALO,
        tile_shape: int | tuple[int, int] | None = None,
        memory_entries: int = 32,
        box_primary: bool | None = None,
    ) -> None:
        model, preprocessing, box_primary, sha, name = _resolve_model(model, preprocessing, box_primary)
        if storage_dtype not in STORAGE_DTYPES:
            raise UserFacingError(f"storage_dtype must be one of {', '.join(STORAGE_DTYPES)}, not {storage_dtype!r}")
        self.model = model
        self.preprocessing = preprocessing
        self.name = name
        self.checkpoint_sha256 = sha
        self.predictor = Predictor(model, preprocessing, box_primary=box_primary)
        self.tiled_predictor = TiledPredictor(self.predictor)
        self.runner = EncoderRunner(model, precision=precision, cpu_fast=cpu_fast, compile=compile)
        self.storage_dtype = storage_dtype
        self.tile_threshold = tile_threshold
        self.halo = int(halo)
        self.tile_shape = tile_shape
        self.memory_entries = int(memory_entries)
        self.notices: list[str] = list(self.runner.notices)
        self.stats: Counter = Counter()
        self.cache: EmbeddingCache | None = None
        self.cache_error: CacheError | None = None
        self._memory: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.RLock()
        self._warned: set[str] = set()
        self._disk_ok = True  # False after a write failed: no more disk access in this engine
        if use_cache:
            try:
                self.cache = EmbeddingCache(cache_dir)
            except CacheError as err:
                self._fallback(err)
        if model_input_size(preprocessing) != model.architecture.image_size:
            raise ImageInputError(
                f"preprocessing {preprocessing!r} gives {model_input_size(preprocessing)} px inputs but the encoder "
                f"expects {model.architecture.image_size} px: the checkpoint's preprocessing is wrong"
            )

    # ---- notices --------------------------------------------------------------------------------
    def _notice(self, message: str) -> None:
        self.notices.append(message)
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(message, EmbeddingCacheWarning, stacklevel=3)

    def _fallback(self, err: CacheError) -> None:
        self.cache = None
        self.cache_error = err
        self._disk_ok = False
        self._notice(str(err))

    @property
    def cache_dir(self) -> Path | None:
        return self.cache.directory if self.cache is not None else None

    @property
    def device(self) -> torch.device:
        return self.predictor.device

    @property
    def description(self) -> str:
        return self.runner.description

    # ---- signatures -----------------------------------------------------------------------------
    def signature(self, image: np.ndarray, tiles: list[Tile] | None = None, hashes: tuple | None = None) -> Signature:
        """Signature of one validated 2D image (tiled or not). ``hashes``: precomputed :func:`model_hashes`."""
        enc, dec = hashes if hashes is not None else model_hashes(self.model)
        return Signature(
            kind="tiled" if tiles else "image",
            **image_fields(image),
            encoder_hash=enc,
            decoder_hash=dec,
            architecture=self.model.architecture.name,
            preprocessing=self.preprocessing,
            model_size=int(self.model.architecture.image_size),
            precision=self.runner.precision,
            storage_dtype=self.storage_dtype,
            tile_shape=None if not tiles else tuple(int(v) for v in _max_inner(tiles)),
            halo=None if not tiles else (self.halo, self.halo),
            checkpoint_sha256=self.checkpoint_sha256,
            # a feature-enhancer model also stores the encoder's intermediate features (pge_feature_*)
            content="model+pge" if getattr(self.model, "feature_enhancer", None) is not None else "model",
        )

    def tiles_for(self, shape_hw: tuple[int, int]) -> list[Tile] | None:
        if not needs_tiling(shape_hw, self.tile_threshold):
            return None
        return tile_layout(shape_hw, self.tile_threshold, self.halo, self.tile_shape)

    # ---- low level ------------------------------------------------------------------------------
    def encode(self, image: np.ndarray, keep_early: bool = False) -> ImageEmbedding:
        """Run the encoder on one (untiled) 2D image, no cache involved.

        ``keep_early`` (robust decoders): the features also hold ``"early_features"`` for the encoder-level entry.
        """
        tensor, frame = preprocess(image, self.preprocessing)
        features = self.runner(tensor, keep_early=True) if keep_early else self.runner(tensor)
        require_finite(features, "image embedding")  # before anything is cached
        self.stats["computed"] += 1
        return ImageEmbedding(features, frame)

    def _deliver(self, emb: ImageEmbedding) -> ImageEmbedding:
        return emb.to(self.predictor.device, self.predictor.dtype)

    def _open_store(self, sig: Signature, n_entries: int, create: bool = True, store_path=None) -> EmbeddingStore | None:
        if not self._disk_ok or (self.cache is None and store_path is None):
            return None
        try:
            if store_path is not None:
                store = EmbeddingStore.open(Path(store_path), sig, n_entries)
            else:
                path = self.cache.path_for(sig)
                if not create and not path.exists():
                    return None
                store = self.cache.open_store(sig, n_entries)
        except CacheError as err:
            self._fallback(err)
            return None
        for message in store.notices:
            self._notice(message)
        store.notices.clear()
        return store

    def _open_encoder_store(self, sig: Signature, n_entries: int, store_path=None) -> EmbeddingStore | None:
        """For a robust decoder: the store of the encoder's own outputs (embedding + early features).

        Its signature has no decoder hash, so a fine-tuned decoder on the same encoder (the Fine-tune
        widget's hot swap, a fused checkpoint) finds it and only recomputes its image-level features.
        """
        if not self.model.is_robust or store_path is not None or getattr(self.model, "feature_enhancer", None) is not None:
            return None
        return self._open_store(dataclasses.replace(sig, decoder_hash=None, content="encoder"), n_entries)

    def _read(self, store: EmbeddingStore, index: int, expected_frame=None, expected_extra=None):
        corrupt_before = len(store.corrupt)
        got = store.read(index, expected_frame, expected_extra)
        self.stats["corrupt"] += len(store.corrupt) - corrupt_before
        for message in store.notices:
            self._notice(message)
        store.notices.clear()
        return got

    def _write(self, store: EmbeddingStore | None, index: int, features: dict, frame, extra) -> None:
        if store is None or not self._disk_ok:
            return
        try:
            store.write(index, features, frame, extra)
            self.stats["written"] += 1
        except CacheError as err:
            self._fallback(err)

    def _entry(
        self,
        store: EmbeddingStore | None,
        index: int,
        image_fn: Callable[[], np.ndarray],
        extra=None,
        encoder_store: EmbeddingStore | None = None,
        expected_frame=None,
    ) -> ImageEmbedding:
        if not self._disk_ok:
            store = encoder_store = None
        if store is not None:
            got = self._read(store, index, expected_frame, extra)
            if got is not None and self._complete(got[0]):
                features, frame, _ = got
                self.stats["from_disk"] += 1
                return ImageEmbedding(features, frame)
        if encoder_store is not None:
            got = self._read(encoder_store, index, expected_frame, extra)
            if got is not None and "early_features" in got[0]:
                enc, frame, _ = got
                dtype = next(self.model.parameters()).dtype
                emb_t = enc["image_embeddings"].to(self.model.device, dtype)
                image_level = self.model.image_features(emb_t, enc["early_features"].to(self.model.device, dtype))
                features = {"image_embeddings": enc["image_embeddings"]}
                features.update({k: v.float().cpu().contiguous() for k, v in image_level.items()})
                features = self._as_stored(features)
                self.stats["from_encoder_cache"] += 1
                self._write(store, index, features, frame, extra)
                return ImageEmbedding(features, frame)
        emb = self.encode(image_fn(), keep_early=encoder_store is not None)
        if store is not None or encoder_store is not None:
            emb = ImageEmbedding(self._as_stored(emb.features), emb.frame)
        if encoder_store is not None:
            early = emb.features.pop("early_features")
            self._write(encoder_store, index, {"image_embeddings": emb.image_embeddings, "early_features": early},
                        emb.frame, extra)
        self._write(store, index, emb.features, emb.frame, extra)
        return emb

    def _as_stored(self, features: dict) -> dict:
        """``features`` rounded to the storage dtype, as a cache read would give them, so that a slice gives the
        same mask fresh or reopened. Kept as they are when the rounding overflows (the write then refuses them,
        and the engine goes on in memory)."""
        if self.storage_dtype == "float32":
            return features
        dtype = getattr(torch, self.storage_dtype)
        rounded = {k: v.to(dtype).to(v.dtype) if v.is_floating_point() else v for k, v in features.items()}
        if not all(bool(torch.isfinite(v).all()) for v in rounded.values() if v.is_floating_point()):
            return features
        return rounded

    def _complete(self, features: dict) -> bool:
        """An entry holds everything this model reads (an old entry may lack the enhancer's features)."""
        if getattr(self.model, "feature_enhancer", None) is None:
            return True
        from ..models.intermediate_features import has_intermediates

        if has_intermediates(features):
            return True
        self._notice("cached embedding lacks the feature enhancer's intermediate features: recomputing it")
        return False

    def _remember(self, key: str, value: Any) -> None:
        self._memory[key] = value
        self._memory.move_to_end(key)
        if self.cache is not None:
            while len(self._memory) > max(self.memory_entries, 0):
                self._memory.popitem(last=False)

    def _recall(self, key: str) -> Any:
        value = self._memory.get(key)
        if value is not None:
            self._memory.move_to_end(key)
            self.stats["from_memory"] += 1
        return value

    # ---- 2D images ------------------------------------------------------------------------------
    def embed_image(
        self,
        image: np.ndarray,
        *,
        progress: ProgressFn | None = None,
        cancel: Any = None,
        store_path: str | os.PathLike | None = None,
    ) -> ImageEmbedding | TiledEmbedding:
        """Embedding of one 2D image (from memory, the disk cache, or computed now and cached).

        ``store_path``: use this zarr store instead of the content-addressed cache (its signature is
        checked; a mismatch replaces it). Large images give a :class:`~.tiling.TiledEmbedding`.
        """
        arr = validate_image(image)
        tiles = self.tiles_for(arr.shape[:2])
        sig = self.signature(arr, tiles)
        key = sig.key()
        with self._lock:
            hit = self._recall(key)
            if hit is not None:
                return hit
            n = len(tiles) if tiles else 1
            store = self._open_store(sig, n, store_path=store_path)
            encoder_store = self._open_encoder_store(sig, n, store_path=store_path)
            if not tiles:
                emb = self._deliver(self._entry(store, 0, lambda: arr, encoder_store=encoder_store,
                                                expected_frame=frame_for(arr.shape[:2], self.preprocessing)))
                if progress is not None:
                    progress(1, 1, "image embedded")
                self._remember(key, emb)
                return emb
            embeddings = []
            for i, tile in enumerate(tiles):
                if is_cancelled(cancel):
                    raise EmbeddingCancelled(f"cancelled after {i} of {n} tiles (finished tiles are cached)")
                y0, y1, x0, x1 = tile.outer
                embeddings.append(
                    self._deliver(self._entry(store, tile.index, lambda: arr[y0:y1, x0:x1], extra=tile.to_json(),
                                              encoder_store=encoder_store,
                                              expected_frame=frame_for(tile.outer_shape, self.preprocessing)))
                )
                if progress is not None:
                    progress(i + 1, n, f"tile {i + 1}/{n}")
            tiled = TiledEmbedding(tiles, embeddings, (int(arr.shape[0]), int(arr.shape[1])), self.halo)
            self._remember(key, tiled)
            return tiled

    def load_cached(self, image: np.ndarray) -> ImageEmbedding | None:
        """The cached embedding of an (untiled) 2D image from memory or disk, without computing; else None."""
        arr = validate_image(image)
        if self.tiles_for(arr.shape[:2]):
            return None
        sig = self.signature(arr)
        key = sig.key()
        with self._lock:
            hit = self._recall(key)
            if hit is not None:
                return hit
            store = self._open_store(sig, 1, create=False)
            if store is None:
                return None
            got = self._read(store, 0, frame_for(arr.shape[:2], self.preprocessing))
            if got is None:
                return None
            self.stats["from_disk"] += 1
            emb = self._deliver(ImageEmbedding(got[0], got[1]))
            self._remember(key, emb)
            return emb

    def store(self, image: np.ndarray, embedding: ImageEmbedding) -> bool:
        """Put an embedding computed elsewhere (e.g. ``Predictor.compute_embedding``, fp32) in the cache."""
        arr = validate_image(image)
        if self.tiles_for(arr.shape[:2]):
            return False
        sig = self.signature(arr)
        if tuple(embedding.frame.original_size) != tuple(arr.shape[:2]):
            raise ValueError("the embedding's frame does not match the image's size")
        with self._lock:
            self._remember(sig.key(), embedding)
            store = self._open_store(sig, 1)
            if store is None:
                return False
            try:
                store.write(0, embedding.features, embedding.frame)
                self.stats["written"] += 1
                return True
            except CacheError as err:
                self._fallback(err)
                return False

    def predict(self, embedding, **prompts):
        """Predict on an ImageEmbedding or a TiledEmbedding (prompts as in :meth:`Predictor.predict`)."""
        return self.tiled_predictor.predict(embedding=embedding, **prompts)

    # ---- volumes and series ---------------------------------------------------------------------
    def volume(self, volume: Any) -> "VolumeEmbeddings":
        """Lazy per-slice embeddings of a (Z, Y, X) or (Z, Y, X, 3) volume."""
        return VolumeEmbeddings(self, volume)

    def embed_volume(
        self, volume: Any, *, progress: ProgressFn | None = None, cancel: Any = None, slices: Sequence[int] | None = None
    ) -> "VolumeEmbeddings":
        vol = self.volume(volume)
        vol.compute(slices=slices, progress=progress, cancel=cancel)
        return vol

    def series(self, images: Any) -> "SeriesEmbeddings":
        """Lazy embeddings of an image series: a folder, a list of files, or a list of 2D arrays."""
        return SeriesEmbeddings(self, images)

    def embed_series(self, images: Any, *, progress: ProgressFn | None = None, cancel: Any = None) -> "SeriesEmbeddings":
        series = self.series(images)
        series.compute(progress=progress, cancel=cancel)
        return series

    def start(self, fn: Callable, *args, progress: ProgressFn | None = None, **kwargs) -> "EmbeddingJob":
        """Run ``fn(*args, progress=..., cancel=..., **kwargs)`` (e.g. ``engine.embed_volume``) in a thread."""
        return EmbeddingJob(fn, *args, progress=progress, **kwargs)

    def cache_size(self) -> int:
        return self.cache.size_bytes() if self.cache is not None else 0


def _max_inner(tiles: list[Tile]) -> tuple[int, int]:
    return (max(t.inner[1] - t.inner[0] for t in tiles), max(t.inner[3] - t.inner[2] for t in tiles))


class VolumeEmbeddings:
    """Per-slice embeddings of a volume; ``vol[z]`` gives slice z's embedding, computing it if needed."""

    def __init__(self, engine: EmbeddingEngine, volume: Any) -> None:
        shape = tuple(int(s) for s in np.shape(volume))
        if len(shape) == 0 or shape[0] == 0 or 0 in shape:
            raise ImageInputError(
                f"the volume has zero slices or an empty dimension (shape {shape}); nothing to embed"
            )
        if len(shape) not in (3, 4) or (len(shape) == 4 and shape[-1] not in (3, 4)):
            raise ImageInputError(f"a volume must be (Z, Y, X) or (Z, Y, X, 3); got shape {shape}")
        self.engine = engine
        self.data = volume
        self.shape = shape
        self._keys: dict[int, str] = {}

    def __len__(self) -> int:
        return self.shape[0]

    def slice_image(self, z: int) -> np.ndarray:
        z = int(z)
        if not -len(self) <= z < len(self):
            raise IndexError(f"slice {z} is outside the volume (0..{len(self) - 1})")
        return np.asarray(self.data[z % len(self)])

    def __getitem__(self, z: int) -> ImageEmbedding | TiledEmbedding:
        return self.engine.embed_image(self.slice_image(z))

    def get(self, z: int, progress: ProgressFn | None = None, cancel: Any = None):
        return self.engine.embed_image(self.slice_image(z), progress=progress, cancel=cancel)

    def is_cached(self, z: int, _hashes: tuple | None = None, verify: bool = False) -> bool:
        """True when slice z is in memory or complete on disk. Without ``verify`` only the completion markers
        are looked at (cheap, for display); with it every entry is read and checked in full as a later read
        would (checksums of the arrays and of the metadata, the frame this slice must have), and a corrupt one
        is deleted and counted in ``engine.stats["corrupt"]``, so that the slice is recomputed."""
        engine = self.engine
        arr = validate_image(self.slice_image(z))
        tiles = engine.tiles_for(arr.shape[:2])
        sig = engine.signature(arr, tiles, hashes=_hashes)
        if sig.key() in engine._memory:
            return True
        if engine.cache is None:
            return False
        path = engine.cache.path_for(sig)
        if not path.exists():
            return False
        store = EmbeddingStore(path, sig, len(tiles) if tiles else 1)
        if not verify:
            return all(store.has(i) for i in range(store.n_entries))
        if tiles:
            checks = [(t.index, frame_for(t.outer_shape, engine.preprocessing), t.to_json()) for t in tiles]
        else:
            checks = [(0, frame_for(arr.shape[:2], engine.preprocessing), None)]
        ok = True
        for index, frame, extra in checks:
            if not store.has(index):
                ok = False
                continue
            corrupt_before = len(store.corrupt)
            if not store.verify(index, frame, extra):
                ok = False
            engine.stats["corrupt"] += len(store.corrupt) - corrupt_before
        for message in store.notices:
            engine._notice(message)
        return ok

    def cached_slices(self) -> list[int]:
        hashes = model_hashes(self.engine.model)
        return [z for z in range(len(self)) if self.is_cached(z, hashes)]

    @property
    def complete(self) -> bool:
        hashes = model_hashes(self.engine.model)
        return all(self.is_cached(z, hashes) for z in range(len(self)))

    def compute(self, slices: Sequence[int] | None = None, progress: ProgressFn | None = None, cancel: Any = None) -> int:
        """Embed the given slices (default all) that are not cached yet; returns how many were computed.

        A cached slice is verified in full (read and checked, nothing kept in memory) and skipped; a corrupt
        one is deleted and recomputed (counted in ``engine.stats["corrupt"]``). Cancellation is checked
        before every slice.
        """
        todo = list(range(len(self))) if slices is None else [int(z) for z in slices]
        total = len(todo)
        computed_before = self.engine.stats["computed"]
        for i, z in enumerate(todo):
            if is_cancelled(cancel):
                raise EmbeddingCancelled(
                    f"cancelled after {i} of {total} slices (finished slices are cached; the rest is computed on demand)"
                )
            if self.is_cached(z, verify=True):
                self.engine.stats["already_cached"] += 1
            else:
                self.engine.embed_image(self.slice_image(z), cancel=cancel)
            if progress is not None:
                progress(i + 1, total, f"slice {z}")
        return self.engine.stats["computed"] - computed_before


class SeriesEmbeddings:
    """Embeddings of an image series (a folder or list of files, or a list of 2D arrays), lazily."""

    def __init__(self, engine: EmbeddingEngine, images: Any) -> None:
        from ..io.images import image_files

        if isinstance(images, (str, os.PathLike)):
            items: list[Any] = image_files(images)
        else:
            items = list(images)
            if not items:
                raise ImageInputError("the image series is empty")
        self.engine = engine
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def image(self, i: int) -> np.ndarray:
        item = self.items[i]
        if isinstance(item, (str, os.PathLike)):
            from ..io import read_image

            arr = read_image(item)
        else:
            arr = np.asarray(item)
        if _plane_kind(arr) != "2d":
            raise ImageInputError(f"series item {i} ({item if isinstance(item, (str, Path)) else 'array'}) is not 2D: shape {arr.shape}")
        return arr

    def name(self, i: int) -> str:
        item = self.items[i]
        return Path(item).name if isinstance(item, (str, os.PathLike)) else f"image {i}"

    def __getitem__(self, i: int):
        return self.engine.embed_image(self.image(i))

    def compute(self, progress: ProgressFn | None = None, cancel: Any = None) -> int:
        total = len(self)
        before = self.engine.stats["computed"]
        for i in range(total):
            if is_cancelled(cancel):
                raise EmbeddingCancelled(f"cancelled after {i} of {total} images (finished images are cached)")
            self.engine.embed_image(self.image(i), cancel=cancel)
            if progress is not None:
                progress(i + 1, total, self.name(i))
        return self.engine.stats["computed"] - before


class EmbeddingJob:
    """A background computation with progress and cancel, for GUIs (``engine.start(...)``)."""

    def __init__(self, fn: Callable, *args, progress: ProgressFn | None = None, **kwargs) -> None:
        self.cancel_event = threading.Event()
        self.progress_state: tuple[int, int, str] = (0, 0, "")
        self._progress_cb = progress
        self._result: Any = None
        self._error: BaseException | None = None

        def report(done: int, total: int, message: str = "") -> None:
            self.progress_state = (done, total, message)
            if self._progress_cb is not None:
                self._progress_cb(done, total, message)

        def run() -> None:
            try:
                self._result = fn(*args, progress=report, cancel=self.cancel_event, **kwargs)
            except BaseException as err:  # noqa: BLE001 - handed to the caller in result()
                self._error = err

        self._thread = threading.Thread(target=run, name="robustmedsam-embeddings", daemon=True)
        self._thread.start()

    def cancel(self) -> None:
        self.cancel_event.set()

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    @property
    def cancelled(self) -> bool:
        return isinstance(self._error, EmbeddingCancelled)

    def result(self, timeout: float | None = None) -> Any:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError("the embedding job is still running")
        if self._error is not None:
            raise self._error
        return self._result


def open_engine(loaded: Any, cache_dir: str | os.PathLike | None = None, *, notices: list[str] | None = None,
                label: str | None = None, **options: Any) -> EmbeddingEngine | None:
    """The one way the annotator, the launcher and the evaluation get an :class:`EmbeddingEngine` for a loaded model.

    ``options`` go to :class:`EmbeddingEngine`. When the engine cannot be built (e.g. its disk cache cannot be
    opened), the reason is logged as a warning and appended to ``notices`` (for the caller's status line or run
    record), and None is returned: embeddings are then computed directly, which gives the same numbers, only
    without the cache.
    """
    try:
        return EmbeddingEngine(loaded, cache_dir=cache_dir, **options)
    except Exception as err:  # noqa: BLE001 - reported below; the cache is an optimisation, never a failure
        name = label or getattr(loaded, "name", None) or "this model"
        message = f"embedding cache disabled for {name}: {err}"
        log.warning(message)
        if notices is not None:
            notices.append(message)
        return None


def annotation_cache(predictor: Any, cache_dir: str | None = None, model_key: str = "") -> EmbeddingEngine:
    """Factory used by :mod:`napari_robustmedsam.annotation.slice_embeddings` (``load_cached`` / ``store``)."""
    return EmbeddingEngine(predictor, cache_dir=cache_dir)
