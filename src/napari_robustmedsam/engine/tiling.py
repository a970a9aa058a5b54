"""Tiled embeddings for large 2D images, and prompt routing to the right tile.

An image whose longer side exceeds ``threshold`` (default 2048 px) is split into a grid of tiles. Each
tile owns an ``inner`` block (the blocks partition the image, balanced sizes) and is embedded over its
``outer`` region: the inner block grown by ``halo`` pixels on every side (clipped at the image border),
as micro_sam does. By default the outer region is at most ``threshold`` px, so every tile is embedded at
no more than the downscaling an untiled image of the threshold size gets.

Prompt routing (:class:`TiledPredictor`), per object:
1. the tiles whose outer region contains the whole prompt (box, and every point) are candidates; the one
   where the prompt sits farthest from the outer border (most context) is chosen;
2. otherwise (a prompt larger than a tile) the tile whose inner block holds the prompt's centre is used,
   the box is clipped to its outer region and points outside it are dropped (micro_sam's behaviour).
The mask is predicted in the tile's frame and pasted back at the original resolution over the tile's
outer region; the rest of the image is background. Objects routed to the same tile are decoded in one call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import PromptError
from .click_guard import EdgeReach
from .predictor import ImageEmbedding, ObjectPrompts, Prediction, Predictor, object_prompts
from .preprocessing import validate_image
from .prompt_checks import check_prompts
from .tile_layout import DEFAULT_HALO, DEFAULT_TILE_THRESHOLD, Tile, needs_tiling, tile_layout  # noqa: F401 - re-exported


@dataclass
class TiledEmbedding:
    """Per-tile embeddings of one large 2D image."""

    tiles: list[Tile]
    embeddings: list[ImageEmbedding]
    original_size: tuple[int, int]
    halo: int = DEFAULT_HALO
    notices: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.tiles)

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> "TiledEmbedding":
        return TiledEmbedding(self.tiles, [e.to(device, dtype) for e in self.embeddings], self.original_size, self.halo)


@dataclass
class TiledPrediction(Prediction):
    """A :class:`Prediction` over a tiled image; ``low_res_logits[i]`` is in the frame of ``tile_indices[i]``."""

    tile_indices: list[int] = field(default_factory=list)


def _prompt_extent(points: np.ndarray | None, box: np.ndarray | None) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) covering the box and every point of one object."""
    xs, ys = [], []
    if box is not None:
        xs += [box[0], box[2]]
        ys += [box[1], box[3]]
    if points is not None:
        xs += list(points[:, 0])
        ys += list(points[:, 1])
    return min(xs), min(ys), max(xs), max(ys)


def choose_tile(tiles: list[Tile], points: np.ndarray | None, box: np.ndarray | None, labels: np.ndarray | None = None) -> Tile:
    """The tile for one object's prompt (see the module docstring)."""
    x0, y0, x1, y1 = _prompt_extent(points, box)
    best, best_margin = None, -math.inf
    for tile in tiles:
        ty0, ty1, tx0, tx1 = tile.outer
        margin = min(x0 - tx0, y0 - ty0, tx1 - x1, ty1 - y1)
        if margin >= 0 and margin > best_margin:
            best, best_margin = tile, margin
    if best is not None:
        return best
    # Larger than any tile: the tile whose inner block holds the prompt's centre (the box's, else the
    # positive points' centre).
    if box is not None:
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    else:
        pos = points if labels is None or not (labels == 1).any() else points[labels == 1]
        cx, cy = float(pos[:, 0].mean()), float(pos[:, 1].mean())
    for tile in tiles:
        ty0, ty1, tx0, tx1 = tile.inner
        if ty0 <= cy < ty1 and tx0 <= cx < tx1:
            return tile
    # on the far border: nearest inner block
    return min(tiles, key=lambda t: (max(t.inner[0] - cy, 0, cy - t.inner[1] + 1) + max(t.inner[2] - cx, 0, cx - t.inner[3] + 1)))


def embedding_for_prompts(
    predictor: Predictor,
    image: np.ndarray,
    points=None,
    point_labels=None,
    boxes=None,
    threshold: int | None = DEFAULT_TILE_THRESHOLD,
    halo: int = DEFAULT_HALO,
) -> ImageEmbedding | TiledEmbedding:
    """What one segmentation of ``image`` with these prompts needs, for :meth:`TiledPredictor.predict`.

    An image up to ``threshold`` px is embedded whole. A larger one is never preprocessed whole (a float copy
    of it would be many times its size, and one 256 or 1024 px view of it too coarse): only the tiles the
    prompts are routed to are embedded, and the routing over them equals the routing over the full layout
    (each prompt's tile is among them, and no other tile of the layout could win)."""
    arr = validate_image(image)
    shape = (int(arr.shape[0]), int(arr.shape[1]))
    if not needs_tiling(shape, threshold):
        return predictor.compute_embedding(arr)
    pts, labels, bxs = check_prompts(points, point_labels, boxes, image_size=shape, allow_empty=True)
    n = pts.shape[0] if pts is not None else (bxs.shape[0] if bxs is not None else 0)
    if n == 0:
        raise PromptError("empty prompt: give at least one point or a box")
    layout = tile_layout(shape, threshold, halo)
    wanted = {
        choose_tile(layout, None if pts is None else pts[i], None if bxs is None else bxs[i],
                    None if labels is None else labels[i]).index
        for i in range(n)
    }
    tiles = [t for t in layout if t.index in wanted]
    embeddings = [predictor.compute_embedding(arr[t.outer[0]:t.outer[1], t.outer[2]:t.outer[3]]) for t in tiles]
    return TiledEmbedding(tiles, embeddings, shape, halo)


class TiledPredictor:
    """Same ``predict`` as :class:`Predictor`, accepting a :class:`TiledEmbedding` as well."""

    def __init__(self, predictor: Predictor) -> None:
        self.predictor = predictor
        self.embedding: TiledEmbedding | ImageEmbedding | None = None

    def set_embedding(self, embedding) -> None:
        if isinstance(embedding, TiledEmbedding):
            self.embedding = embedding.to(self.predictor.device, self.predictor.dtype)
        else:
            self.predictor.set_embedding(embedding)
            self.embedding = self.predictor.embedding

    def prepare_mask_prompt(self, mask_input, embedding=None) -> None:
        """:meth:`Predictor.prepare_mask_prompt` for a plain embedding; tiled ones are not prepared."""
        emb = embedding if embedding is not None else self.embedding
        if not isinstance(emb, TiledEmbedding):
            self.predictor.prepare_mask_prompt(mask_input, embedding=emb)

    def predict(self, points=None, point_labels=None, boxes=None, mask_input: torch.Tensor | None = None,
                multimask_output: bool | None = None, embedding=None, tile: int | None = None, local_clicks=None,
                guard_new_clicks=None, guard_edge_reach: float | EdgeReach | None = None) -> Prediction:
        """:meth:`Predictor.predict` (the same arguments, plus ``tile``) on a :class:`TiledEmbedding` as well.

        Segment N objects; prompts in full-image (x, y) pixels, checked as by :meth:`Predictor.predict`.
        ``tile`` forces one tile (e.g. to feed back ``mask_input`` logits of an earlier :class:`TiledPrediction`);
        ``local_clicks``, ``guard_new_clicks`` and ``guard_edge_reach`` as in :meth:`Predictor.predict`."""
        emb = embedding if embedding is not None else self.embedding
        if not isinstance(emb, TiledEmbedding):
            return self.predictor.predict(points, point_labels, boxes, mask_input, multimask_output, embedding=emb,
                                          local_clicks=local_clicks, guard_new_clicks=guard_new_clicks,
                                          guard_edge_reach=guard_edge_reach)
        if points is None and boxes is None and tile is None:
            raise PromptError("empty prompt: give at least one point or a box (mask_input alone needs tile=)")
        prompts = object_prompts(points, point_labels, boxes, mask_input, emb.original_size, local_clicks,
                                 guard_new_clicks)
        by_index = {t.index: t for t in emb.tiles}
        if tile is not None and tile not in by_index:
            raise PromptError(f"tile {tile} does not exist (0..{len(emb.tiles) - 1})")
        groups: dict[int, list[int]] = {}
        for i in range(prompts.n_objects):
            t = by_index[tile] if tile is not None else choose_tile(
                emb.tiles, *(None if v is None else v[i] for v in (prompts.points, prompts.boxes, prompts.labels)))
            groups.setdefault(t.index, []).append(i)
        if mask_input is not None and len(groups) > 1:
            raise PromptError("mask_input feeds back logits of one tile, but the prompts fall into several tiles")
        results = {}
        for t_index, objects in groups.items():
            t = by_index[t_index]
            sub = _prompts_in_tile(prompts, objects, t)
            if sub is None:
                continue  # nothing of this object's prompt lies in the tile
            pred = self.predictor.predict(multimask_output=multimask_output,
                                          embedding=emb.embeddings[emb.tiles.index(t)],
                                          guard_edge_reach=guard_edge_reach, **sub)
            results[t_index] = (objects, pred)
        return self._assemble(emb, prompts.n_objects, results)

    def _assemble(self, emb: TiledEmbedding, n: int, results: dict) -> TiledPrediction:
        """The tiles' predictions pasted into full-image masks; an object none of whose prompt lies in its tile
        keeps an empty mask, a zero score and background logits."""
        h, w = emb.original_size
        masks = np.zeros((n, h, w), dtype=bool)
        scores = np.zeros(n, dtype=np.float32)
        fell_back = np.zeros(n, dtype=bool)
        preferred = np.zeros(n, dtype=bool)
        low_res: list[torch.Tensor | None] = [None] * n
        all_scores: list[np.ndarray | None] = [None] * n
        tile_of = [0] * n
        by_index = {t.index: t for t in emb.tiles}
        for t_index, (objects, pred) in results.items():
            y0, y1, x0, x1 = by_index[t_index].outer
            for j, obj in enumerate(objects):
                masks[obj, y0:y1, x0:x1] = pred.masks[j]
                scores[obj] = pred.scores[j]
                fell_back[obj] = pred.fell_back.size > 0 and pred.fell_back[j]  # empty: not reported
                preferred[obj] = pred.base_preferred.size > 0 and pred.base_preferred[j]
                low_res[obj] = pred.low_res_logits[j]
                all_scores[obj] = pred.all_scores[j]
                tile_of[obj] = t_index
        side = self.predictor.model.architecture.image_size // 4
        low = torch.stack([lr if lr is not None else torch.full((1, side, side), -20.0) for lr in low_res])
        width = max((a.shape[0] for a in all_scores if a is not None), default=1)
        alls = np.stack([a if a is not None else np.zeros(width, np.float32) for a in all_scores])
        return TiledPrediction(masks=masks, scores=scores, low_res_logits=low, all_scores=alls, fell_back=fell_back,
                               base_preferred=preferred, tile_indices=tile_of)


def _prompts_in_tile(prompts: ObjectPrompts, objects: list[int], t: Tile) -> dict | None:
    """The prompts of ``objects`` in the frame of tile ``t`` (keyword arguments of :meth:`Predictor.predict`), or
    None when nothing of them lies in the tile. Only with a prompt larger than a tile: points outside it are
    dropped (one object) or clipped to it (several), and boxes are clipped to it."""
    ox, oy = t.offset
    th, tw = t.outer_shape
    sub_pts = sub_lbl = sub_box = None
    sub_guard = None if prompts.guard_counts is None else [prompts.guard_counts[o] for o in objects]
    if prompts.points is not None:
        sub_pts = prompts.points[objects] - np.array([ox, oy])
        sub_lbl = prompts.labels[objects]
        inside = (sub_pts[..., 0] >= 0) & (sub_pts[..., 1] >= 0) & (sub_pts[..., 0] <= tw) & (sub_pts[..., 1] <= th)
        if not inside.all():
            if len(objects) == 1:
                keep = inside[0]
                if sub_guard is not None and sub_guard[0]:  # the new clicks are the last points
                    sub_guard = [int(keep[keep.size - sub_guard[0]:].sum())]
                sub_pts, sub_lbl = (sub_pts[:, keep], sub_lbl[:, keep]) if keep.any() else (None, None)
            else:
                sub_pts = np.clip(sub_pts, 0, [tw, th])
    if prompts.boxes is not None:
        sub_box = np.clip(prompts.boxes[objects] - np.array([ox, oy, ox, oy]), 0, [tw, th, tw, th])
    if sub_pts is None and sub_box is None and prompts.mask_input is None:
        return None
    sub_local = None
    if prompts.clicks is not None:
        sub_local = [None if prompts.clicks[o] is None else prompts.clicks[o] - np.array([ox, oy]) for o in objects]
    return dict(points=sub_pts, point_labels=sub_lbl, boxes=sub_box, mask_input=prompts.mask_input,
                local_clicks=sub_local, guard_new_clicks=sub_guard if sub_pts is not None else None)
