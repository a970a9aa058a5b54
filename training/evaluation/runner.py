"""The evaluation loop: models x images x conditions x prompt modes -> long-format measurements.

Order of work, per image: load it and its objects once; per condition, degrade it once (seeded, so every
model sees the same degraded pixels); per model, compute the image embedding once (or reuse the embedding
cache) and run every prompt mode on every object from that one embedding.

Seeds (:func:`napari_robustmedsam.prompting.derive_seed`) depend only on ``--seed`` and stable names:

- degraded image: ``(seed, "degrade", sample)`` for the random composition - the same draw for every level,
  so LQ-1..LQ-3 of one image use the same transform types (PGE-SAM's consistency) - and
  ``(seed, "degrade", sample, type)`` for a single type;
- initial prompts: ``(seed, sample, object, mode)``; they do not depend on the model nor on the condition, so
  every model sees the same prompts and clean and degraded numbers of an object are paired (only the image
  changes); ``iter_point`` starts from the ``points1`` point and ``iter_box`` from the ``box`` box, so their
  step 0 equals those modes;
- corrective clicks: deterministic given the prediction (``center`` strategy), or seeded by
  ``(seed, sample, object, mode, step)`` (``random`` / ``micro_sam`` strategies).

A unit (model, image, condition, prompt mode, protocol hash) is recorded as done only after its rows are on
disk; a rerun skips done units and computes no embedding for an image/condition whose units are all done.
The volume modes (``propagate_3d`` and its two follow-ups) are in :mod:`.volume_modes`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from napari_robustmedsam.annotation.prompt_decoding import (SliceResult, local_corrections_apply, segment_in_crop,
                                                            segment_slice)
from napari_robustmedsam.annotation.propagation import PropagationSettings
from napari_robustmedsam.annotation.session import SlicePrompts
from napari_robustmedsam.checkpoints import load_model
from napari_robustmedsam.degradations import LEVELS, degrade, degrade_random, list_degradations
from napari_robustmedsam.degradations.levels import normalize_level
from napari_robustmedsam.engine.click_guard import EdgeReach
from napari_robustmedsam.engine.click_refinement import RefinementSettings, as_refinement, refine_prediction
from napari_robustmedsam.engine.embeddings import open_engine
from napari_robustmedsam.engine.focus_crop import DEFAULT_FOCUS_CROP, CropPlan, plan_crop, plan_crop_for_points
from napari_robustmedsam.engine.predictor import Predictor
from napari_robustmedsam.metrics import segmentation_metrics
from napari_robustmedsam.prompting import (
    corrective_click,
    derive_seed,
    jittered_box,
    micro_sam_corrective_clicks,
    random_positive_points,
    rng_for,
    tight_box,
)

from .dataset import GTObject, Sample, select_objects
from .store import ResultStore

PROMPT_HELP = (
    "box (tight box), box_jitter (each side moved by up to --jitter x its length), points<K> (K random "
    "positive points, e.g. points1, points3, points5), iter_box / iter_point (a box or one point, then --steps "
    "corrective clicks with the previous logits fed back), iterative (= iter_box + iter_point), propagate_3d "
    "(volumes only: box on the object's central slice, then the annotator's 3D propagation; 3D metrics), "
    "propagate_3d_plus3 (then up to 3 more prompts, each a box on the unseeded slice with the largest error, "
    "re-propagating after each), propagate_3d_correct3 (then up to 3 corrections as a user makes them on the slice "
    "with the largest error: a box where it shows no mask, a corrective click through the click policy's path where "
    "it does; docs/results/propagation/rule-corrections.md)"
)
PROPAGATE = "propagate_3d"
PROPAGATE_PLUS = "propagate_3d_plus3"
PROPAGATE_CORRECT = "propagate_3d_correct3"
VOLUME_PROMPTS = (PROPAGATE, PROPAGATE_PLUS, PROPAGATE_CORRECT)
EXTRA_PROMPTS = 3  # propagate_3d_plus3 and propagate_3d_correct3: prompts added after the first propagation
_POINTS_RE = re.compile(r"^points(\d+)$")
#: the prompt modes that start from a box, the ones the focus crop acts on
FOCUS_CROP_PROMPTS = ("box", "box_jitter", "iter_box", *VOLUME_PROMPTS)


def parse_prompts(text: str | list[str]) -> tuple[str, ...]:
    """'box,points3,iterative' -> ('box', 'points3', 'iter_box', 'iter_point'); ValueError on unknown names."""
    items = text.split(",") if isinstance(text, str) else list(text)
    out: list[str] = []
    for raw in items:
        name = raw.strip().lower().replace("-", "_")
        if not name:
            continue
        if name == "points":
            name = "points3"
        expanded = ["iter_box", "iter_point"] if name == "iterative" else [name]
        for n in expanded:
            m = _POINTS_RE.match(n)
            if n in ("propagate", "3d", "propagate3d"):
                n = PROPAGATE
            if not (n in ("box", "box_jitter", "iter_box", "iter_point", *VOLUME_PROMPTS) or (m and int(m.group(1)) >= 1)):
                raise ValueError(f"unknown prompt mode {raw!r}; valid: {PROMPT_HELP}")
            if n not in out:
                out.append(n)
    if not out:
        raise ValueError(f"no prompt modes given; valid: {PROMPT_HELP}")
    return tuple(out)


#: the annotator's propagation defaults used by the propagate_3d modes (see annotation/propagation.py)
PROPAGATION_SETTINGS = {"seed_prompt": "tight box on the central slice", **PropagationSettings().kwargs()}


@dataclass(frozen=True)
class EvalConfig:
    prompts: tuple[str, ...] = ("box", "points3", "iter_box", "iter_point")
    steps: int = 5
    seed: int = 0
    objects: str = "label"
    min_object_px: int = 20
    max_objects: int | None = 3
    tolerance_px: float = 2.0
    click_strategy: str = "center"  # center | random | micro_sam
    jitter: float = 0.1
    feed_logits: bool = True
    # keep only the changes connected to each step's new clicks: "off", "with a box" (box starts only, the
    # annotator's default) or "always" (the annotator's modes; True/False mean always/off)
    local_corrections: str | bool = "off"
    # keep each click's change in its direction and within its reach (engine.click_guard): "off", "with a box",
    # "always" (the annotator's modes; True/False mean always/off)
    click_guard: str | bool = "off"
    click_guard_reach: float | None = None  # engine.click_guard.EdgeReach.factor
    click_guard_reach_scope: str = "all"  # engine.click_guard.EdgeReach.scope (REACH_SCOPES)
    # after the model, honour every click and re-decide its surroundings at full resolution
    # (engine.click_refinement): "off" or a method of REFINEMENT_METHODS, or settings
    click_refinement: str | RefinementSettings = "off"
    # decode a small object's box prompts in an enlarged crop of its surroundings (engine.focus_crop): box starts,
    # their clicks and the propagate_3d modes; point starts are never cropped
    focus_crop: bool = False
    # the crop came from the policy's default (no --focus-crop): each model then follows its own default, as the
    # annotator does when it is loaded (annotation.prompt_decoding.zoom_default)
    focus_crop_per_model: bool = False
    # with the focus crop on, point starts too (points<K>, iter_point): the points' mask on the whole image sizes
    # the crop, and the points are decoded again in it (engine.focus_crop.plan_crop_for_points)
    focus_points: bool = False
    # a point-only start is decoded twice, the second time with the first decode's logits as the mask prompt
    point_second_pass: bool = False
    # a box-trained model (LiteMedSAM, MedSAM) decodes a point start again with the box of its first mask and is sent
    # that box with the clicks, as the annotator does (annotation.prompt_decoding.segment_slice); on under --policy
    # annotator
    box_from_mask: bool = False
    # heads with a base model: the box check's setting for every model (runner.parse_box_check); None: each model's own
    box_check: float | str | None = None

    def for_model(self, handle) -> "EvalConfig":
        """The settings ``handle``'s model is measured with: the crop off for a model whose own default is off."""
        if self.focus_crop and self.focus_crop_per_model:
            from napari_robustmedsam.annotation.prompt_decoding import zoom_default

            if not zoom_default(getattr(handle.loaded, "name", None)):
                return replace(self, focus_crop=False)
        return self

    @property
    def focus(self):
        """The focus crop's settings, None when off."""
        return DEFAULT_FOCUS_CROP if self.focus_crop else None

    @property
    def focus_for_points(self):
        """The focus crop's settings for point starts, None when they are not cropped."""
        return DEFAULT_FOCUS_CROP if self.focus_crop and self.focus_points else None

    @property
    def refinement(self) -> RefinementSettings | None:
        """The click refinement's settings, None when off."""
        return as_refinement(self.click_refinement)

    @property
    def edge_reach(self) -> EdgeReach | None:
        """The guard's reach bound, None for none."""
        if self.click_guard_reach is None:
            return None
        return EdgeReach(self.click_guard_reach, self.click_guard_reach_scope)

    @property
    def click_policy(self):
        """These settings as an :class:`~napari_robustmedsam.annotation.click_policy.ClickPolicy` (its every setting
        is in :meth:`protocol`'s hash, so a run with ``--policy annotator`` and one with the same flags share it)."""
        from napari_robustmedsam.annotation.click_policy import ClickPolicy

        def mode(value):
            return value if isinstance(value, str) else ("always" if value else "off")

        method = self.refinement.word if self.refinement is not None else "off"
        return ClickPolicy(mode(self.local_corrections), mode(self.click_guard), self.edge_reach, method)

    def _applies(self, mode: str | bool, prompt: str) -> bool:
        """Whether an option in one of the annotator's modes acts on the corrective clicks of ``prompt`` (both options
        need the previous logits fed back)."""
        return prompt.startswith("iter_") and self.feed_logits and local_corrections_apply(mode, prompt == "iter_box")

    def guard_for(self, prompt: str) -> bool:
        """Whether the corrective clicks of ``prompt`` are guarded."""
        return self._applies(self.click_guard, prompt)

    def local_for(self, prompt: str) -> bool:
        """Whether the corrective clicks of ``prompt`` are kept local."""
        return self._applies(self.local_corrections, prompt)

    @property
    def prompts_2d(self) -> tuple[str, ...]:
        return tuple(p for p in self.prompts if p not in VOLUME_PROMPTS)

    @property
    def prompts_3d(self) -> tuple[str, ...]:
        return tuple(p for p in self.prompts if p in VOLUME_PROMPTS)

    def protocol(self, prompt: str) -> str:
        """Hash of every setting that changes the numbers of `prompt` (resuming requires a match)."""
        parts = {
            "v": 1,
            "prompt": prompt,
            "seed": self.seed,
            "objects": self.objects,
            "min_object_px": self.min_object_px,
            "max_objects": self.max_objects,
            "tolerance_px": self.tolerance_px,
        }
        if prompt == "box_jitter":
            parts["jitter"] = self.jitter
        if prompt.startswith("iter_"):
            parts.update(steps=self.steps, click_strategy=self.click_strategy, feed_logits=self.feed_logits)
            # every step through the annotator's segment_slice (earlier rows came from a batched copy of it, which
            # differed for a box-trained model's point start), so earlier rows are not resumed as these
            parts["click_path"] = "segment_slice"
            if self.box_from_mask and prompt == "iter_point":
                # "point start": the start is decoded again with the box around its first mask
                parts.update(box_from_mask=True, point_start="again with its mask's box")
            if self.local_for(prompt):  # absent when off, so earlier runs keep their protocol hash
                parts["local_corrections"] = True
            if self.guard_for(prompt):
                parts["click_guard"] = True
                if self.click_guard_reach is not None:
                    parts["click_guard_reach"] = self.click_guard_reach
                    if self.click_guard_reach_scope != "all":  # absent for every click, as before scopes existed
                        parts["click_guard_reach_scope"] = self.click_guard_reach_scope
            if self.refinement is not None:  # absent when off, so earlier runs keep their protocol hash
                parts["click_refinement"] = asdict(self.refinement)
        if prompt in VOLUME_PROMPTS:
            parts.update(propagation=PROPAGATION_SETTINGS)
        if prompt == PROPAGATE_PLUS:
            parts.update(extra_prompts=EXTRA_PROMPTS, extra_prompt_rule="largest error slice")
        if prompt == PROPAGATE_CORRECT:
            # "click start": a click starts from the logits the annotator holds for its slice (before, a propagated
            # slice's or a cropped seed's mask was the mask prompt), so earlier rows are not resumed as these
            parts.update(extra_prompts=EXTRA_PROMPTS, extra_prompt_rule="largest error slice, box or center click",
                         click_policy=self.click_policy.key, click_start="the annotator's logits")
            if self.refinement is not None:  # the refinement's own settings, as the iterative modes hash them
                parts["click_refinement"] = asdict(self.refinement)
        if self.focus_crop and prompt in FOCUS_CROP_PROMPTS:  # absent when off, so earlier runs keep their hash
            parts["focus_crop"] = asdict(DEFAULT_FOCUS_CROP)
        point_start = prompt == "iter_point" or bool(_POINTS_RE.match(prompt))
        if self.focus_for_points is not None and point_start:  # absent when off, as for the options above
            parts["focus_crop_points"] = asdict(DEFAULT_FOCUS_CROP)
        if self.point_second_pass and point_start:
            parts["point_second_pass"] = True
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:10]


# ---- conditions ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Condition:
    """clean, a PGE-SAM level of the random composition ('LQ-2'), or one type at a level ('jpeg@LQ-2')."""

    name: str
    level: str | None = None
    type_name: str | None = None  # None with a level: the random composition

    def apply(self, image: np.ndarray, modality: str, sample_key: str, seed: int) -> tuple[np.ndarray, str]:
        """(degraded image, '+'-joined names of the applied transforms)."""
        if self.level is None:
            return image, ""
        if self.type_name is None:
            out, record = degrade_random(image, self.level, modality, derive_seed(seed, "degrade", sample_key))
            return out, "+".join(str(r.get("name")) for r in record)
        type_seed = derive_seed(seed, "degrade", sample_key, self.type_name)
        out = degrade(image, self.type_name, level=self.level, seed=type_seed, modality=modality)
        return out, self.type_name


def parse_conditions(
    levels: str | list[str] | None, degradations: str | list[str] | None, clean: bool = True
) -> list[Condition]:
    """Conditions of a run. ``degradations`` lists 'random' (the PGE-SAM composition) and/or type names;
    each is evaluated at every level of ``levels``."""
    def _split(v):
        if v is None:
            return []
        return [s.strip() for s in (v.split(",") if isinstance(v, str) else v) if s.strip()]

    lv = [normalize_level(x) for x in _split(levels)] if levels is not None else list(LEVELS)
    types = _split(degradations) or ["random"]
    known = set(list_degradations())
    out = [Condition("clean")] if clean else []
    for t in types:
        key = t.lower().replace("-", "_")
        if key != "random" and key not in known:
            raise ValueError(f"unknown degradation {t!r}; valid: random, {', '.join(sorted(known))}")
        for level in lv:
            if key == "random":
                out.append(Condition(level, level, None))
            else:
                out.append(Condition(f"{key}@{level}", level, key))
    names = [c.name for c in out]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate conditions: {names}")
    if not out:
        raise ValueError("no conditions to evaluate (clean excluded and no levels)")
    return out


# ---- models ----------------------------------------------------------------------------------
@dataclass
class ModelHandle:
    label: str
    spec: str
    key: str
    loaded: object
    predictor: object

    def describe(self) -> dict:
        ld = self.loaded
        return {
            "label": self.label,
            "spec": self.spec,
            "key": self.key,
            "name": getattr(ld, "name", None),
            "sha256": getattr(ld, "sha256", None),
            "architecture": getattr(ld, "architecture", None),
            "decoder": getattr(ld, "decoder", None),
            "preprocessing": getattr(ld, "preprocessing", None),
            "box_primary": getattr(ld, "box_primary", None),
            "checkpoint": str(getattr(ld, "checkpoint_path", None)),
            "box_check": box_check_margin(self),
        }


def box_check_margin(handle: "ModelHandle") -> float | None:
    """The margin of the model's box check (``PromptableSegmenter.set_box_check``), None when off or absent."""
    return getattr(getattr(handle.loaded, "model", None), "box_check_margin", None)


def split_model_arg(arg: str) -> tuple[str | None, str]:
    """'label=spec' -> (label, spec); 'spec' -> (None, spec). A spec that is an existing path wins."""
    if "=" in arg and not Path(arg).exists():
        label, spec = arg.split("=", 1)
        if label and spec:
            return label, spec
    return None, arg


#: ``--box-check`` words: each model's own setting (None), off, or a margin ("higher" = 0)
BOX_CHECK_WORDS = {"own": None, "off": "off", "higher": 0.0}


def parse_box_check(word: str) -> float | str | None:
    """``--box-check``: 'own' (each model's registry setting), 'off', 'higher' (margin 0) or a margin >= 0."""
    if word in BOX_CHECK_WORDS:
        return BOX_CHECK_WORDS[word]
    try:
        margin = float(word.removeprefix("higher+"))
    except ValueError:
        raise ValueError(f"--box-check {word!r}: expected own, off, higher, higher+MARGIN or a margin >= 0") from None
    if not margin >= 0:
        raise ValueError(f"--box-check {word!r}: the margin must be >= 0")
    return margin


def load_model_handle(arg: str, device: str = "cpu", box_check: float | str | None = None) -> ModelHandle:
    """``box_check``: None keeps the model's own box check; "off" turns it off; a number sets its margin (only
    models that carry a base model have one). The model's key names an active box check, so measurements of the
    same weights with and without it are never mixed."""
    label, spec = split_model_arg(arg)
    loaded = load_model(spec, device=device, progress=False)
    model = getattr(loaded, "model", None)
    if box_check is not None and getattr(model, "empty_mask_fallback", None) is not None:
        model.set_box_check(None if box_check == "off" else float(box_check))
    sha = getattr(loaded, "sha256", None) or "nosha"
    label = label or getattr(loaded, "name", None) or Path(spec).stem
    handle = ModelHandle(label, spec, f"{label}:{sha[:12]}", loaded, Predictor.from_loaded(loaded))
    margin = box_check_margin(handle)
    return handle if margin is None else replace(handle, key=f"{handle.key}:box-check{margin:g}")


# ---- embeddings ------------------------------------------------------------------------------
class Embedder:
    """Image embeddings through the project's disk-cached :class:`EmbeddingEngine` when available (re-running
    an evaluation then never recomputes an embedding: clean and degraded images are cached by content and
    model hash), else computed directly with the predictor.

    Tiling is disabled (the protocol embeds every image whole, as the models' official inference does).
    Counts encoder runs (``encoder_calls``), their time, and cache hits, for the resume check and the run record.
    """

    def __init__(self, cache_dir: str | os.PathLike | None = None) -> None:
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.encoder_calls = 0
        self.cache_hits = 0
        self.encoder_seconds = 0.0
        self._engines: dict[str, object] = {}
        self.notices: list[str] = []

    def _engine(self, handle: ModelHandle):
        if self.cache_dir is None:
            return None
        if handle.key not in self._engines:
            # the protocol embeds every image whole (no tiles); a cache that cannot be opened is noted in the run
            # record and the embeddings are computed directly (the same numbers)
            self._engines[handle.key] = open_engine(handle.loaded, self.cache_dir / "embeddings", tile_threshold=None,
                                                    memory_entries=4, notices=self.notices, label=handle.label)
        return self._engines[handle.key]

    def embed(self, handle: ModelHandle, image: np.ndarray):
        engine = self._engine(handle)
        t0 = time.perf_counter()
        if engine is not None:
            before = engine.stats["computed"]
            emb = engine.embed_image(image)
            hit = engine.stats["computed"] == before
        else:
            emb, hit = handle.predictor.compute_embedding(image), False
        dt = time.perf_counter() - t0
        if hit:
            self.cache_hits += 1
        else:
            self.encoder_calls += 1
            self.encoder_seconds += dt
        return emb


# ---- one unit --------------------------------------------------------------------------------
def _metrics_row(gt: np.ndarray, mask: np.ndarray, tol: float) -> dict:
    m = segmentation_metrics(mask, gt, tolerance_px=tol)
    m["pred_px"] = int(mask.sum())
    return m


def run_prompt_mode(
    predictor, emb, objects: list[GTObject], prompt: str, sample_key: str, cfg: EvalConfig,
    image: np.ndarray | None = None, embed_crop: Callable[[CropPlan], object] | None = None,
) -> list[dict]:
    """Rows (without the unit's identity columns) of one prompt mode on all objects of one image (``image``: the
    pixels the model saw, needed by the click refinement; ``embed_crop(plan)``: the embedding of
    ``plan.crop(image)``, needed by the focus crop)."""
    if cfg.focus_crop and embed_crop is None:
        raise ValueError("the focus crop needs embed_crop")
    rows: list[dict] = []
    tol = cfg.tolerance_px
    if prompt in ("box", "box_jitter") or _POINTS_RE.match(prompt):
        if prompt == "box":
            boxes, pts = np.stack([tight_box(o.mask) for o in objects]), None
        elif prompt == "box_jitter":
            boxes = np.stack([jittered_box(o.mask, rng_for(cfg.seed, sample_key, o.object_id, prompt), cfg.jitter)
                              for o in objects])
            pts = None
        else:
            k = int(_POINTS_RE.match(prompt).group(1))
            boxes = None
            pts = np.stack([random_positive_points(o.mask, k, rng_for(cfg.seed, sample_key, o.object_id, prompt))
                            for o in objects])
        # one point alone is ambiguous: three candidate masks, the best-scored kept (SAM's protocol)
        multimask = pts is not None and pts.shape[1] == 1
        pred = predictor.predict(points=pts, boxes=boxes, multimask_output=multimask, embedding=emb)
        if pts is not None and cfg.point_second_pass:  # the decoder refines its own first guess
            pred = predictor.predict(points=pts, mask_input=pred.low_res_logits, multimask_output=False, embedding=emb)
        masks, scores = list(pred.masks), [float(v) for v in pred.scores]
        if boxes is not None and cfg.focus_crop:
            decode_small_boxes_in_crops(predictor, emb, boxes, masks, scores, cfg.focus, embed_crop)
        for i in range(len(objects) if pts is not None and cfg.focus_for_points is not None else 0):
            plan = plan_crop_for_points(masks[i], pts[i], emb.frame.original_size, cfg.focus_for_points)
            if plan is not None:
                crop_pred = predictor.predict(points=plan.points_to_crop(pts[i])[None], multimask_output=multimask,
                                              embedding=embed_crop(plan))
                if crop_pred.masks[0].any():  # an empty crop mask keeps the whole image's
                    masks[i], scores[i] = plan.paste(crop_pred.masks[0]), float(crop_pred.scores[0])
        for i, o in enumerate(objects):
            row = _metrics_row(o.mask, masks[i], tol)
            row.update(object_id=o.object_id, object_px=o.size, prompt=prompt, step=0,
                       n_points=0 if pts is None else pts.shape[1], click_label=-1, score=scores[i])
            rows.append(row)
        return rows
    if prompt in ("iter_box", "iter_point"):
        return _iterative(predictor, emb, objects, prompt, sample_key, cfg, image, embed_crop)
    raise ValueError(f"unknown prompt mode {prompt!r}")


def decode_small_boxes_in_crops(predictor, emb, boxes: np.ndarray, masks: list, scores: list, focus,
                                embed_crop: Callable[[CropPlan], object]) -> None:
    """Replace, in place, the whole-image mask and score of every box small enough for the focus crop (``focus``,
    its settings) with the box decoded in its crop, as the annotator's *Zoom on small objects* does."""
    for i in range(len(boxes)):
        plan = plan_crop(boxes[i], emb.frame.original_size, focus)
        if plan is not None:
            crop_pred = predictor.predict(boxes=plan.box_to_crop(boxes[i]), embedding=embed_crop(plan))
            masks[i], scores[i] = plan.paste(crop_pred.masks[0]), float(crop_pred.scores[0])


def _iterative(predictor, emb, objects: list[GTObject], prompt: str, sample_key: str, cfg: EvalConfig,
               image: np.ndarray | None = None, embed_crop: Callable[[CropPlan], object] | None = None) -> list[dict]:
    """Iterative correction of every object of an image. Each step of each object goes through the annotator's own
    :func:`~napari_robustmedsam.annotation.prompt_decoding.segment_slice`, from what the annotator holds for that
    object after the step before (the prompts it sent, the logits behind the mask shown and the crop they were
    decoded in: the session's state), with ``cfg``'s click policy and focus crop. So the figures of ``--policy
    annotator`` are the annotator's: with a box-trained model (``cfg.box_from_mask``), a point start is decoded
    again with the box of its first mask, and its clicks are sent with that box, as the annotator does."""
    refinement = cfg.refinement
    if refinement is not None and image is None:
        raise ValueError("the click refinement needs the image")
    policy = cfg.click_policy
    focus = cfg.focus if prompt == "iter_box" else None  # the annotator never zooms a point-only start
    crop_embeddings: dict[CropPlan, object] = {}

    def embed_once(plan: CropPlan):  # each crop is embedded once for all of its object's steps
        if plan not in crop_embeddings:
            crop_embeddings[plan] = embed_crop(plan)
        return crop_embeddings[plan]

    options = dict(
        box_primary=cfg.box_from_mask and bool(getattr(predictor, "box_primary", False)),
        use_previous_logits=cfg.feed_logits, local_corrections=policy.local_corrections,
        click_guard=policy.click_guard, click_guard_reach=cfg.edge_reach, click_refinement=refinement,
    )
    pixels = image if refinement is not None else None
    # what segment_slice reads of the whole image (segment_in_crop takes the crop's pixels itself)
    whole = dict(image=pixels, focus_crop=focus, embed_crop=embed_once if focus is not None else None)
    asked = [_start_prompts(o, prompt, sample_key, cfg) for o in objects]  # each object's prompts, as the user gave them
    # each object's state after its last step (a SliceResult: the mask shown, the prompts sent, logits, crop)
    if prompt == "iter_point" and (cfg.point_second_pass or cfg.focus_for_points is not None):
        shown = [_point_start_candidate(predictor, emb, a, cfg, image, embed_once) for a in asked]
    else:
        shown = [segment_slice(predictor, emb, a, **whole, **options) for a in asked]

    def decode_click(i: int) -> SliceResult:
        """Object i's prompts decoded after a click, from its state before (the annotator's ``segment_args``)."""
        before = shown[i]
        previous_mask = before.mask.copy() if before.mask.any() else None
        if before.crop is not None and asked[i].box is None and before.crop.contains_points(asked[i].points):
            # a point start zoomed by --focus-points: its clicks stay in its crop while they fall inside it
            return segment_in_crop(before.crop, embed_once(before.crop), predictor, asked[i], before.prompts,
                                   before.logits, previous_mask, before.crop, pixels, **options)
        return segment_slice(predictor, emb, asked[i], previous_prompts=before.prompts, previous_logits=before.logits,
                             previous_mask=previous_mask, previous_crop=before.crop, **whole, **options)

    rows: list[dict] = []

    def record(i: int, step: int, click_label: int, honoured: float | str = "") -> None:
        o = objects[i]
        row = _metrics_row(o.mask, shown[i].mask, cfg.tolerance_px)
        row.update(object_id=o.object_id, object_px=o.size, prompt=prompt, step=step,
                   n_points=asked[i].points.shape[0], click_label=click_label, click_honoured=honoured,
                   score=shown[i].score)
        rows.append(row)

    for i in range(len(objects)):
        record(i, 0, -1)
    for step in range(1, cfg.steps + 1):
        for i, o in enumerate(objects):
            mask = shown[i].mask
            if cfg.click_strategy == "micro_sam":
                new_pts, new_labels = micro_sam_corrective_clicks(
                    o.mask, mask, derive_seed(cfg.seed, sample_key, o.object_id, prompt, step))
                click_label = 2  # one positive and one negative
            else:
                click = corrective_click(o.mask, mask, cfg.click_strategy,
                                         rng_for(cfg.seed, sample_key, o.object_id, prompt, step))
                if click is None:  # nothing left to correct: the user would stop; the mask stays
                    record(i, step, -1)
                    continue
                new_pts, new_labels, click_label = [click.point], [click.label], click.label
            for (x, y), label in zip(new_pts, new_labels):
                asked[i] = asked[i].with_point(x, y, label)
            shown[i] = decode_click(i)
            n = len(new_labels)
            record(i, step, click_label, clicks_honoured(shown[i].mask, asked[i].points[-n:], asked[i].labels[-n:]))
    return rows


def _start_prompts(obj: GTObject, prompt: str, sample_key: str, cfg: EvalConfig) -> SlicePrompts:
    """An iterative mode's first prompt: the object's tight box, or the points1 mode's point (so that step 0 equals
    the box or points1 mode)."""
    if prompt == "iter_box":
        return SlicePrompts(box=tight_box(obj.mask))
    point = random_positive_points(obj.mask, 1, rng_for(cfg.seed, sample_key, obj.object_id, "points1"))
    return SlicePrompts(point, np.ones(1, np.int64))


def _point_start_candidate(predictor, emb, asked: SlicePrompts, cfg: EvalConfig, image, embed_crop) -> SliceResult:
    """A point start decoded with the candidates that were measured and not adopted (``--point-second-pass``: the
    points again with the first decode's logits as the mask prompt; ``--focus-points``: the points again in the
    crop their first mask sizes), then refined as the annotator refines a first point. Its clicks then go through
    the annotator's path: on the whole image, with the crop's mask as the mask prompt."""
    pts, labels = asked.points[None], asked.labels[None]
    pred = predictor.predict(points=pts, point_labels=labels, multimask_output=True, embedding=emb)
    if cfg.point_second_pass:  # the decoder refines its own first guess
        pred = predictor.predict(points=pts, point_labels=labels, mask_input=pred.low_res_logits,
                                 multimask_output=False, embedding=emb)
    frame_emb, plan = emb, None
    if cfg.focus_for_points is not None:
        plan = plan_crop_for_points(pred.masks[0], asked.points, emb.frame.original_size, cfg.focus_for_points)
        if plan is not None:
            crop_emb = embed_crop(plan)
            crop_pred = predictor.predict(points=plan.points_to_crop(asked.points)[None], point_labels=labels,
                                          multimask_output=True, embedding=crop_emb)
            if crop_pred.masks[0].any():  # an empty crop mask keeps the whole image's
                pred, frame_emb = crop_pred, crop_emb
            else:
                plan = None
    mask, logits = pred.masks[0], pred.low_res_logits[:1]
    refinement = cfg.refinement
    if refinement is not None:
        from napari_robustmedsam.engine.predictor import logits_to_original

        prior = (logits_to_original(frame_emb.frame, logits)[0, 0].cpu().numpy()
                 if refinement.method == "graph-cut" else None)
        in_frame = asked.points if plan is None else plan.points_to_crop(asked.points)
        pixels = image if plan is None else plan.crop(image)
        mask = refine_prediction(pixels, None, None, mask, in_frame, asked.labels, 1, refinement, prior)
    return SliceResult(mask=mask if plan is None else plan.paste(mask), logits=logits, score=float(pred.scores[0]),
                       used_previous_logits=False, prompts=asked, crop=plan)


def clicks_honoured(mask: np.ndarray, points, labels) -> float:
    """Share of the clicks (x, y) whose pixel the mask labels as the click asked: inside for a positive click,
    outside for a negative one. Why: a corrective click the next mask ignores is what users notice first."""
    h, w = mask.shape[:2]
    ok = [bool(mask[min(max(int(round(y)), 0), h - 1), min(max(int(round(x)), 0), w - 1)]) == bool(label)
          for (x, y), label in zip(points, labels)]
    return float(np.mean(ok)) if ok else float("nan")


# ---- the loop --------------------------------------------------------------------------------
@dataclass
class RunStats:
    units_total: int = 0
    units_skipped: int = 0
    units_done: int = 0
    rows: int = 0
    encoder_calls: int = 0
    cache_hits: int = 0
    encoder_seconds: float = 0.0
    stopped_early: bool = False
    failures: list[str] = field(default_factory=list)

    def add(self, other: "RunStats") -> None:
        for k in ("units_total", "units_skipped", "units_done", "rows", "encoder_calls", "cache_hits"):
            setattr(self, k, getattr(self, k) + getattr(other, k))
        self.encoder_seconds += other.encoder_seconds
        self.stopped_early = self.stopped_early or other.stopped_early
        self.failures.extend(other.failures)

    def to_dict(self) -> dict:
        return asdict(self)


def unit_keys(models: list[ModelHandle], samples: list[Sample], conditions: list[Condition], cfg: EvalConfig,
              volumes: list | None = None) -> set[tuple]:
    """Every unit key of the plan (for progress totals and the merge)."""
    keys = {
        (m.key, s.key, c.name, p, cfg.for_model(m).protocol(p))
        for m in models for s in samples for c in conditions for p in cfg.prompts_2d
    }
    keys |= {(m.key, volume_key(v), c.name, p, cfg.for_model(m).protocol(p))
             for m in models for v in volumes or [] for c in conditions for p in cfg.prompts_3d}
    return keys


def volume_key(volume) -> str:
    return f"{volume.name}/3d"


def evaluate_samples(
    models: list[ModelHandle],
    samples: list[Sample],
    conditions: list[Condition],
    cfg: EvalConfig,
    store: ResultStore,
    run_id: str,
    embedder: Embedder | None = None,
    done: set[tuple] | None = None,
    on_unit: Callable[[int, bool], None] | None = None,
    max_units: int | None = None,
) -> RunStats:
    """Run the plan over `samples`; skip done units; ``on_unit(n, computed)`` reports progress in
    (model, image, condition) groups: ``computed=False`` for groups skipped as already done.

    ``max_units``: stop after computing that many (model, image, condition) groups (an interruption on
    purpose, for tests and for chunked runs).

    Long on purpose: one loop over (image, condition, model) with its resume, stop and progress bookkeeping
    inline, so that the order of those checks, which makes a resumed run equal an uninterrupted one, is read in
    one place.
    """
    embedder = embedder or Embedder()
    done = store.done_keys() if done is None else done
    stats = RunStats()
    prompts_2d = cfg.prompts_2d
    model_cfg = {m.key: cfg.for_model(m) for m in models}
    protocols = {m.key: {p: model_cfg[m.key].protocol(p) for p in prompts_2d} for m in models}
    calls0, hits0, secs0 = embedder.encoder_calls, embedder.cache_hits, embedder.encoder_seconds
    computed = 0
    for sample in samples if prompts_2d else []:
        todo = {
            (m.key, c.name): [p for p in prompts_2d
                              if (m.key, sample.key, c.name, p, protocols[m.key][p]) not in done]
            for m in models for c in conditions
        }
        n_groups = len(models) * len(conditions)
        stats.units_total += n_groups * len(prompts_2d)
        skipped_groups = sum(1 for v in todo.values() if not v)
        stats.units_skipped += sum(len(prompts_2d) - len(v) for v in todo.values())
        if skipped_groups == n_groups:
            if on_unit:
                on_unit(n_groups, False)
            continue
        if skipped_groups and on_unit:
            on_unit(skipped_groups, False)
        try:
            image, labels = sample.load()
            objects = select_objects(labels, sample.key, cfg.seed, cfg.objects, cfg.min_object_px, cfg.max_objects)
        except Exception as err:  # unreadable file: report it, go on with the rest
            stats.failures.append(f"{sample.key}: {err}")
            if on_unit:
                on_unit(n_groups - skipped_groups, True)
            continue
        for cond in conditions:
            pending = [m for m in models if todo[(m.key, cond.name)]]
            if not pending:
                continue
            if max_units is not None and computed >= max_units:
                stats.stopped_early = True
                break
            degraded, deg_names = cond.apply(image, sample.modality, sample.key, cfg.seed)
            for m in pending:
                if max_units is not None and computed >= max_units:
                    stats.stopped_early = True
                    break
                prompts = todo[(m.key, cond.name)]
                rows: list[dict] = []
                if objects:
                    emb = embedder.embed(m, degraded)
                    for p in prompts:
                        rows.extend(run_prompt_mode(m.predictor, emb, objects, p, sample.key, model_cfg[m.key],
                                                    degraded, crop_embedder(embedder, m, degraded)))
                ident = {
                    "model": m.label, "model_key": m.key, "dataset": sample.dataset, "modality": sample.modality,
                    "sample": sample.key, "image_id": sample.image_id,
                    "slice": "" if sample.slice_index is None else sample.slice_index,
                    "condition": cond.name, "degradation": deg_names, "run_id": run_id,
                }
                for r in rows:
                    r.update(ident)
                    r["protocol"] = protocols[m.key][r["prompt"]]
                records = [{"model_key": m.key, "sample": sample.key, "condition": cond.name, "prompt": p,
                            "protocol": protocols[m.key][p], "objects": len(objects), "run_id": run_id,
                            "time": round(time.time(), 1)} for p in prompts]
                store.append(rows, records)
                stats.units_done += len(prompts)
                stats.rows += len(rows)
                computed += 1
                if on_unit:
                    on_unit(1, True)
            if stats.stopped_early:
                break
        if stats.stopped_early:
            break
    stats.encoder_calls = embedder.encoder_calls - calls0
    stats.cache_hits = embedder.cache_hits - hits0
    stats.encoder_seconds = embedder.encoder_seconds - secs0
    return stats


def crop_embedder(embedder: Embedder, handle: ModelHandle, image: np.ndarray) -> Callable[[CropPlan], object]:
    """``embed_crop(plan)``: the embedding of ``plan.crop(image)`` (through the embedding cache when there is one)."""
    return lambda plan: embedder.embed(handle, np.ascontiguousarray(plan.crop(image)))


def set_threads(n: int | None) -> None:
    if n:
        torch.set_num_threads(int(n))
