"""Prompt -> mask on one slice, the step the annotator runs on every prompt change.

Only the prompt encoder and mask decoder run here (the slice's embedding is computed once, see
:mod:`.slice_embeddings`). A corrective click (the same box plus more points than last time on this slice)
feeds the previous low-resolution logits back as the mask prompt, so the object is refined rather than
re-segmented from scratch. Box-trained models (LiteMedSAM, MedSAM) get the box as their primary prompt:
without a box on the slice, a box derived from the current mask (if any) is used, and a hint says why; a point-only
start is decoded twice, the second time with the box around its first mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..engine.click_guard import EdgeReach
from ..engine.click_refinement import REFINEMENT_METHODS, RefinementSettings, as_refinement, refine_prediction
from ..engine.focus_crop import CropPlan, FocusCrop, plan_crop
from ..engine.predictor import logits_to_original
from ..errors import CheckpointError, PromptError
from .session import SlicePrompts, mask_box

BOX_PRIMARY_HINT = (
    "{name} was trained with box prompts only, so the box is the primary prompt: draw a box around the "
    "object first; positive/negative points then refine it (points alone give poor masks with this model)."
)


# Seen with the fine-tuned robust-lite decoder on retinal vessels: a box around the whole vessel tree gives an
# empty mask (LiteMedSAM gives a blob), because 1-2 px vessels vanish at the 256 px input. Say so instead of
# leaving the user with nothing.
FALLBACK_HINT = (
    "{name} returned an empty mask for these prompts, so this is the base LiteMedSAM's mask (the head's empty-mask "
    "fallback): check it, and correct it with clicks if needed."
)
BOX_CHECK_HINT = (
    "for this box the base LiteMedSAM scored its own mask higher than {name}'s, so its mask is shown (the head's "
    "box check): check it, and correct it with clicks if needed."
)
EMPTY_MASK_HINT = (
    "{name} segmented no pixel for these prompts (predicted IoU {score:.2f}). Objects thinner or smaller than "
    "a few pixels at the model's {size} often come out empty: add positive points on the object, "
    "draw a tighter box around part of it, or try a model with a larger input (MedSAM, SAM: 1024 px)."
)


#: When a corrective click changes only the region connected to it (:mod:`..engine.local_correction`).
LOCAL_CORRECTION_MODES = ("off", "with a box", "always")
# Chosen on the training split's validation images (docs/results/local-corrections): from a box start, local
# corrections removed most per-object falls and ended higher on degraded images; from a point start the PGE head
# lost Dice with them (its far-away changes there are mostly gains), so point-only prompts take the whole mask.
DEFAULT_LOCAL_CORRECTIONS = "with a box"
#: When a corrective click may only change the mask in its direction and within its reach (:mod:`..engine.click_guard`);
#: the same modes as the local corrections.
CLICK_GUARD_MODES = LOCAL_CORRECTION_MODES
# Chosen by a rule written before measuring, on the training split's validation images (docs/results/click-guard):
# with PGE-lite-fast fewer falls of the mean and no cell lower beyond the rule's margin after 5 clicks; LiteMedSAM
# not lower in any cell. An edge-reach bound on every click lost Dice there (from a point start).
DEFAULT_CLICK_GUARD = "always"
#: how far a guarded click reaches: a negative click made before any positive click (a box start's first removals,
#: which nothing else bounds) changes no pixel further than twice its distance to the previous mask's edge; other
#: clicks are not bounded while no click refinement is on (REFINED_CLICK_GUARD_REACH below). Chosen by a third
#: rule on the same images (docs/results/click-guard): fewer falls of the mean for both heads and no cell lower
#: after 5 clicks.
DEFAULT_CLICK_GUARD_REACH: EdgeReach | None = EdgeReach(2.0, "negatives-before-positive")
#: the guard's reach while a click refinement is on: every click is bounded. The refinement re-decides a click's
#: surroundings itself; what made objects lose Dice with it was the model's own change far from the click (a point
#: start's positive click often balloons the mask), which the bound keeps out. Chosen by the rule in
#: docs/results/click-refinement/rule-reach.md.
REFINED_CLICK_GUARD_REACH: EdgeReach | None = EdgeReach(2.0, "all")
#: after the model, honour each click and re-decide its surroundings at full resolution (:mod:`..engine.click_refinement`);
#: the annotator's choices, in the order shown
CLICK_REFINEMENT_MODES = REFINEMENT_METHODS
#: the annotator's default click refinement: the learned refiner, with every click's model change bounded
#: (REFINED_CLICK_GUARD_REACH, applied by click_policy.ClickPolicy.guard_reach); chosen by the rule in
#: docs/results/click-refinement/rule-reach.md (reach.md there)
DEFAULT_CLICK_REFINEMENT = "learned"
#: whether the annotator decodes a small object's box in an enlarged crop of its surroundings by default
#: (:mod:`..engine.focus_crop`); chosen by the rule in docs/results/focus-crop/rule.md (results.md there)
DEFAULT_ZOOM_SMALL_OBJECTS = True


def zoom_default(model_name: str | None) -> bool:
    """Whether "Zoom on small objects" is on by default with the model called ``model_name``: its registry entry's
    own setting where it has one (a head that measured lower with the crop), else the annotator's default."""
    from ..errors import UserFacingError
    from ..models import registry

    try:
        spec = registry.get_model_spec(model_name) if model_name else None
    except UserFacingError:  # a checkpoint file of the user's own: the annotator's default
        spec = None
    own = getattr(spec, "zoom_small_objects", None)
    return DEFAULT_ZOOM_SMALL_OBJECTS if own is None else bool(own)


ZOOM_SMALL_OBJECTS_TOOLTIP = (
    "When the box is small (its longer side at most a quarter of the image's), the model sees only a crop of 3 x the "
    "box around it, enlarged to its input size, so small objects get finer masks. The crop is embedded once per box "
    "(in the background); clicks on that object stay in the same crop. Point-only starts are never zoomed."
)
CLICK_REFINEMENT_TOOLTIP = (
    "After the model: every click is honoured (its pixel gets the clicked label) and a disk around it is "
    "re-decided at the image's full resolution from the image's edges, with your clicks as fixed seeds. "
    "'random-walker' decides from the image alone; 'graph-cut' also weighs the model's own mask; 'learned' uses a "
    "small network trained on corrections of the development images. '-directed': a click only adds (positive) "
    "or only removes (negative). With any refinement on, the model's own change of a click is also kept near that "
    "click and the mask you see. 'learned' is the default (docs/results/click-refinement/reach.md); 'off' shows "
    "the model's mask."
)
REFINER_FALLBACK_HINT = "click refinement skipped, the model's mask is shown: {reason}"
#: the same modes as command-line words (training.evaluate, training.fit, benchmarks/compare_heads.py)
LOCAL_CORRECTION_WORDS = tuple(mode.replace(" ", "-") for mode in LOCAL_CORRECTION_MODES)


def local_corrections_mode(word: str) -> str:
    """The mode a command-line word of LOCAL_CORRECTION_WORDS names ("with-a-box" -> "with a box")."""
    return word.replace("-", " ")


def local_corrections_apply(mode: str | bool, has_box: bool) -> bool:
    """Whether a corrective click is kept local under ``mode`` (one of LOCAL_CORRECTION_MODES, or a bool)."""
    if isinstance(mode, bool):
        return mode
    if mode not in LOCAL_CORRECTION_MODES:
        raise ValueError(f"unknown local-corrections mode {mode!r}; valid: {', '.join(LOCAL_CORRECTION_MODES)}")
    return mode == "always" or (mode == "with a box" and has_box)


@dataclass
class SliceResult:
    mask: np.ndarray  # (H, W) bool
    logits: object  # torch tensor (1, 1, 256, 256)
    score: float
    used_previous_logits: bool
    prompts: SlicePrompts  # what was actually sent (incl. a derived box)
    hint: str = ""
    feedback: str = ""  # what the new clicks changed, for the status line (:func:`click_feedback`)
    crop: CropPlan | None = None  # the focus crop decoded in (``logits`` are in its frame), None: the whole slice


def clip_box(box: np.ndarray, plane: tuple[int, int]) -> np.ndarray:
    h, w = plane
    b = np.asarray(box, dtype=np.float64).copy()
    b[[0, 2]] = np.clip(b[[0, 2]], 0, w)
    b[[1, 3]] = np.clip(b[[1, 3]], 0, h)
    return b


def clip_points(points: np.ndarray, plane: tuple[int, int]) -> np.ndarray:
    h, w = plane
    p = np.asarray(points, dtype=np.float64).reshape(-1, 2).copy()
    p[:, 0] = np.clip(p[:, 0], 0, w - 1)
    p[:, 1] = np.clip(p[:, 1], 0, h - 1)
    return p


def _input_size_text(embedding) -> str:
    """``"256 px input"`` from an ImageEmbedding's frame (or a TiledEmbedding's first tile), else ``"input size"``."""
    frame = getattr(embedding, "frame", None)
    if frame is None and getattr(embedding, "embeddings", None):
        frame = getattr(embedding.embeddings[0], "frame", None)
    size = getattr(frame, "model_size", None)
    return f"{size} px input" if size else "input size"


def prompts_to_send(prompts: SlicePrompts, plane: tuple[int, int], box_primary: bool,
                    previous_prompts: SlicePrompts | None, previous_mask: np.ndarray | None,
                    model_name: str) -> tuple[SlicePrompts, str]:
    """The prompts sent to the model for ``prompts`` on a slice of ``plane`` (H, W), and a hint for the user.

    The box and points are clipped to the slice; a box-trained model without a box gets the previous box or the
    previous mask's box (else the hint says to draw one). Refused with a PromptError: a box under one pixel, no
    prompt, only negative points."""
    sent = SlicePrompts(prompts.points, prompts.labels, prompts.box, prompts.source)
    hint = ""
    if sent.box is not None:
        sent.box = clip_box(sent.box, plane)
        if sent.box[2] - sent.box[0] < 1 or sent.box[3] - sent.box[1] < 1:
            raise PromptError("the box is less than one pixel wide or high: drag a larger box")
    if sent.points.shape[0]:
        last = np.asarray(sent.points[-1], dtype=np.float64)
        sent.points = clip_points(sent.points, plane)
        if np.any(np.abs(last - sent.points[-1]) > 0.5):  # beyond the edge pixel's own half, not just inside it
            hint = (f"The last click, at ({last[0]:.0f}, {last[1]:.0f}), is outside the image: it acts on the nearest "
                    "edge pixel. B takes it back.")
    if sent.is_empty:
        raise PromptError("no prompt on this slice: draw a box or click a point")
    if box_primary and sent.box is None:
        derived = None
        if previous_prompts is not None and previous_prompts.box is not None:
            derived = previous_prompts.box
        elif previous_mask is not None:
            derived = mask_box(previous_mask)
        if derived is not None:
            sent.box = clip_box(derived, plane)
        else:
            hint = BOX_PRIMARY_HINT.format(name=model_name)
    if sent.box is None and sent.n_positive == 0:
        raise PromptError("only negative points: add a positive point or a box to say which object to segment")
    return sent, hint


def _point_start_again_with_box(predictor, embedding, sent: SlicePrompts, mask: np.ndarray):
    """A box-trained model's point start decoded again with the box around its first ``mask`` and the points, so
    that the model gets the kind of prompt it was trained with (docs/results/click-refinement/point-then-box.md).
    Returns the prompts sent (with that box) and the new prediction."""
    sent = SlicePrompts(sent.points, sent.labels, point_start_box(mask, sent), sent.source)
    return sent, predictor.predict(points=sent.points, point_labels=sent.labels, boxes=sent.box, embedding=embedding)


def point_start_box(mask: np.ndarray, prompts: SlicePrompts) -> np.ndarray:
    """The box a box-trained model's point start is decoded again with: around its first ``mask`` and the positive
    points of ``prompts`` (x0, y0, x1, y1; exclusive upper corners). The clicks after it are sent with this box."""
    box = mask_box(mask).astype(np.float64)
    positive = prompts.points[prompts.labels == 1]
    if positive.shape[0]:
        box[:2] = np.minimum(box[:2], np.floor(positive.min(0)))
        box[2:] = np.maximum(box[2:], np.floor(positive.max(0)) + 1)
    return box


def _refine(image: np.ndarray, embedding, mask: np.ndarray, prediction, sent: SlicePrompts, n_new: int,
            refinement: RefinementSettings, previous_mask: np.ndarray | None, previous_logits) -> tuple[np.ndarray, str]:
    """The click refinement of ``mask`` (the model's) around the ``n_new`` new points, and a hint ("" unless the
    refinement could not run); a corrective click (``previous_mask`` given) starts from the mask shown before it and
    the model's mask before it. A learned refiner whose file is missing or broken leaves the model's mask."""
    shown_before = model_before = None
    frame = getattr(embedding, "frame", None)  # a tiled embedding has none: start from the model's mask
    if previous_mask is not None and frame is not None:
        shown_before = previous_mask
        model_before = (logits_to_original(frame, previous_logits)[0, 0] > 0).cpu().numpy()
    prior = None
    if refinement.method == "graph-cut" and frame is not None:
        prior = logits_to_original(frame, prediction.low_res_logits[:1])[0, 0].cpu().numpy()
    try:
        return refine_prediction(image, shown_before, model_before, mask, sent.points, sent.labels, n_new, refinement,
                                 prior), ""
    except CheckpointError as err:
        return mask, REFINER_FALLBACK_HINT.format(reason=err)


def segment_slice(
    predictor,
    embedding,
    prompts: SlicePrompts,
    previous_prompts: SlicePrompts | None = None,
    previous_logits=None,
    previous_mask: np.ndarray | None = None,
    box_primary: bool = False,
    use_previous_logits: bool = True,
    model_name: str = "this model",
    local_corrections: str | bool = "off",
    click_guard: str | bool = "off",
    click_guard_reach: float | EdgeReach | None = None,
    image: np.ndarray | None = None,
    click_refinement: str | RefinementSettings | None = None,
    focus_crop: FocusCrop | None = None,
    embed_crop=None,
    previous_crop: CropPlan | None = None,
    point_strokes: np.ndarray | None = None,
) -> SliceResult:
    """Segment one object on one slice from its prompts.

    ``previous_*``: what the current object had on this slice before this prompt change; the logits are
    fed back when the new prompts only add points to the previous ones (a corrective click).
    ``local_corrections`` (one of LOCAL_CORRECTION_MODES, or a bool): on a corrective click, change the mask only
    in the regions connected to the new points; the rest of the previous mask stays as it was.
    ``click_guard`` (the same modes): on a corrective click, keep only the changes in the new points' direction
    (a positive point adds, a negative point removes) that are nearer to them than to earlier points of the other
    label; ``click_guard_reach`` also bounds their reach by their distance to the previous mask's edge.
    ``click_refinement`` (one of CLICK_REFINEMENT_MODES, or settings; needs ``image``, the slice's pixels): after
    the model, every new point whose pixel lacks its label is honoured and its surroundings re-decided at full
    resolution (:mod:`..engine.click_refinement`); a corrective click starts from ``previous_mask``.
    ``focus_crop`` (settings, with ``embed_crop(plan) -> embedding of plan.crop(slice pixels)``): when the prompts
    have a box that :func:`..engine.focus_crop.plan_crop` finds small, everything is decoded in that crop and the
    mask pasted back (``SliceResult.crop`` says which); ``previous_crop`` is the crop ``previous_logits`` were
    decoded in (None: the whole slice); logits of another frame are replaced by the previous mask as the mask prompt.
    ``point_strokes``: each point's stroke id (-1: a click; :mod:`.strokes`), for the status line's wording only.
    """
    plane = tuple(getattr(embedding, "frame", embedding).original_size)  # ImageEmbedding / TiledEmbedding
    sent, hint = prompts_to_send(prompts, plane, box_primary, previous_prompts, previous_mask, model_name)
    plan = focus_plan(prompts, plane, focus_crop) if embed_crop is not None else None
    if plan is not None:
        options = dict(box_primary=box_primary, use_previous_logits=use_previous_logits, model_name=model_name,
                       local_corrections=local_corrections, click_guard=click_guard,
                       click_guard_reach=click_guard_reach, click_refinement=click_refinement,
                       point_strokes=point_strokes)
        return segment_in_crop(plan, embed_crop(plan), predictor, sent, previous_prompts, previous_logits,
                                previous_mask, previous_crop, image, **options)
    if previous_crop is not None and previous_logits is not None:
        previous_logits = _mask_prompt_from(embedding, previous_mask)
    corrective = sent.extends(previous_prompts)
    use_logits = bool(
        use_previous_logits
        and previous_logits is not None
        and (corrective or (previous_prompts is not None and previous_prompts.source in ("propagated", "label")
                            and sent.points.shape[0] > 0))
    )
    extra = _click_options(sent, previous_prompts, local_corrections, click_guard, click_guard_reach) if (
        use_logits and corrective) else {}
    points = sent.points if sent.points.shape[0] else None
    prediction = predictor.predict(points=points, point_labels=None if points is None else sent.labels, boxes=sent.box,
                                   mask_input=previous_logits if use_logits else None, embedding=embedding, **extra)
    if box_primary and sent.box is None and prediction.masks[0].any():
        sent, prediction = _point_start_again_with_box(predictor, embedding, sent, prediction.masks[0])
    mask = prediction.masks[0]
    refinement = as_refinement(click_refinement)
    n_new = sent.points.shape[0] - (previous_prompts.points.shape[0] if corrective else 0)
    if refinement is not None and image is not None and n_new > 0:
        mask, refine_hint = _refine(image, embedding, mask, prediction, sent, n_new, refinement,
                                    previous_mask if use_logits and corrective else None, previous_logits)
        hint = hint or refine_hint
    stroke = new_points_form_one_stroke(point_strokes, len(sent.points), n_new)
    new = corrective and n_new > 0
    feedback = click_feedback(previous_mask, mask, sent.points, sent.labels, n_new, stroke) if new else ""
    return SliceResult(mask=mask, logits=prediction.low_res_logits[:1], score=float(prediction.scores[0]),
                       used_previous_logits=use_logits, prompts=sent,
                       hint=hint or _model_hint(prediction, mask, embedding, model_name), feedback=feedback)


def _click_options(sent: SlicePrompts, previous_prompts: SlicePrompts, local_corrections, click_guard,
                   click_guard_reach) -> dict:
    """The predictor's keyword arguments for a corrective click's local corrections and guard."""
    extra = {}
    new_points = sent.points[previous_prompts.points.shape[0]:]
    if local_corrections_apply(local_corrections, sent.box is not None):
        extra["local_clicks"] = [new_points]
    if local_corrections_apply(click_guard, sent.box is not None):
        extra["guard_new_clicks"] = new_points.shape[0]
        extra["guard_edge_reach"] = click_guard_reach
    return extra


def _model_hint(prediction, mask: np.ndarray, embedding, model_name: str) -> str:
    """A hint when the head's base model answered (an empty mask, or the box check) or the mask is empty, else ""."""
    fell_back = getattr(prediction, "fell_back", None)  # predictors without an empty-mask fallback omit it
    if fell_back is not None and bool(np.asarray(fell_back)[:1].any()):
        return FALLBACK_HINT.format(name=model_name)
    preferred = getattr(prediction, "base_preferred", None)
    if preferred is not None and bool(np.asarray(preferred)[:1].any()):
        return BOX_CHECK_HINT.format(name=model_name)
    if not mask.any():
        return EMPTY_MASK_HINT.format(name=model_name, score=float(prediction.scores[0]),
                                      size=_input_size_text(embedding))
    return ""


def focus_plan(prompts: SlicePrompts, plane: tuple[int, int], focus_crop: FocusCrop | None) -> CropPlan | None:
    """The focus crop that :func:`segment_slice` decodes ``prompts`` in on a slice of ``plane`` (H, W), or None:
    only a box (a point-only start is never cropped) that ``focus_crop`` finds small, with every point inside the
    crop (a click outside it is decoded on the whole slice, so that it counts)."""
    if focus_crop is None or prompts.box is None:
        return None
    plan = plan_crop(clip_box(prompts.box, plane), plane, focus_crop)
    if plan is not None and not plan.contains_points(clip_points(prompts.points, plane)):
        return None
    return plan


def _mask_prompt_from(embedding, mask: np.ndarray | None):
    """A mask prompt for ``embedding``'s frame from a binary ``mask`` (None without a mask or a single frame)."""
    frame = getattr(embedding, "frame", None)
    if mask is None or frame is None:
        return None
    return frame.mask_to_low_res(mask)


def _crop_prompts(plan: CropPlan, prompts: SlicePrompts | None) -> SlicePrompts | None:
    if prompts is None:
        return None
    return SlicePrompts(plan.points_to_crop(prompts.points), prompts.labels,
                        None if prompts.box is None else plan.box_to_crop(prompts.box), prompts.source, prompts.end)


def segment_in_crop(plan: CropPlan, crop_embedding, predictor, sent: SlicePrompts, previous_prompts, previous_logits,
                     previous_mask, previous_crop, image, **options) -> SliceResult:
    """:func:`segment_slice` decoded in the focus crop ``plan`` (prompts, previous state and pixels moved into its
    frame), its mask pasted back at full size. The previous logits are fed back only when they come from the same
    crop; otherwise the previous mask (cropped) is the mask prompt."""
    crop_previous_mask = None if previous_mask is None else plan.crop(previous_mask)
    logits = previous_logits
    if previous_logits is not None and previous_crop != plan:
        logits = _mask_prompt_from(crop_embedding, crop_previous_mask)
    inner = segment_slice(
        predictor, crop_embedding, _crop_prompts(plan, sent),
        previous_prompts=_crop_prompts(plan, previous_prompts), previous_logits=logits,
        previous_mask=crop_previous_mask, image=None if image is None else plan.crop(image), **options)
    mask = plan.paste(inner.mask)
    feedback = ""
    corrective = sent.extends(previous_prompts)
    if inner.feedback and corrective:  # counted again at full size: the previous mask may reach outside the crop
        n_new = sent.points.shape[0] - previous_prompts.points.shape[0]
        stroke = new_points_form_one_stroke(options.get("point_strokes"), len(sent.points), n_new)
        feedback = click_feedback(previous_mask, mask, sent.points, sent.labels, n_new, stroke)
    return SliceResult(mask=mask, logits=inner.logits, score=inner.score,
                       used_previous_logits=inner.used_previous_logits, prompts=sent, hint=inner.hint,
                       feedback=feedback, crop=plan)


def new_points_form_one_stroke(point_strokes, n_points: int, n_new: int) -> bool:
    """Whether the last ``n_new`` of ``n_points`` points were all sampled from one stroke (``point_strokes``: one
    stroke id per point, -1 for a click; None: all clicks)."""
    if point_strokes is None or n_new <= 0:
        return False
    ids = np.asarray(point_strokes).reshape(-1)
    if ids.shape[0] != n_points:
        return False
    new = ids[n_points - n_new:]
    return bool(new[0] >= 0 and (new == new[0]).all())


def click_feedback(before: np.ndarray | None, after: np.ndarray, points, labels, n_new: int,
                   stroke: bool = False) -> str:
    """One sentence for the status line: what the last ``n_new`` of ``points`` ((K, 2) x, y; ``labels`` 1/0) changed
    from ``before`` to ``after`` (pixels added and removed), and when a click changed nothing or its pixel still has
    the other label, why that may be and what to try. ``stroke``: the new points are the clicks along one stroke,
    and the sentence names it. Why: a click the model ignores must not look like one it took (the status line used
    to say only "refined with the previous mask")."""
    from ..engine.click_refinement import click_pixel

    after = np.asarray(after, dtype=bool)
    before = np.zeros_like(after) if before is None else np.asarray(before, dtype=bool)
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    labs = np.asarray(labels).reshape(-1).astype(int)
    pixels = [click_pixel(p, after.shape) for p in pts]
    new = range(len(pixels) - n_new, len(pixels))
    added, removed = int((after & ~before).sum()), int((before & ~after).sum())
    notes = []
    overridden = [k for k in new if any(pixels[j] == pixels[k] and labs[j] != labs[k] for j in range(k))]
    if overridden:
        notes.append("it contradicts an earlier click on the same pixel: the last click wins")
    ignored = [k for k in new if after[pixels[k]] != bool(labs[k])]
    if stroke:
        return _stroke_feedback(n_new, added, removed, len(ignored),
                                all(before[pixels[k]] == bool(labs[k]) for k in new), bool(overridden))
    if added == 0 and removed == 0:
        if all(before[pixels[k]] == bool(labs[k]) for k in new):
            text = ("The click changed nothing: its pixel already had that label. Click where the mask is wrong "
                    "(positive on missed object, negative on wrong mask).")
        else:
            text = ("The click changed nothing: the model kept its mask. Try Click refinement (random walker or "
                    "graph cut), a click nearer the middle of the wrong part, or a tighter box.")
    else:
        text = f"The click added {added} px and removed {removed} px."
        if ignored:
            text += (" Its pixel still has the other label: try Click refinement, or click again nearer the middle "
                     "of the wrong part.")
    if notes:
        text += " Note: " + "; ".join(notes) + "."
    return text


def _stroke_feedback(n_points: int, added: int, removed: int, n_ignored: int, had_labels: bool,
                     overrides: bool) -> str:
    """:func:`click_feedback`'s sentence for the clicks along one stroke."""
    name = f"stroke of {n_points} point{'s' if n_points != 1 else ''}"
    if added == 0 and removed == 0:
        if had_labels:
            text = (f"The {name} changed nothing: its points already had that label. Draw it where the mask is "
                    "wrong (positive over missed object, negative over wrong mask).")
        else:
            text = (f"The {name} changed nothing: the model kept its mask. Try Click refinement (random walker or "
                    "graph cut), a stroke nearer the middle of the wrong part, or a tighter box.")
    else:
        text = f"{name[0].upper()}{name[1:]}: +{added} px / -{removed} px."
        if n_ignored:
            text += (f" {n_ignored} of its points still have the other label: try Click refinement, or draw again "
                     "nearer the middle of the wrong part.")
    if overrides:
        text += " Note: it crosses an earlier click of the other label: the stroke, the last prompt, wins there."
    return text
