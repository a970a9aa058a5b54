"""Clean / degraded training pairs with cached encoder features.

The image encoder (and the prompt encoder) are frozen, so everything the encoder computes for an image is a
constant of the training run. :class:`FeatureBank` computes, once, for every training plane:

- variant 0: the clean image,
- variants 1..V: degraded copies from the degradation library (``degrade_random`` = the PGE-SAM random
  composition of the plane's modality set, at a level drawn from ``levels``; seeded by the run seed, the
  plane's key and the variant index, so a resumed or repeated run sees the same images),

and stores the encoder outputs the decoder needs (the image embedding, the early features the robust decoder's
first AMFG consumes, and with the SVD-neck option the neck's input instead of its output) through the
embedding engine's zarr cache (:class:`napari_robustmedsam.engine.embeddings.EmbeddingEngine`). Epochs after
the first never run the encoder again, and a second run on the same data with the same encoder reuses the cache.

At every step a pair is (clean, variant): the degraded branch is a random degraded variant, or the clean image
itself with probability ``p_identity`` (the identity of RobustSAM's augmentation set, which keeps clean accuracy).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from napari_robustmedsam.degradations import degrade_random, modality_degradations
from napari_robustmedsam.engine.cache import EmbeddingStore, default_cache_dir
from napari_robustmedsam.engine.embeddings import EmbeddingCancelled, EmbeddingEngine, is_cancelled
from napari_robustmedsam.engine.preprocessing import LOW_RES_SIZE, ImageFrame, validate_image
from napari_robustmedsam.models.early_features import EarlyFeatureCapture
from napari_robustmedsam.models.intermediate_features import IntermediateFeatureCapture, has_intermediates
from napari_robustmedsam.prompting import derive_seed

from .data import TrainingError, TrainItem

ProgressFn = Callable[[int, int, str], None]


class TrainingEncoderView(nn.Module):
    """What the embedding engine runs for training: the frozen encoder's outputs the decoder needs.

    ``encode`` returns ``image_embeddings`` (B, 256, 64, 64), ``early_features`` (B, 64, 64, C) and, with
    ``neck_input=True``, ``neck_input`` (the encoder's features before its neck, for SVD neck adaptation).
    It shares the segmenter's modules (nothing is copied); it is not a robust model, so cache signatures depend
    on the encoder weights only, and the training cache directory is separate from the annotator's.
    """

    is_robust = False

    def __init__(self, segmenter: nn.Module, neck_input: bool = False, intermediates: bool = False) -> None:
        super().__init__()
        self.image_encoder = segmenter.image_encoder
        self.architecture = segmenter.architecture
        self.want_neck_input = neck_input
        self.want_intermediates = intermediates  # the PGE enhancer's multi-scale encoder features

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        captured: dict[str, torch.Tensor] = {}
        handle = None
        if self.want_neck_input:
            def pre_hook(module, args):
                captured["neck_input"] = args[0].detach()

            handle = self.image_encoder.neck.register_forward_pre_hook(pre_hook)
        inter = None
        try:
            with EarlyFeatureCapture(self.image_encoder) as cap:
                if self.want_intermediates:
                    with IntermediateFeatureCapture(self.image_encoder) as inter:
                        embeddings = self.image_encoder(images)
                else:
                    embeddings = self.image_encoder(images)
        finally:
            if handle is not None:
                handle.remove()
        out = {"image_embeddings": embeddings, "early_features": cap.features}
        if inter is not None:
            out.update(inter.features)
        if self.want_neck_input:
            out["neck_input"] = captured["neck_input"]
        return out


def default_training_cache_dir() -> Path:
    return default_cache_dir().parent / "training-features"


def mask_to_model_lowres(mask: np.ndarray, frame: ImageFrame) -> torch.Tensor:
    """(H, W) bool at the original size -> (256, 256) bool in the decoder's low-resolution frame."""
    m = torch.as_tensor(np.asarray(mask, dtype=np.float32))[None, None]
    m = F.interpolate(m, frame.input_size, mode="bilinear", align_corners=False)
    m = F.pad(m, (0, frame.model_size - frame.input_size[1], 0, frame.model_size - frame.input_size[0]))
    if frame.model_size != LOW_RES_SIZE:
        m = F.interpolate(m, (LOW_RES_SIZE, LOW_RES_SIZE), mode="bilinear", align_corners=False)
    return m[0, 0] > 0.5


def valid_region(frame: ImageFrame) -> torch.Tensor:
    """(256, 256) bool: the low-resolution pixels covering the image (not the padding)."""
    return mask_to_model_lowres(np.ones(frame.original_size, dtype=bool), frame)


@dataclass
class PlaneTargets:
    """Ground truth of one plane in the low-resolution model frame."""

    masks: torch.Tensor  # (n_obj, 256, 256) bool
    object_ids: list[int]
    valid: torch.Tensor  # (256, 256) bool
    frame: ImageFrame


@dataclass
class VariantInfo:
    level: str | None  # None = clean
    record: str = ""


@dataclass
class FeatureBank:
    """Encoder features of every (plane, variant), computed once and cached (see the module docstring)."""

    model: Any  # PromptableSegmenter
    preprocessing: str
    variants: int = 3
    levels: tuple[str, ...] = ("LQ-1", "LQ-2", "LQ-3", "LQ-3+")
    seed: int = 0
    cache_dir: str | os.PathLike | None = None
    use_cache: bool = True
    neck_input: bool = False
    intermediates: bool = False  # also the PGE enhancer's intermediate encoder features
    memory_bytes: int = 2 * 1024**3
    items: list[TrainItem] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.view = TrainingEncoderView(self.model, neck_input=self.neck_input,
                                        intermediates=self.intermediates).eval()
        cache_dir = Path(self.cache_dir) if self.cache_dir is not None else default_training_cache_dir()
        if self.neck_input:
            cache_dir = cache_dir / "with-neck-input"
        if self.intermediates:  # entries with more content: their own folder, never mixed with the others
            cache_dir = cache_dir / "with-intermediates"
        self.engine = EmbeddingEngine(self.view, self.preprocessing, cache_dir=cache_dir, use_cache=self.use_cache,
                                      tile_threshold=None, memory_entries=0)
        self._sigs: dict[tuple[int, int], Any] = {}
        self._ram: OrderedDict[tuple[int, int], dict[str, torch.Tensor]] = OrderedDict()
        self._ram_bytes = 0
        self._frames: dict[int, ImageFrame] = {}
        self.targets: dict[int, PlaneTargets] = {}
        self.variant_info: dict[tuple[int, int], VariantInfo] = {}
        self.stats = {"encoded": 0, "from_cache": 0}

    # ---- degradation --------------------------------------------------------------------------------
    def _levels_for(self, modality: str) -> list[str]:
        try:
            has_domain = bool(modality_degradations(modality)["domain"])
        except Exception:  # noqa: BLE001 - unknown modality: the generic set
            has_domain = False
        levels = [lv for lv in self.levels if lv != "LQ-3+" or has_domain]
        return levels or ["LQ-3"]

    def variant_image(self, item: TrainItem, v: int) -> tuple[np.ndarray, VariantInfo]:
        if v == 0:
            return item.image, VariantInfo(None)
        rng = np.random.default_rng(derive_seed(self.seed, "variant-level", item.key, v))
        levels = self._levels_for(item.modality)
        level = levels[int(rng.integers(len(levels)))]
        modality = item.modality if item.modality else "generic"
        try:
            out, record = degrade_random(item.image, level, modality, derive_seed(self.seed, "variant", item.key, v))
        except Exception:  # noqa: BLE001 - a modality the library does not know: its general set
            out, record = degrade_random(item.image, level.replace("+", ""), "generic",
                                         derive_seed(self.seed, "variant", item.key, v))
        return out, VariantInfo(level, "+".join(str(r.get("name")) for r in record))

    # ---- preparation ----------------------------------------------------------------------------------
    def add_items(self, items: list[TrainItem]) -> list[int]:
        start = len(self.items)
        self.items.extend(items)
        return list(range(start, len(self.items)))

    def prepare(self, indices: list[int] | None = None, *, variants: int | None = None,
                progress: ProgressFn | None = None, cancel: Any = None, shard: tuple[int, int] = (0, 1),
                compute: bool = True) -> None:
        """Embed (or find in the cache) every variant of the given planes.

        ``shard=(rank, world)``: this process computes only every world-th (plane, variant) job; call again
        with ``shard=(0, 1)`` (after a barrier) to register the others from the cache.
        """
        indices = list(range(len(self.items))) if indices is None else list(indices)
        n_var = self.variants if variants is None else variants
        jobs = [(i, v) for i in indices for v in range(n_var + 1)]
        rank, world = shard
        mine = jobs[rank::world]
        for done, (i, v) in enumerate(mine):
            if is_cancelled(cancel):
                raise EmbeddingCancelled(f"cancelled while preparing features ({done} of {len(mine)} done)")
            if (i, v) in self._sigs or (i, v) in self._ram:
                continue
            item = self.items[i]
            image, info = self.variant_image(item, v)
            self.variant_info[(i, v)] = info
            before = self.engine.stats["computed"]
            emb = self.engine.embed_image(image)
            if self.engine.stats["computed"] > before:
                self.stats["encoded"] += 1
            else:
                self.stats["from_cache"] += 1
            features = {k: t.detach().to("cpu") for k, t in emb.features.items()}
            if "early_features" not in features:
                raise TrainingError("the training feature cache holds entries without early features; clear it")
            if self.intermediates:
                if not has_intermediates(features):
                    raise TrainingError("the training feature cache holds entries without the enhancer's "
                                        "intermediate features; clear it (or give another --cache)")
            self._frames[i] = emb.frame
            self._keep(i, v, features, image)
            if progress is not None:
                progress(done + 1, len(mine), f"features {item.key} ({'clean' if v == 0 else info.level})")
        for i in indices:
            if i not in self.targets and i in self._frames:
                self._make_targets(i)

    def _keep(self, i: int, v: int, features: dict[str, torch.Tensor], image: np.ndarray) -> None:
        size = sum(t.numel() * t.element_size() for t in features.values())
        if self.engine.cache is not None:
            self._sigs[(i, v)] = self.engine.signature(validate_image(image))
        if self.engine.cache is None or self._ram_bytes + size <= self.memory_bytes:
            self._ram[(i, v)] = features
            self._ram_bytes += size

    def _make_targets(self, i: int) -> None:
        item = self.items[i]
        frame = self._frames[i]
        masks = torch.stack([mask_to_model_lowres(item.labels == oid, frame) for oid in item.object_ids])
        keep = masks.flatten(1).any(1)
        if not bool(keep.any()):  # objects so small that they vanish at 256 px: keep them at least 1 px
            keep[:] = True
        self.targets[i] = PlaneTargets(masks[keep], [o for o, k in zip(item.object_ids, keep.tolist()) if k],
                                       valid_region(frame), frame)

    # ---- access -----------------------------------------------------------------------------------------
    def get(self, i: int, v: int) -> dict[str, torch.Tensor]:
        """Features of plane ``i``, variant ``v`` (0 = clean): tensors with a leading batch axis of 1."""
        hit = self._ram.get((i, v))
        if hit is not None:
            return hit
        sig = self._sigs.get((i, v))
        if sig is None or self.engine.cache is None:
            raise KeyError(f"features of plane {i} variant {v} were not prepared")
        store = EmbeddingStore.open(self.engine.cache.path_for(sig), sig, 1)
        got = store.read(0)
        if got is None:  # deleted or corrupt since: recompute
            image, _ = self.variant_image(self.items[i], v)
            emb = self.engine.embed_image(image)
            return {k: t.detach().to("cpu") for k, t in emb.features.items()}
        return got[0]

    def register_from_cache(self, indices: list[int], variants: int | None = None) -> None:
        """After other ranks computed their share: find every (plane, variant) in the cache."""
        self.prepare(indices, variants=variants, shard=(0, 1))

    def batch(self, pairs: list[tuple[int, int]], device: torch.device) -> dict[str, torch.Tensor]:
        feats = [self.get(i, v) for i, v in pairs]
        return {k: torch.cat([f[k] for f in feats]).to(device) for k in feats[0]}


def sample_variant(rng: np.random.Generator, n_variants: int, p_identity: float) -> int:
    """0 (identity: the degraded branch sees the clean image) with probability p_identity, else 1..n."""
    if n_variants <= 0 or rng.random() < p_identity:
        return 0
    return int(rng.integers(1, n_variants + 1))
