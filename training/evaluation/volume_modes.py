"""The evaluation's volume modes: one tight box on an object's central labelled slice, then the annotator's
propagation (``propagate_3d``), and up to three more prompts as boxes (``propagate_3d_plus3``) or as the
corrections a user makes (``propagate_3d_correct3``). How to run them: docs/evaluation.md; the protocols and
figures: docs/results/propagation/.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch

from napari_robustmedsam.annotation.propagation import PropagationSettings, predictor_segment_fn, propagate_object
from napari_robustmedsam.engine.focus_crop import CropPlan, plan_crop
from napari_robustmedsam.metrics import segmentation_metrics
from napari_robustmedsam.prompting import corrective_click, rng_for, tight_box

from .dataset import GTObject
from .runner import (
    EXTRA_PROMPTS,
    PROPAGATE,
    PROPAGATE_CORRECT,
    PROPAGATE_PLUS,
    Condition,
    Embedder,
    EvalConfig,
    ModelHandle,
    RunStats,
    volume_key,
)
from .store import ResultStore


class _LazySliceEmbeddings:
    """``get(z)`` -> embedding of slice z, computed on first use (propagation visits only a few slices)."""

    def __init__(self, embedder: Embedder, handle: ModelHandle, volume: np.ndarray) -> None:
        self.embedder, self.handle, self.volume = embedder, handle, volume
        self._cache: dict[int, object] = {}

    def get(self, z: int):
        if z not in self._cache:
            self._cache[z] = self.embedder.embed(self.handle, self.volume[z])
        return self._cache[z]

    def crop(self, z: int, plan: CropPlan):
        """The embedding of ``plan.crop(slice z)`` (the focus crop)."""
        key = (z, plan)
        if key not in self._cache:
            self._cache[key] = self.embedder.embed(self.handle, np.ascontiguousarray(plan.crop(self.volume[z])))
        return self._cache[key]


def _volume_objects(labels: np.ndarray, key: str, cfg: EvalConfig) -> list[GTObject]:
    found = [GTObject(f"label{int(v)}", labels == v) for v in np.unique(labels) if v != 0]
    found = [o for o in found if o.size >= cfg.min_object_px]
    if cfg.max_objects is not None and len(found) > cfg.max_objects:
        idx = rng_for(cfg.seed, "objects", key).choice(len(found), size=cfg.max_objects, replace=False)
        found = [found[i] for i in sorted(idx)]
    return found


def _degrade_volume(cond: Condition, volume: np.ndarray, modality: str, key: str, seed: int) -> tuple[np.ndarray, str]:
    """Degrade a whole volume (the degradation library handles (Z, Y, X) gray volumes)."""
    return cond.apply(volume, modality, key, seed)


def _box_seed(handle: ModelHandle, embeddings, z: int, gt_slice: np.ndarray, focus=None):
    """The model's mask, low-res logits and score for the tight box of ``gt_slice`` (a user's box on slice ``z``);
    with the focus crop (``focus``, its settings) a small object is decoded in its crop and has no logits (they
    would be in another frame than the whole slice's, which propagation's logits modes expect)."""
    box = tight_box(gt_slice)
    plan = plan_crop(box, gt_slice.shape, focus)
    if plan is None:
        pred = handle.predictor.predict(boxes=box, embedding=embeddings.get(z))
        return pred.masks[0], pred.low_res_logits[:1], float(pred.scores[0])
    pred = handle.predictor.predict(boxes=plan.box_to_crop(box), embedding=embeddings.crop(z, plan))
    return plan.paste(pred.masks[0]), None, float(pred.scores[0])


def largest_error_slice(pred: np.ndarray, gt: np.ndarray, exclude: set[int]) -> int | None:
    """The slice (not in ``exclude``) with the most wrong voxels (false positives + false negatives), lowest z on
    ties; None when no such slice has an error."""
    errors = (pred ^ gt).reshape(pred.shape[0], -1).sum(axis=1)
    for z in exclude:
        errors[z] = 0
    z = int(np.argmax(errors))
    return z if errors[z] > 0 else None


def _central_box_propagation(handle: ModelHandle, embeddings, gt3d: np.ndarray, settings: PropagationSettings,
                             focus) -> tuple[int, float, tuple | None]:
    """The volume modes' first step: the tight box on the object's central labelled slice, then the annotator's
    propagation. Returns (the seed slice, the seed's score, (segment function, seeds, seed logits, propagation
    result)), the last None when the seed's mask is empty."""
    zs = np.nonzero(gt3d.reshape(gt3d.shape[0], -1).any(axis=1))[0]
    zc = int(zs[len(zs) // 2])
    mask, logits, score = _box_seed(handle, embeddings, zc, gt3d[zc], focus)
    if not mask.any():
        return zc, score, None
    seg = predictor_segment_fn(handle.predictor, embeddings, focus_crop=focus,
                               embed_crop=embeddings.crop if focus is not None else None)
    seeds, seed_logits = {zc: mask}, {zc: logits}
    result = propagate_object(seg, gt3d.shape[0], seeds, seed_logits=seed_logits, **settings.kwargs())
    return zc, score, (seg, seeds, seed_logits, result)


def _box_or_end(handle: ModelHandle, embeddings, gt3d: np.ndarray, z: int, seeds: dict, seed_logits: dict,
                focus) -> str:
    """A new seed on slice ``z``, as a user places one: the tight box where the object is ("box"), an empty slice,
    the annotator's "mark end", where it is not ("end")."""
    if gt3d[z].any():
        seeds[z], seed_logits[z], _ = _box_seed(handle, embeddings, z, gt3d[z], focus)
        return "box"
    seeds[z], seed_logits[z] = np.zeros_like(gt3d[z], dtype=bool), None
    return "end"


def propagate_masks(handle: ModelHandle, embeddings, gt3d: np.ndarray, extra_prompts: int = 0,
                    settings: PropagationSettings | None = None, focus=None) -> tuple[list[np.ndarray], float, int]:
    """Tight box on the object's central labelled slice, then the annotator's propagation; then up to
    ``extra_prompts`` more prompts, each on the slice with the largest error (a tight box where the object is, an
    empty slice, the annotator's "mark end", where it is not), re-propagating the stretches next to it as the
    annotator does. ``focus`` (FocusCrop settings, None: off): small objects' boxes, the seeds' and each propagated
    slice's, are decoded in their focus crop. Returns (the volume's mask after 0, 1, ... extra prompts, the seed's
    score, the seed slice)."""
    settings = settings or PropagationSettings()
    zc, score, started = _central_box_propagation(handle, embeddings, gt3d, settings, focus)
    if started is None:
        return [np.zeros_like(gt3d, dtype=bool)], score, zc
    seg, seeds, seed_logits, result = started
    steps = [result.masks.copy()]
    for _ in range(extra_prompts):
        z = largest_error_slice(steps[-1], gt3d, set(seeds))
        if z is None:
            break
        _box_or_end(handle, embeddings, gt3d, z, seeds, seed_logits, focus)
        result = propagate_object(seg, gt3d.shape[0], seeds, seed_logits=seed_logits, existing=steps[-1],
                                  changed_seeds=[z], **settings.kwargs())
        steps.append(result.masks.copy())
    return steps, score, zc


#: a logits frame that no crop plan equals: a slice's logits whose frame is not known are replaced by its mask
UNKNOWN_FRAME = object()


def correct_masks(handle: ModelHandle, embeddings, gt3d: np.ndarray, cfg: EvalConfig,
                  extra_prompts: int = EXTRA_PROMPTS, settings: PropagationSettings | None = None
                  ) -> tuple[list[np.ndarray], float, int, list[str]]:
    """``propagate_3d_correct3`` (docs/results/propagation/rule-corrections.md): the one-box propagation, then up
    to ``extra_prompts`` corrections as a user makes them, each on the slice with the most wrong voxels: a tight box
    where that slice shows no mask, "mark end" where it shows one but holds no object, else one corrective click
    (the centre of its largest error region) through the annotator's click path with ``cfg``'s click policy; the
    stretches next to it are re-propagated. Returns (the volume's mask after 0, 1, ... corrections, the seed's
    score, the seed slice, each correction's kind: "box", "end", "click+" or "click-")."""
    from napari_robustmedsam.annotation.prompt_decoding import segment_slice
    from napari_robustmedsam.annotation.session import SlicePrompts, mask_box

    settings = settings or PropagationSettings()
    focus = cfg.focus
    zc, score, started = _central_box_propagation(handle, embeddings, gt3d, settings, focus)
    if started is None:
        return [np.zeros_like(gt3d, dtype=bool)], score, zc, []
    seg, seeds, seed_logits, result = started
    # each slice's click state: prompts, logits and the crop they were decoded in (UNKNOWN_FRAME: not known)
    boxes = {zc: tight_box(gt3d[zc])}
    state: dict[int, tuple] = {}
    steps, kinds = [result.masks.copy()], []
    policy = cfg.click_policy.segment_kwargs()
    for _ in range(extra_prompts):
        current = steps[-1]
        z = largest_error_slice(current, gt3d, set())
        if z is None:
            break
        # a slice with the largest error and no mask holds the object: a box; one with a mask but no object: an end
        if not current[z].any() or not gt3d[z].any():
            kinds.append(_box_or_end(handle, embeddings, gt3d, z, seeds, seed_logits, focus))
            if kinds[-1] == "box":
                boxes[z] = tight_box(gt3d[z])
            state.pop(z, None)
        else:
            click = corrective_click(gt3d[z], current[z], "center")
            if z in state:  # clicked before: what segment_slice returned then
                prompts, prev_logits, crop = state[z]
            else:
                prompts = SlicePrompts(box=np.asarray(boxes.get(z, mask_box(current[z])), dtype=np.float64))
                if seed_logits.get(z) is not None:  # a box seed decoded on the whole slice
                    prev_logits, crop = seed_logits[z], None
                else:  # a propagated slice or a cropped seed: its mask becomes the mask prompt (segment_slice)
                    prev_logits, crop = torch.zeros((1, 1, 256, 256)), UNKNOWN_FRAME
            new = SlicePrompts(np.vstack([prompts.points, [[click.x, click.y]]]),
                               np.append(prompts.labels, int(click.label)), prompts.box)
            out = segment_slice(handle.predictor, embeddings.get(z), new, previous_prompts=prompts,
                                previous_logits=prev_logits, previous_mask=current[z].copy(), box_primary=True,
                                image=embeddings.volume[z], focus_crop=focus,
                                embed_crop=(lambda plan, z=z: embeddings.crop(z, plan)) if focus is not None else None,
                                previous_crop=crop, **policy)
            state[z] = (out.prompts, out.logits, out.crop)
            seeds[z] = out.mask
            seed_logits[z] = out.logits if out.crop is None else None
            kinds.append("click+" if click.label == 1 else "click-")
        result = propagate_object(seg, gt3d.shape[0], seeds, seed_logits=seed_logits, existing=current,
                                  changed_seeds=[z], **settings.kwargs())
        steps.append(result.masks.copy())
    return steps, score, zc, kinds


def propagate_rows(handle: ModelHandle, embeddings, gt3d: np.ndarray, obj_id: str, cfg: EvalConfig,
                   spacing: tuple[float, ...] | None, prompt: str = PROPAGATE) -> list[dict]:
    """One object: tight box on its central slice, then the annotator's propagation (and, for
    ``propagate_3d_plus3`` and ``propagate_3d_correct3``, up to 3 more prompts: one row per step); 3D metrics."""
    kinds: list[str] = []
    if prompt == PROPAGATE_CORRECT:
        steps, score, zc, kinds = correct_masks(handle, embeddings, gt3d, cfg)
    else:
        extra = EXTRA_PROMPTS if prompt == PROPAGATE_PLUS else 0
        steps, score, zc = propagate_masks(handle, embeddings, gt3d, extra, focus=cfg.focus)
    # distances in units of in-plane pixels (tolerance 2 px as in 2D), z scaled by its spacing ratio
    sp = None
    if spacing is not None:
        sp = (spacing[0] / spacing[1], 1.0, spacing[2] / spacing[1])
    rows = []
    for step, masks in enumerate(steps):
        row = segmentation_metrics(masks, gt3d, tolerance_px=cfg.tolerance_px, spacing=sp)
        # a correction's click label: 1 / 0 for a click, -1 for a box or a marked end (and the first propagation)
        kind = kinds[step - 1] if 0 < step <= len(kinds) else ""
        row.update(pred_px=int(masks.sum()), object_id=obj_id, object_px=int(gt3d.sum()), prompt=prompt, step=step,
                   n_points=step, click_label=1 if kind == "click+" else 0 if kind == "click-" else -1, score=score,
                   slice=zc)
        rows.append(row)
    return rows


def evaluate_volumes(
    models: list[ModelHandle],
    volumes: list,
    conditions: list[Condition],
    cfg: EvalConfig,
    store: ResultStore,
    run_id: str,
    embedder: Embedder | None = None,
    done: set[tuple] | None = None,
    on_unit: Callable[[int, bool], None] | None = None,
) -> RunStats:
    """The volume prompt modes (``propagate_3d``, ``propagate_3d_plus3``, ``propagate_3d_correct3``) on every object
    of every volume, per model and condition (whole-volume degradation)."""
    embedder = embedder or Embedder()
    done = store.done_keys() if done is None else done
    stats = RunStats()
    prompts = cfg.prompts_3d or (PROPAGATE,)
    model_cfg = {m.key: cfg.for_model(m) for m in models}
    protos = {m.key: {p: model_cfg[m.key].protocol(p) for p in prompts} for m in models}
    n_units = len(models) * len(conditions) * len(prompts)
    calls0, hits0, secs0 = embedder.encoder_calls, embedder.cache_hits, embedder.encoder_seconds
    for vol in volumes:
        key = volume_key(vol)
        todo = [(m, c, p) for c in conditions for m in models for p in prompts
                if (m.key, key, c.name, p, protos[m.key][p]) not in done]
        stats.units_total += n_units
        stats.units_skipped += n_units - len(todo)
        if on_unit and len(todo) < n_units:
            on_unit(n_units - len(todo), False)
        if not todo:
            continue
        image, labels = vol.load_volume()
        objects = _volume_objects(labels, key, cfg)
        for cond in conditions:
            pending = [(m, p) for m, c, p in todo if c is cond]
            if not pending:
                continue
            degraded, names = _degrade_volume(cond, image, vol.modality, key, cfg.seed)
            lazy: dict[str, _LazySliceEmbeddings] = {}
            for m, prompt in pending:
                embeddings = lazy.setdefault(m.key, _LazySliceEmbeddings(embedder, m, degraded))
                rows = [r for o in objects
                        for r in propagate_rows(m, embeddings, o.mask, o.object_id, model_cfg[m.key], vol.spacing,
                                                    prompt)]
                for r in rows:
                    r.update(model=m.label, model_key=m.key, dataset=vol.name, modality=vol.modality, sample=key,
                             image_id="3d", condition=cond.name, degradation=names, run_id=run_id,
                             protocol=protos[m.key][prompt])
                store.append(rows, [{"model_key": m.key, "sample": key, "condition": cond.name, "prompt": prompt,
                                     "protocol": protos[m.key][prompt], "objects": len(objects), "run_id": run_id,
                                     "time": round(time.time(), 1)}])
                stats.units_done += 1
                stats.rows += len(rows)
                if on_unit:
                    on_unit(1, True)
    stats.encoder_calls = embedder.encoder_calls - calls0
    stats.cache_hits = embedder.cache_hits - hits0
    stats.encoder_seconds = embedder.encoder_seconds - secs0
    return stats
