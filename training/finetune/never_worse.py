"""Never worse: a fine-tuned model replaces the current one only if it segments the user's held-back labels better.

The user's labelled planes (2D images, or labelled slices of a volume: each one a sample) are split by
:func:`plan_holdout`:

- ``hold-out`` (at least :data:`FOLDS_BELOW` planes): a seeded share of the planes (the preset's validation
  fraction, at least :data:`MIN_HELD_BACK`) is held back; the candidate is trained on the rest;
- ``folds`` (2 to :data:`FOLDS_BELOW` - 1 planes): leave-one-out folds. One fold model per plane is trained on the
  others and judged on that plane; the model offered to the user is then trained on every plane. The decision is
  about the recipe on these images, which is what the fold models measure;
- ``none`` (a single plane): nothing can be held back; no decision is possible, and the candidate is not swapped
  in by itself.

Both models are judged by :func:`score_items` the way a user works: a tight box around each labelled object, then
:data:`JUDGE_CLICKS` corrective clicks (each at the centre of the largest error region), every step through the
annotator's click path with its click policy and zoom, Dice at the image's own resolution. The score of an
object is (box Dice + Dice after the clicks) / 2.

:func:`decide` swaps only if the candidate's mean gain over the judged objects is at least :data:`MIN_GAIN`. Why
not simply a higher mean: two held-back images cannot tell a small gain from a real loss, and a mean-only rule
swapped in a model that was worse on the rest of the user's images. A confidence bound over two objects failed
both ways (docs/results/user-loop/rule-judge-margin.md). The decision and its numbers go into the checkpoint's
metadata (:func:`record_decision`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from napari_robustmedsam.metrics import dice
from napari_robustmedsam.prompting import corrective_click, rng_for, tight_box

from .data import TrainItem

#: below this many labelled planes, leave-one-out folds are used instead of a single held-back share
FOLDS_BELOW = 5
#: a hold-out split keeps at least this many planes back (one plane decides nothing reliable)
MIN_HELD_BACK = 2
#: corrective clicks after the box when judging a model (the annotator's typical few corrections)
JUDGE_CLICKS = 3
#: objects judged per plane at most (the first ones by label value; keeps judging a crowded plane quick)
JUDGE_MAX_OBJECTS = 5
#: the smallest mean gain over the judged objects that swaps the candidate in: issue 28's tolerance, below which
#: a dataset does not count as better or worse
MIN_GAIN = 0.01
#: one-sided confidence of the lower bound of the gain that the decision records (information only: with two
#: held-back images it is not reliable enough to decide)
CONFIDENCE = 0.90
#: the metadata key of the decision in a checkpoint's ``extra``
METADATA_KEY = "never_worse"
#: the condition of a plane judged as the user labelled it
CLEAN = "clean"


def judge_level(levels) -> str | None:
    """The degradation level the held-back planes are also judged at, for a fine-tune robust to ``levels``: LQ-3
    when they include LQ-3 or LQ-3+ (LQ-3+ adds modality artefacts that a user's own images may never show), else the
    most severe level listed; None (clean only) when none is listed."""
    from napari_robustmedsam.degradations.levels import LEVELS, normalize_level

    chosen = {normalize_level(level) for level in levels or ()}
    if chosen & {"LQ-3", "LQ-3+"}:
        return "LQ-3"
    listed = [level for level in LEVELS if level in chosen]
    return listed[-1] if listed else None


def judge_level_of(cfg) -> str | None:
    """:func:`judge_level` of a fine-tune's settings; None when it trains on clean images only (no degraded
    variants, or every degraded branch clean: the Fine-tune tab's "none" levels)."""
    if int(getattr(cfg, "variants", 0)) <= 0 or float(getattr(cfg, "p_identity", 0.0)) >= 1.0:
        return None
    return judge_level(cfg.levels)


def score_key(key: str, condition: str = CLEAN) -> str:
    """The key of a plane's score in one condition (the plane's own key when clean)."""
    return key if condition == CLEAN else f"{key} @ {condition}"


@dataclass
class Fold:
    train: list[TrainItem]
    held: list[TrainItem]


@dataclass
class HoldoutPlan:
    mode: str  # "hold-out", "folds" or "none"
    folds: list[Fold]
    all_items: list[TrainItem]

    @property
    def held_back(self) -> list[TrainItem]:
        return [it for f in self.folds for it in f.held]

    @property
    def final_train(self) -> list[TrainItem]:
        """The planes the model offered to the user is trained on."""
        if self.mode == "hold-out":
            return self.folds[0].train
        return self.all_items

    @property
    def runs(self) -> int:
        """Training runs: one per fold, plus the final run on every plane in folds mode."""
        return len(self.folds) + (1 if self.mode == "folds" else 0) if self.mode != "none" else 1

    def describe(self) -> str:
        n = len(self.all_items)
        if self.mode == "hold-out":
            return (f"{len(self.held_back)} of {n} labelled planes held back to check the result; "
                    f"trained on the other {len(self.final_train)}")
        if self.mode == "folds":
            return (f"only {n} labelled planes: {len(self.folds)} folds (each plane held back once), then the model "
                    f"offered is trained on all {n}")
        return "a single labelled plane: nothing can be held back, so the result cannot be checked"


def plan_holdout(items: list[TrainItem], fraction: float, seed: int = 0) -> HoldoutPlan:
    """The split of the user's planes (see the module docstring). Seeded: the same labels give the same split."""
    items = list(items)
    n = len(items)
    if n <= 1:
        return HoldoutPlan("none", [Fold(items, [])], items)
    order = rng_for(seed, "never-worse-split", n).permutation(n)
    if n < FOLDS_BELOW:
        folds = [Fold([items[j] for j in range(n) if j != i], [items[i]]) for i in sorted(order.tolist())]
        return HoldoutPlan("folds", folds, items)
    n_held = min(n - 1, max(MIN_HELD_BACK, int(round(n * fraction))))
    held_idx = set(order[:n_held].tolist())
    held = [it for i, it in enumerate(items) if i in held_idx]
    train = [it for i, it in enumerate(items) if i not in held_idx]
    return HoldoutPlan("hold-out", [Fold(train, held)], items)


@dataclass
class PlaneScore:
    key: str
    box: float  # mean box Dice over the plane's judged objects
    clicks: float  # mean Dice after the box and JUDGE_CLICKS corrective clicks
    objects: int
    #: (box Dice, Dice after the clicks) of each judged object, in the judging order; empty: the plane's means stand
    #: for one object
    per_object: list[tuple[float, float]] = field(default_factory=list)
    condition: str = CLEAN  # CLEAN, or the degradation level of the judged copy

    @property
    def score(self) -> float:
        return (self.box + self.clicks) / 2.0

    def object_scores(self) -> list[float]:
        pairs = self.per_object or [(self.box, self.clicks)]
        return [(b + c) / 2.0 for b, c in pairs]


def score_items(predictor, items: list[TrainItem], *, clicks: int = JUDGE_CLICKS,
                max_objects: int = JUDGE_MAX_OBJECTS, zoom: bool = True, level: str | None = None, seed: int = 0,
                cancel: Callable[[], bool] | None = None,
                progress: Callable[[int, int, str], None] | None = None) -> dict[str, PlaneScore]:
    """Box Dice and Dice after ``clicks`` corrective clicks of ``predictor`` (engine.Predictor) on every plane, each
    step through the annotator's own click path (:func:`~napari_robustmedsam.annotation.prompt_decoding.segment_slice`
    with the annotator's click policy, and with *Zoom on small objects* when ``zoom``, as the annotator opens the
    model). Why: a candidate is swapped in for what the user will see when they click, not for what the model's
    whole mask does (the papers' protocol), which can differ a lot (docs/results/user-loop).

    With a ``level``, every plane is also judged as a degraded copy at that level (seeded by ``seed`` and the plane's
    key, so two models see the same pixels), under :func:`score_key` ``(key, level)``."""
    from napari_robustmedsam.degradations import degrade_random
    from napari_robustmedsam.prompting import derive_seed

    conditions = [CLEAN] + ([level] if level else [])
    out: dict[str, PlaneScore] = {}
    for n, item in enumerate(items):
        for condition in conditions:
            if cancel is not None and cancel():
                return out
            image = item.image
            if condition != CLEAN:
                image, _ = degrade_random(image, condition, item.modality,
                                          derive_seed(seed, "never-worse-judge", item.key))
            box_d, click_d = _score_plane(predictor, image, item, clicks, max_objects, zoom)
            out[score_key(item.key, condition)] = PlaneScore(
                item.key, float(np.mean(box_d)), float(np.mean(click_d)), len(box_d),
                [(float(b), float(c)) for b, c in zip(box_d, click_d)], condition)
        if progress is not None:
            progress(n + 1, len(items), f"judging {item.key}")
    return out


def _score_plane(predictor, image: np.ndarray, item: TrainItem, clicks: int, max_objects: int,
                 zoom: bool) -> tuple[list[float], list[float]]:
    """Box Dice and Dice after the clicks of each judged object of ``item``, on ``image`` (the plane or its copy)."""
    from napari_robustmedsam.annotation.click_policy import click_policy
    from napari_robustmedsam.annotation.prompt_decoding import segment_slice
    from napari_robustmedsam.annotation.session import SlicePrompts
    from napari_robustmedsam.engine.focus_crop import DEFAULT_FOCUS_CROP

    policy = click_policy("annotator").segment_kwargs()
    emb = predictor.compute_embedding(image)
    view = dict(box_primary=bool(getattr(predictor, "box_primary", False)), image=image,
                focus_crop=DEFAULT_FOCUS_CROP if zoom else None,
                embed_crop=lambda plan: predictor.compute_embedding(np.ascontiguousarray(plan.crop(image))))
    box_d, click_d = [], []
    for oid in item.object_ids[:max_objects]:
        gt = item.labels == oid
        shown = segment_slice(predictor, emb, SlicePrompts(box=tight_box(gt)), **view)
        box_d.append(dice(shown.mask, gt))
        for _ in range(clicks):
            click = corrective_click(gt, shown.mask)
            if click is None:
                break
            shown = segment_slice(predictor, emb, shown.prompts.with_point(click.x, click.y, click.label),
                                  previous_prompts=shown.prompts, previous_logits=shown.logits,
                                  previous_mask=shown.mask, previous_crop=shown.crop, **view, **policy)
        click_d.append(dice(shown.mask, gt))
    return box_d, click_d


@dataclass
class Decision:
    """The never-worse decision and its numbers (shown in the widget and saved with the checkpoint)."""

    mode: str
    held_back: list[str]
    current_model: str
    candidate: str
    current_score: float | None  # mean over the judged objects
    candidate_score: float | None
    swapped: bool
    reason: str
    rows: list[dict] = field(default_factory=list)  # per held-back plane: before / after box and clicks Dice
    metric: str = (f"mean over the judged conditions (clean, and degraded copies when judged) of the mean over the "
                   f"judged objects of the held-back planes of (box Dice + Dice after {JUDGE_CLICKS} corrective "
                   f"clicks) / 2; swapped if the candidate's is higher by at least {MIN_GAIN} and no condition's is "
                   f"lower by more than {MIN_GAIN}")
    objects: int = 0  # judged objects, paired between the two models
    min_gain: float = MIN_GAIN
    lower_bound: float | None = None  # of the mean paired gain, at ``confidence``; None with fewer than 2 objects
    confidence: float = CONFIDENCE
    mean_rule_swapped: bool = False  # what a higher mean alone would have decided (kept for comparison)
    #: condition -> [current, candidate] mean object score (clean, and the judge level's degraded copies if judged)
    condition_scores: dict[str, list[float]] = field(default_factory=dict)

    @property
    def delta(self) -> float | None:
        if self.current_score is None or self.candidate_score is None:
            return None
        return self.candidate_score - self.current_score

    def summary(self) -> str:
        if self.delta is None:
            return self.reason
        n = len(self.held_back)
        scores = f"{self.candidate_score:.3f} vs {self.current_score:.3f}"
        degraded = [c for c in self.condition_scores if c != CLEAN]
        where = f"{n} held-back plane(s)" + (f", as labelled and at {' and '.join(degraded)}" if degraded else "")
        if self.swapped:
            return f"The fine-tuned model is better: {scores} for {self.current_model} on {where} (+{self.delta:.3f})."
        kept = f"Kept the current model ({self.current_model}): the fine-tuned model scored {scores} on {where}"
        losses = {c: after - before for c, (before, after) in self.condition_scores.items()
                  if after - before < -self.min_gain}
        if self.delta >= self.min_gain and losses:
            lost = ", ".join(f"{-g:.3f} lower {'as labelled' if c == CLEAN else 'at ' + c}" for c, g in losses.items())
            return f"{kept}, +{self.delta:.3f} on average but {lost}."
        if self.delta <= 0:
            lower = f"{-self.delta:.3f} lower" if self.delta < 0 else "not higher"
            return f"{kept}, {lower}."
        return (f"{kept}, only +{self.delta:.3f}: a swap needs at least +{self.min_gain:.3f}, since a smaller gain "
                f"on {n} image(s) may be a loss on the others. Label more images and run it again.")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["delta"] = self.delta
        return d


def paired_gains(current: dict[str, PlaneScore], candidate: dict[str, PlaneScore], keys: list[str]) -> list[float]:
    """Candidate minus current score of each judged object, paired by plane (and condition) and judging order."""
    gains: list[float] = []
    for k in keys:
        before, after = current[k].object_scores(), candidate[k].object_scores()
        gains += [a - b for a, b in zip(after, before)]
    return gains


def lower_bound(gains: list[float], confidence: float = CONFIDENCE) -> float | None:
    """One-sided lower confidence bound of the mean gain (Student's t over the objects); None below 2 objects."""
    from scipy.stats import t

    g = np.asarray(gains, float)
    if g.size < 2 or not np.all(np.isfinite(g)):
        return None
    return float(g.mean() - t.ppf(confidence, g.size - 1) * g.std(ddof=1) / math.sqrt(g.size))


def gain_swaps(gain: float, condition_gains=()) -> bool:
    """The rule itself (shared with the user-loop benchmark's re-decision): the mean gain over the judged conditions
    is at least :data:`MIN_GAIN`, and no condition loses more than :data:`MIN_GAIN` (a model better on degraded
    copies must not be swapped in when it is worse on the user's images as they are)."""
    losses = [g for g in condition_gains if not (math.isfinite(g) and g >= -MIN_GAIN)]
    return bool(math.isfinite(gain) and gain >= MIN_GAIN and not losses)


def decide(current: dict[str, PlaneScore], candidate: dict[str, PlaneScore], *, mode: str, current_model: str,
           candidate_path: str) -> Decision:
    """Swap by :func:`gain_swaps`. Each condition (clean, and the judge level's copies when judged) counts the same:
    a score is the mean over conditions of the mean over that condition's judged objects."""
    keys = [k for k in candidate if k in current]
    if not keys:
        return Decision(mode, [], current_model, candidate_path, None, None, False,
                        "no held-back labels to compare on: the current model is kept (load the result by hand "
                        "if you want it)")
    per_plane = {k: paired_gains(current, candidate, [k]) for k in keys}
    conditions = list(dict.fromkeys(candidate[k].condition for k in keys))

    def mean_of(scores: dict[str, PlaneScore], condition: str) -> float:
        return float(np.mean([v for k in keys if scores[k].condition == condition for v in scores[k].object_scores()]))

    before_by = {c: mean_of(current, c) for c in conditions}
    after_by = {c: mean_of(candidate, c) for c in conditions}
    before, after = float(np.mean(list(before_by.values()))), float(np.mean(list(after_by.values())))
    condition_gains = {c: after_by[c] - before_by[c] for c in conditions}
    gains = [g for k in keys for g in per_plane[k]]
    rows = [dict(plane=current[k].key, condition=current[k].condition, box_before=current[k].box,
                 box_after=candidate[k].box, clicks_before=current[k].clicks, clicks_after=candidate[k].clicks,
                 objects=current[k].objects, gains=[round(g, 6) for g in per_plane[k]])
            for k in keys]
    swapped = gain_swaps(after - before, condition_gains.values())
    judged = " and ".join(conditions)
    if swapped:
        reason = f"a gain of at least {MIN_GAIN} on the held-back planes ({judged})"
    elif after - before >= MIN_GAIN:
        reason = (f"a loss of more than {MIN_GAIN} on the held-back planes "
                  f"({', '.join(c for c, g in condition_gains.items() if g < -MIN_GAIN)}): the current model is kept")
    else:
        reason = f"no gain of {MIN_GAIN} on the held-back planes ({judged}): the current model is kept"
    return Decision(mode, list(dict.fromkeys(current[k].key for k in keys)), current_model, candidate_path, before,
                    after, swapped, reason, rows, objects=len(gains), lower_bound=lower_bound(gains),
                    mean_rule_swapped=bool(math.isfinite(after) and after > before),
                    condition_scores={c: [before_by[c], after_by[c]] for c in conditions})


def record_decision(checkpoint: str | Path, decision: Decision) -> Path:
    """Write the decision into the checkpoint's metadata (``extra.never_worse``), atomically, weights unchanged."""
    from napari_robustmedsam.checkpoints import save_checkpoint
    from napari_robustmedsam.checkpoints.project_format import unpack_project_checkpoint
    from napari_robustmedsam.checkpoints.safe_load import load_untrusted

    path = Path(checkpoint)
    obj = load_untrusted(path, what="fine-tuned checkpoint")
    state, metadata = unpack_project_checkpoint(obj, str(path))
    extra = dict(metadata.get("extra") or {})
    extra[METADATA_KEY] = _plain(decision.to_dict())
    metadata["extra"] = extra
    return save_checkpoint(path, state, metadata)


def _plain(value: Any) -> Any:
    """JSON-like values only (the checkpoint format refuses anything that would need code to unpickle)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value
