"""Prompt -> mask over a precomputed image embedding.

The image encoder runs once per image (:meth:`Predictor.compute_embedding`, or the embedding engine's
cache); every click only runs the prompt encoder and the mask decoder. Prompts are in original pixel
coordinates, (x, y) order, as napari and the CLI give them; masks come back at the original resolution
together with the low-resolution logits to feed into the next corrective step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ImageInputError, NonFiniteError, PromptError
from .click_guard import EdgeReach, guard_clicks
from .decode_limits import DEFAULT_DECODE_CHUNK, FULL_RES_BUDGET_BYTES
from .local_correction import merge_local_correction
from .preprocessing import LOW_RES_SIZE, ImageFrame, preprocess
from .prompt_checks import as_prompt_array, check_prompts


@dataclass
class ImageEmbedding:
    """Everything a decoder needs from one 2D image: encoder output plus image-level robust features."""

    features: dict[str, torch.Tensor]
    frame: ImageFrame

    @property
    def image_embeddings(self) -> torch.Tensor:
        return self.features["image_embeddings"]

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> "ImageEmbedding":
        moved = {k: v.to(device=device, dtype=dtype if v.is_floating_point() and dtype else v.dtype) for k, v in self.features.items()}
        return ImageEmbedding(moved, self.frame)


@dataclass
class Prediction:
    """Result for N objects: masks (N, H, W) bool, chosen IoU scores (N,), low-res logits (N, 1, 256, 256)."""

    masks: np.ndarray
    scores: np.ndarray
    low_res_logits: torch.Tensor
    all_scores: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))  # (N, C) before choosing
    # (N,) True where the model's mask was empty and the base model's mask (its empty-mask fallback) was used
    fell_back: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    # (N,) True where, for a box alone, the base model scored its own mask higher and it was shown (the box check,
    # ``PromptableSegmenter.set_box_check``)
    base_preferred: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))


def require_finite(tensors: dict[str, torch.Tensor] | torch.Tensor, what: str) -> None:
    """Raise :class:`NonFiniteError` naming ``what`` (and the feature) when a tensor holds NaN/inf values.

    Non-finite values enter through weights (a corrupt or diverged checkpoint, a fine-tuned decoder swapped in),
    a half-precision overflow, or a cache written by an older version; unchecked they give an empty mask with a
    NaN score and no error."""
    items = tensors.items() if isinstance(tensors, dict) else [("", tensors)]
    for name, t in items:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            label = f"{what} ({name})" if name else what
            raise NonFiniteError(
                f"NaN/inf values in the {label} ({bad} of {t.numel()}): the model's weights are broken or its "
                "precision overflowed; reload or re-export the model, or run it in float32"
            )


def _mask_batch(mask_input) -> torch.Tensor:
    """Previous logits as a tensor with a batch axis ((1, 256, 256) -> (1, 1, 256, 256)); a tensor stays the
    same storage, so a mask prepared ahead (``prepare_mask_prompt``) is recognised by ``predict``."""
    mask = torch.as_tensor(mask_input)
    return mask[None] if mask.ndim == 3 else mask


def logits_to_original(frame: ImageFrame, low_res_logits: torch.Tensor) -> torch.Tensor:
    """Same result as :meth:`ImageFrame.logits_to_original`, without the needless work.

    The reference upsamples the (N, C, 256, 256) logits to the model size, crops the unpadded area and
    resizes that to the original size. Bilinear resizing with ``align_corners=False`` by an exact factor
    computes every output pixel from at most the two neighbouring input pixels at fixed positions, so
    (1) a same-size "resize" (LiteMedSAM: 256 -> 256) is the identity and is skipped, and (2) for the
    1024 px models only the low-resolution rows/columns that the crop needs (plus one) are upsampled,
    with the same scale factor. Both give bit-identical values to the reference.
    """
    x = _cropped_logits(frame, low_res_logits)
    if x is None:
        return frame.logits_to_original(low_res_logits)
    if tuple(x.shape[-2:]) == tuple(frame.original_size):
        return x
    return F.interpolate(x, frame.original_size, mode="bilinear", align_corners=False)


def _cropped_logits(frame: ImageFrame, low_res_logits: torch.Tensor) -> torch.Tensor | None:
    """The logits at the model's input scale, cropped to the unpadded image (``None``: the model size is not a
    multiple of the logits grid, only the reference path applies)."""
    x = low_res_logits.float()
    low_h, low_w = x.shape[-2:]
    size = frame.model_size
    in_h, in_w = frame.input_size
    if (low_h, low_w) != (size, size):
        if size % low_h or size % low_w:
            return None
        fy, fx = size // low_h, size // low_w
        rows = min(low_h, -(-in_h // fy) + 1)
        cols = min(low_w, -(-in_w // fx) + 1)
        x = F.interpolate(x[..., :rows, :cols], (rows * fy, cols * fx), mode="bilinear", align_corners=False)
    return x[..., :in_h, :in_w]


def masks_at_original(frame: ImageFrame, low_res_logits: torch.Tensor, budget_bytes: int | None = None) -> np.ndarray:
    """(N, 1, 256, 256) logits -> (N, H, W) boolean masks at the original size, the same as
    ``logits_to_original(frame, logits)[:, 0] > 0`` but holding at most about ``budget_bytes`` of float32 at the
    original resolution, whatever N and the image size.

    Objects are converted a few at a time. When one object alone exceeds the budget (a very large image), its
    bilinear resize is done as two passes, across the columns then down column bands. PyTorch's bilinear kernel
    computes ``wy0 * (wx0 * a + wx1 * b) + wy1 * (...)``, and a pass whose size does not change uses weights 1
    and 0, so the two passes give the very values of the one-pass resize.
    """
    budget_bytes = FULL_RES_BUDGET_BYTES if budget_bytes is None else int(budget_bytes)
    n = low_res_logits.shape[0]
    h, w = frame.original_size
    per_object = 4 * h * w
    if n * per_object <= budget_bytes:
        return (logits_to_original(frame, low_res_logits)[:, 0] > 0).cpu().numpy()
    out = np.empty((n, h, w), dtype=bool)
    step = max(1, budget_bytes // per_object)
    for start in range(0, n, step):
        part = low_res_logits[start:start + step]
        cropped = None if per_object <= budget_bytes else _cropped_logits(frame, part[:, :1])
        if cropped is None:
            out[start:start + step] = (logits_to_original(frame, part)[:, 0] > 0).cpu().numpy()
            continue
        if cropped.shape[-1] != w:
            cropped = F.interpolate(cropped, (cropped.shape[-2], w), mode="bilinear", align_corners=False)
        cols = max(1, budget_bytes // (4 * h))
        for c0 in range(0, w, cols):
            band = cropped[..., c0:c0 + cols]
            if band.shape[-2] != h:
                band = F.interpolate(band, (h, band.shape[-1]), mode="bilinear", align_corners=False)
            out[start, :, c0:c0 + band.shape[-1]] = (band[0, 0] > 0).cpu().numpy()
    return out


def guarded_counts(guard_new_clicks, n_objects: int, n_points: int) -> list[int]:
    """``guard_new_clicks`` (an int, or one int/None per object) as one count per object, checked against the
    number of points each object has."""
    if isinstance(guard_new_clicks, (int, np.integer)):
        counts = [int(guard_new_clicks)] * n_objects
    else:
        counts = [0 if c is None else int(c) for c in guard_new_clicks]
        if len(counts) != n_objects:
            raise PromptError(f"guard_new_clicks has {len(counts)} entries for {n_objects} objects")
    bad = [c for c in counts if not 0 <= c <= n_points]
    if bad:
        raise PromptError(f"guard_new_clicks asks for {bad[0]} new clicks but an object has {n_points} points")
    return counts


def clicks_per_object(local_clicks, n_objects: int) -> list[np.ndarray | None]:
    """``local_clicks`` as one (K, 2) array (or None) per object: a (K, 2) array or list is the one object's
    clicks, (N, K, 2) or a list of N entries (ragged, or None for "take the whole new mask") one per object."""
    try:
        arr = np.asarray(local_clicks, dtype=np.float64)
    except (TypeError, ValueError):  # ragged or with None entries
        arr = None
    if arr is not None and arr.ndim == 2 and n_objects == 1:
        per_object = [arr]
    elif arr is not None and arr.ndim == 3:
        per_object = list(arr)
    else:
        per_object = list(local_clicks)
    if len(per_object) != n_objects:
        raise PromptError(f"local_clicks has {len(per_object)} entries for {n_objects} objects")
    return [None if pts is None or np.size(pts) == 0 else as_prompt_array(pts, 2, "local_clicks").reshape(-1, 2)
            for pts in per_object]


@dataclass
class ObjectPrompts:
    """One call's prompts, checked, with a leading object axis (see :func:`object_prompts`)."""

    points: np.ndarray | None  # (N, P, 2)
    labels: np.ndarray | None  # (N, P)
    boxes: np.ndarray | None  # (N, 4)
    mask_input: torch.Tensor | None  # (N, 1, 256, 256)
    n_objects: int
    clicks: list[np.ndarray | None] | None  # per object, with a mask input only
    guard_counts: list[int] | None  # per object, with a mask input and points only

    @property
    def ambiguous(self) -> bool:
        """One object with a single point and nothing else: three candidate masks are asked for."""
        return (self.n_objects == 1 and self.points is not None and self.points.shape[1] == 1 and self.boxes is None
                and self.mask_input is None)


def object_prompts(points, point_labels, boxes, mask_input, image_size: tuple[int, int], local_clicks=None,
                   guard_new_clicks=None) -> ObjectPrompts:
    """The checks of :meth:`Predictor.predict` (and :meth:`.tiling.TiledPredictor.predict`) on the prompts of
    an image of ``image_size`` (H, W): points and boxes inside it, one box per point set, the previous logits
    low-resolution, finite and one per object, the corrective clicks and guarded counts one per object."""
    pts, labels, bxs = check_prompts(points, point_labels, boxes, image_size=image_size, allow_empty=True)
    if pts is None and bxs is None and mask_input is None:
        raise PromptError("empty prompt: give at least one point, a box or a previous mask")
    n_objects = pts.shape[0] if pts is not None else (bxs.shape[0] if bxs is not None else 1)
    if mask_input is not None:
        mask_input = _mask_batch(mask_input)
        low = LOW_RES_SIZE
        if mask_input.shape[-2:] != (low, low):
            raise PromptError(f"mask_input must be low-resolution logits (N, 1, {low}, {low}), got {tuple(mask_input.shape)}")
        if mask_input.is_floating_point() and not bool(torch.isfinite(mask_input).all()):
            raise PromptError("mask_input (the previous logits) holds NaN/inf values: start again from a box or points")
        if pts is None and bxs is None:
            n_objects = mask_input.shape[0]
        elif mask_input.shape[0] != n_objects:
            raise PromptError(f"{mask_input.shape[0]} mask inputs for {n_objects} objects")
    clicks = None
    if local_clicks is not None and mask_input is not None:
        clicks = clicks_per_object(local_clicks, n_objects)
    counts = None
    if guard_new_clicks is not None and mask_input is not None and pts is not None:
        counts = guarded_counts(guard_new_clicks, n_objects, pts.shape[1])
    return ObjectPrompts(pts, labels, bxs, mask_input, n_objects, clicks, counts)


class Predictor:
    """Segment with any :class:`~napari_robustmedsam.models.segmenter.PromptableSegmenter`."""

    def __init__(self, model: torch.nn.Module, preprocessing: str, box_primary: bool = False,
                 decode_chunk: int = DEFAULT_DECODE_CHUNK) -> None:
        self.model = model.eval()
        self.preprocessing = preprocessing
        self.box_primary = box_primary
        self.decode_chunk = int(decode_chunk)  # objects per decoder call (memory stays flat in the prompt count)
        self.embedding: ImageEmbedding | None = None
        if self.device.type == "cpu":
            from .fast_cpu import configure_cpu_memory

            configure_cpu_memory()

    @classmethod
    def from_loaded(cls, loaded) -> "Predictor":
        """Build from a :class:`~napari_robustmedsam.checkpoints.LoadedModel`."""
        return cls(loaded.model, loaded.preprocessing, loaded.box_primary)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # ---- image side -------------------------------------------------------------------------
    @torch.no_grad()
    def compute_embedding(self, image: np.ndarray) -> ImageEmbedding:
        """Run the image encoder (and the robust decoder's image-level part) on one 2D image."""
        tensor, frame = preprocess(image, self.preprocessing)
        if tensor.shape[-1] != self.model.architecture.image_size:
            raise ImageInputError(
                f"preprocessing {self.preprocessing!r} gives {tensor.shape[-1]} px inputs but the encoder "
                f"expects {self.model.architecture.image_size} px: the checkpoint's preprocessing is wrong"
            )
        features = self.model.encode(tensor.to(self.device, self.dtype))
        require_finite(features, "image embedding")
        return ImageEmbedding(features, frame)

    def set_image(self, image: np.ndarray) -> ImageEmbedding:
        self.embedding = self.compute_embedding(image)
        return self.embedding

    def set_embedding(self, embedding: ImageEmbedding) -> None:
        self.embedding = embedding.to(self.device, self.dtype)
        require_finite(self.embedding.features, "image embedding")

    # ---- prompt side ------------------------------------------------------------------------
    def prepare_mask_prompt(self, mask_input: torch.Tensor, embedding: ImageEmbedding | None = None) -> None:
        """Precompute what a later :meth:`predict` with this ``mask_input`` (the previous low-resolution logits,
        the same tensor) needs for the mask prompt; that call then returns the same result, sooner. For idle
        time between clicks; a no-op for anything it cannot prepare."""
        emb = embedding if embedding is not None else self.embedding
        if emb is None or mask_input is None:
            return
        mask = _mask_batch(mask_input)
        if mask.shape[-2:] != (LOW_RES_SIZE, LOW_RES_SIZE):
            return
        prepare = getattr(self.model, "prepare_mask_prompt", None)
        if prepare is not None:
            with torch.no_grad():  # not inference mode: the cache keys read the tensors' version counters
                prepare(emb.features, mask.to(device=self.device, dtype=self.dtype))

    @torch.no_grad()
    def predict(
        self,
        points=None,
        point_labels=None,
        boxes=None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool | None = None,
        embedding: ImageEmbedding | None = None,
        local_clicks=None,
        guard_new_clicks=None,
        guard_edge_reach: float | EdgeReach | None = None,
    ) -> Prediction:
        """Segment N objects.

        points: (P, 2) for one object or (N, P, 2); point_labels: (P,) / (N, P), 1 positive, 0 negative
        (default all positive). boxes: (4,) or (N, 4) as (x0, y0, x1, y1). mask_input: previous
        low-resolution logits (N, 1, 256, 256). ``multimask_output=None`` asks for three candidate masks
        exactly when one object has a single point and nothing else (ambiguous prompt), and keeps the
        one with the highest predicted IoU. ``local_clicks`` (with ``mask_input``): the corrective clicks just added,
        (K, 2) for one object or one (K, 2) array (or None) per object; only the changes connected to them are
        kept, the rest of the previous mask stays (:mod:`.local_correction`). ``guard_new_clicks`` (with ``mask_input``
        and points): how many of each object's points, at the end, are new clicks (an int for all objects or one
        per object, 0/None for none); the change they make is kept only in their direction and within their reach
        (:mod:`.click_guard`), after the local merge; ``guard_edge_reach`` also bounds their reach by their
        distance to the previous mask's edge (a number: every click; an :class:`.click_guard.EdgeReach`: the clicks
        in its scope; :func:`.click_guard.allowed_changes`).
        """
        emb = embedding if embedding is not None else self.embedding
        if emb is None:
            raise PromptError("no image embedding: call set_image() or compute the embedding first")
        frame = emb.frame
        prompts = object_prompts(points, point_labels, boxes, mask_input, frame.original_size, local_clicks,
                                 guard_new_clicks)
        pts, labels, bxs, mask_input = prompts.points, prompts.labels, prompts.boxes, prompts.mask_input
        n_objects, clicks, counts = prompts.n_objects, prompts.clicks, prompts.guard_counts
        if multimask_output is None:
            multimask_output = prompts.ambiguous

        # The decoder's intermediates grow with the number of prompt sets (tens of MB each), so the objects are
        # decoded a bounded chunk at a time and each chunk's masks go straight into the boolean result.
        h, w = frame.original_size
        masks = np.empty((n_objects, h, w), dtype=bool)
        step = max(1, int(self.decode_chunk))
        low_parts, score_parts, all_parts, fell_back, preferred = [], [], [], [], []
        for start in range(0, n_objects, step):
            part = slice(start, min(n_objects, start + step))
            whole = part.stop - part.start == n_objects  # the caller's own tensors: a prepared mask stays recognised
            chosen, scores, iou, (fallback_used, base_preferred) = self._decode_part(
                emb,
                None if pts is None else pts[part],
                None if pts is None else labels[part],
                None if bxs is None else bxs[part],
                None if mask_input is None else (mask_input if whole else mask_input[part]),
                multimask_output,
                None if clicks is None else clicks[part],
                None if counts is None else counts[part],
                guard_edge_reach,
            )
            masks[part] = masks_at_original(frame, chosen)
            low_parts.append(chosen.float())
            score_parts.append(scores.float().cpu().numpy())
            all_parts.append(iou.float().cpu().numpy())
            fell_back.append(fallback_used)
            preferred.append(base_preferred)
        return Prediction(
            masks=masks,
            scores=np.concatenate(score_parts),
            low_res_logits=low_parts[0] if len(low_parts) == 1 else torch.cat(low_parts),
            all_scores=np.concatenate(all_parts),
            fell_back=np.concatenate(fell_back),
            base_preferred=np.concatenate(preferred),
        )

    def _decode_part(self, emb: ImageEmbedding, pts, labels, bxs, mask_input, multimask_output: bool, clicks, counts,
                     guard_edge_reach) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[np.ndarray, np.ndarray]]:
        """Decode one chunk of objects (prompts already checked): (chosen logits (n, 1, 256, 256), chosen scores
        (n,), every candidate's score (n, C), (which objects took the empty-mask fallback (n,), which the box
        check gave the base model's mask (n,))), after the local merge and the click guard."""
        frame = emb.frame
        device, dtype = self.device, self.dtype
        point_arg = None
        if pts is not None:
            coords = torch.as_tensor(frame.points_to_model(pts), dtype=dtype, device=device)
            point_arg = (coords, torch.as_tensor(labels, dtype=torch.int64, device=device))
        box_arg = None
        if bxs is not None:
            box_arg = torch.as_tensor(frame.boxes_to_model(bxs), dtype=dtype, device=device)
        mask_arg = mask_input.to(device=device, dtype=dtype) if mask_input is not None else None

        sparse, dense = self.model.embed_prompts(point_arg, box_arg, mask_arg)
        low_res, iou = self.model.decode(emb.features, sparse, dense, multimask_output, prompts=(point_arg, box_arg))
        require_finite(low_res, "mask logits")
        require_finite(iou, "predicted IoU scores")
        best = iou.argmax(dim=1)
        idx = torch.arange(low_res.shape[0], device=low_res.device)
        chosen = low_res[idx, best][:, None]
        scores = iou[idx, best]
        chosen, scores, base_used = self._base_model_answer(emb, chosen, scores, point_arg, box_arg, mask_arg,
                                                            multimask_output)
        grid = chosen.shape[-1] / frame.model_size  # model input pixels -> logits grid
        if clicks is not None and mask_arg is not None:
            chosen = merge_local_correction(
                mask_arg, chosen, [None if c is None else frame.points_to_model(c) * grid for c in clicks])
        if counts is not None and mask_arg is not None and pts is not None:
            entries = [None if not c else (frame.points_to_model(pts[i]) * grid, labels[i], c)
                       for i, c in enumerate(counts)]
            chosen = guard_clicks(mask_arg, chosen, entries, edge_reach=guard_edge_reach)
        return chosen, scores, iou, base_used

    def _base_model_answer(self, emb: ImageEmbedding, chosen, scores, point_arg, box_arg, mask_arg,
                           multimask_output: bool):
        """Where the model carries a base model (``PromptableSegmenter.attach_empty_mask_fallback``), show the base
        model's mask instead of the model's (1) where the model's is empty (no positive logit), and (2) with the box
        check on (``set_box_check``), for a box alone, where the base model's predicted IoU is higher than the
        model's by more than the margin. Returns (chosen, scores, (empty fallbacks (n,), box-check swaps (n,)))."""
        fallback = getattr(self.model, "empty_mask_fallback", None)
        n = chosen.shape[0]
        none = np.zeros(n, dtype=bool)
        if fallback is None:
            return chosen, scores, (none, none)
        empty = ~(chosen > 0).flatten(1).any(dim=1)
        margin = getattr(self.model, "box_check_margin", None)
        box_alone = margin is not None and box_arg is not None and point_arg is None and mask_arg is None
        asked = torch.ones_like(empty) if box_alone else empty
        if not bool(asked.any()):
            return chosen, scores, (none, none)
        rows = asked.nonzero().flatten()
        points = None if point_arg is None else (point_arg[0][rows], point_arg[1][rows])
        boxes = None if box_arg is None else box_arg[rows]
        masks = None if mask_arg is None else mask_arg[rows]
        sparse, dense = fallback.embed_prompts(points, boxes, masks)
        low_res, iou = fallback.decode(emb.features, sparse, dense, multimask_output)
        require_finite(low_res, "mask logits (the base model's)")
        best = iou.argmax(dim=1)
        idx = torch.arange(low_res.shape[0], device=low_res.device)
        base_scores = iou[idx, best].to(scores.dtype)
        preferred = torch.zeros_like(empty)
        if box_alone:
            preferred[rows] = (base_scores - scores[rows] > margin) & ~empty[rows]
        take = (empty[rows] | preferred[rows]).nonzero().flatten()
        chosen, scores = chosen.clone(), scores.clone()
        chosen[rows[take]] = low_res[idx[take], best[take]][:, None].to(chosen.dtype)
        scores[rows[take]] = base_scores[take]
        return chosen, scores, (empty.cpu().numpy(), preferred.cpu().numpy())
