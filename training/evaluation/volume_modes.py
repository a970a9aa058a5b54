"""The evaluation's volume modes: one tight box on an object's central labelled slice, then the annotator's
propagation (``propagate_3d``), and up to three more prompts as boxes (``propagate_3d_plus3``) or as the
corrections a user makes (``propagate_3d_correct3``). How to run them: docs/evaluation.md; the protocols and
figures: docs/results/propagation/.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

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


@dataclass(frozen=True)
class BoxSeed:
    """The model's answer to a user's box on one slice: the mask (full size), the low-res logits and the focus crop
    they were decoded in (None: the whole slice), and the model's score."""

    mask: np.ndarray
    logits: object
    crop: CropPlan | None
    score: float

    @property
    def whole_slice_logits(self):
        """The logits as propagation's mask prompt for the neighbours, which expects the whole slice's frame (None
        for a seed decoded in a crop: its neighbours get its mask instead, as in the annotator)."""
        return self.logits if self.crop is None else None


def _box_seed(handle: ModelHandle, embeddings, z: int, gt_slice: np.ndarray, focus=None) -> BoxSeed:
    """The model's answer to the tight box of ``gt_slice`` (a user's box on slice ``z``); with the focus crop
    (``focus``, its settings) a small object is decoded in its crop."""
    box = tight_box(gt_slice)
    plan = plan_crop(box, gt_slice.shape, focus)
    if plan is None:
        pred = handle.predictor.predict(boxes=box, embedding=embeddings.get(z))
        return BoxSeed(pred.masks[0], pred.low_res_logits[:1], None, float(pred.scores[0]))
    pred = handle.predictor.predict(boxes=plan.box_to_crop(box), embedding=embeddings.crop(z, plan))
    return BoxSeed(plan.paste(pred.masks[0]), pred.low_res_logits[:1], plan, float(pred.scores[0]))


def largest_error_slice(pred: np.ndarray, gt: np.ndarray, exclude: set[int]) -> int | None:
    """The slice (not in ``exclude``) with the most wrong voxels (false positives + false negatives), lowest z on
    ties; None when no such slice has an error."""
    errors = (pred ^ gt).reshape(pred.shape[0], -1).sum(axis=1)
    for z in exclude:
        errors[z] = 0
    z = int(np.argmax(errors))
    return z if errors[z] > 0 else None


def _central_box_propagation(handle: ModelHandle, embeddings, gt3d: np.ndarray, settings: PropagationSettings,
                             focus) -> tuple[int, BoxSeed, tuple | None]:
    """The volume modes' first step: the tight box on the object's central labelled slice, then the annotator's
    propagation. Returns (the seed slice, the seed, (segment function, seeds, seed logits, propagation result)),
    the last None when the seed's mask is empty."""
    zs = np.nonzero(gt3d.reshape(gt3d.shape[0], -1).any(axis=1))[0]
    zc = int(zs[len(zs) // 2])
    seed = _box_seed(handle, embeddings, zc, gt3d[zc], focus)
    if not seed.mask.any():
        return zc, seed, None
    seg = predictor_segment_fn(handle.predictor, embeddings, focus_crop=focus,
                               embed_crop=embeddings.crop if focus is not None else None)
    seeds, seed_logits = {zc: seed.mask}, {zc: seed.whole_slice_logits}
    result = propagate_object(seg, gt3d.shape[0], seeds, seed_logits=seed_logits, **settings.kwargs())
    return zc, seed, (seg, seeds, seed_logits, result)


def _box_or_end(handle: ModelHandle, embeddings, gt3d: np.ndarray, z: int, seeds: dict, seed_logits: dict,
                focus) -> BoxSeed | None:
    """A new seed on slice ``z``, as a user places one: the tight box where the object is (its BoxSeed), an empty
    slice, the annotator's "mark end", where it is not (None)."""
    if gt3d[z].any():
        seed = _box_seed(handle, embeddings, z, gt3d[z], focus)
        seeds[z], seed_logits[z] = seed.mask, seed.whole_slice_logits
        return seed
    seeds[z], seed_logits[z] = np.zeros_like(gt3d[z], dtype=bool), None
    return None


def propagate_masks(handle: ModelHandle, embeddings, gt3d: np.ndarray, extra_prompts: int = 0,
                    settings: PropagationSettings | None = None, focus=None) -> tuple[list[np.ndarray], float, int]:
    """Tight box on the object's central labelled slice, then the annotator's propagation; then up to
    ``extra_prompts`` more prompts, each on the slice with the largest error (a tight box where the object is, an
    empty slice, the annotator's "mark end", where it is not), re-propagating the stretches next to it as the
    annotator does. ``focus`` (FocusCrop settings, None: off): small objects' boxes, the seeds' and each propagated
    slice's, are decoded in their focus crop. Returns (the volume's mask after 0, 1, ... extra prompts, the seed's
    score, the seed slice)."""
    settings = settings or PropagationSettings()
    zc, seed, started = _central_box_propagation(handle, embeddings, gt3d, settings, focus)
    if started is None:
        return [np.zeros_like(gt3d, dtype=bool)], seed.score, zc
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
    return steps, seed.score, zc


@dataclass(frozen=True)
class ShownSlice:
    """What the annotator holds for one slice of the current object, where a corrective click there starts from:
    the slice's prompts, the logits behind its mask and the focus crop they were decoded in (None: the whole
    slice)."""

    prompts: object  # SlicePrompts
    logits: object
    crop: CropPlan | None


def note_propagation(shown: dict[int, ShownSlice], result, seeds: dict, crop_of) -> None:
    """Update ``shown`` after a propagation as the annotator's session is (``apply_propagation``): the seeds keep
    their state; a slice the propagation reached gets its mask's box (source "propagated"), its logits and their
    crop (``crop_of(logits)``), or loses its state where it came out empty; an earlier propagated slice the result
    leaves empty loses it too."""
    from napari_robustmedsam.annotation.session import SlicePrompts, mask_box

    for z in range(result.masks.shape[0]):
        if z in seeds:
            continue
        mask = result.masks[z]
        if z not in result.slices:  # a stretch the propagation did not run through
            if not mask.any() and z in shown and shown[z].prompts.source == "propagated":
                shown.pop(z)
            continue
        if mask.any():
            logits = result.logits.get(z)
            shown[z] = ShownSlice(SlicePrompts(box=mask_box(mask), source="propagated"), logits, crop_of(logits))
        else:
            shown.pop(z, None)


def correct_masks(handle: ModelHandle, embeddings, gt3d: np.ndarray, cfg: EvalConfig,
                  extra_prompts: int = EXTRA_PROMPTS, settings: PropagationSettings | None = None
                  ) -> tuple[list[np.ndarray], float, int, list[str]]:
    """``propagate_3d_correct3`` (docs/results/propagation/rule-corrections.md): the one-box propagation, then up
    to ``extra_prompts`` corrections as a user makes them, each on the slice with the most wrong voxels: a tight box
    where that slice shows no mask, "mark end" where it shows one but holds no object, else one corrective click
    (the centre of its largest error region) through the annotator's click path with ``cfg``'s click policy; the
    stretches next to it are re-propagated. A click starts from what the annotator holds for that slice (its
    prompts, logits and their crop: :class:`ShownSlice`). Returns (the volume's mask after 0, 1, ... corrections,
    the seed's score, the seed slice, each correction's kind: "box", "end", "click+" or "click-")."""
    from napari_robustmedsam.annotation.prompt_decoding import segment_slice
    from napari_robustmedsam.annotation.session import SlicePrompts

    settings = settings or PropagationSettings()
    focus = cfg.focus
    zc, seed, started = _central_box_propagation(handle, embeddings, gt3d, settings, focus)
    if started is None:
        return [np.zeros_like(gt3d, dtype=bool)], seed.score, zc, []
    seg, seeds, seed_logits, result = started
    shown = {zc: ShownSlice(SlicePrompts(box=tight_box(gt3d[zc])), seed.logits, seed.crop)}
    note_propagation(shown, result, seeds, seg.crop_of)
    steps, kinds = [result.masks.copy()], []
    policy = cfg.click_policy.segment_kwargs()
    for _ in range(extra_prompts):
        current = steps[-1]
        z = largest_error_slice(current, gt3d, set())
        if z is None:
            break
        # a slice with the largest error and no mask holds the object: a box; one with a mask but no object: an end
        if not current[z].any() or not gt3d[z].any():
            box_seed = _box_or_end(handle, embeddings, gt3d, z, seeds, seed_logits, focus)
            kinds.append("end" if box_seed is None else "box")
            if box_seed is None:
                shown.pop(z, None)
            else:
                shown[z] = ShownSlice(SlicePrompts(box=tight_box(gt3d[z])), box_seed.logits, box_seed.crop)
        else:
            click = corrective_click(gt3d[z], current[z], "center")
            before = shown.get(z)
            if before is None:
                raise RuntimeError(f"slice {z} shows a mask that no seed or propagation accounts for")
            new = before.prompts.with_point(click.x, click.y, click.label)
            out = segment_slice(handle.predictor, embeddings.get(z), new, previous_prompts=before.prompts,
                                previous_logits=before.logits, previous_mask=current[z].copy(), box_primary=True,
                                image=embeddings.volume[z], focus_crop=focus,
                                embed_crop=(lambda plan, z=z: embeddings.crop(z, plan)) if focus is not None else None,
                                previous_crop=before.crop, **policy)
            shown[z] = ShownSlice(out.prompts, out.logits, out.crop)
            seeds[z] = out.mask
            seed_logits[z] = out.logits if out.crop is None else None
            kinds.append("click+" if click.label == 1 else "click-")
        result = propagate_object(seg, gt3d.shape[0], seeds, seed_logits=seed_logits, existing=current,
                                  changed_seeds=[z], **settings.kwargs())
        note_propagation(shown, result, seeds, seg.crop_of)
        steps.append(result.masks.copy())
    return steps, seed.score, zc, kinds


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
