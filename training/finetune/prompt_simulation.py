"""Iterative prompt simulation for training (MedicoSAM Algorithm 1 / micro_sam's ``SamTrainer``).

Per training iteration (one batch of planes, ``n_obj`` objects each):

1. start with a box (probability ``p_box``; tight, or jittered with probability ``p_jitter``) or with K random
   positive points (K drawn from ``point_counts``; RobustMedSAM's protocol uses K = 3, SAM's a single point);
2. then ``n_steps`` corrective clicks, each sampled from the current prediction's error regions, and the
   previous low-resolution logits fed back as the mask prompt with probability ``p_mask``;
3. the losses of all ``n_steps + 1`` predictions are averaged (one optimiser step per iteration).

With ``local_corrections`` ("with a box" or "always", the annotator's modes), the prediction that the next click
is sampled from and that is fed back is the annotator's merged one: the new logits only in the changed regions
touching the step's new clicks, the previous logits elsewhere (:mod:`napari_robustmedsam.engine.local_correction`).
``click_guard`` (the same modes) does the same for the annotator's click guard (:mod:`napari_robustmedsam.engine.
click_guard`), after the local merge. Why: a head trained on whole-mask states meets different states in the
annotator; this lets it learn from the states the annotator's default produces. The loss stays on the head's whole
prediction.

The prompts are simulated in the decoder's low-resolution (256 x 256) model frame, where the ground truth is
kept (:mod:`.pairs`), and scaled to the model input frame (x ``model_size / 256``). Everything is drawn from the
``numpy.random.Generator`` passed in, so an iteration is reproducible from its seed.

Click samplers (``click_mode``):

- ``"largest"`` (default): :func:`napari_robustmedsam.prompting.corrective_click` - one click in the largest
  error region (positive in missed object, negative in a false positive), at the region's centre or (with
  probability ``p_random_click``) at a random pixel of it. This is the clicker of the evaluation protocol.
- ``"micro_sam"``: ``micro_sam.prompt_generators.IterativePromptGenerator`` - one positive click sampled from all
  false negatives and one negative click from all false positives per step (MedicoSAM / micro_sam training).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from napari_robustmedsam.annotation.prompt_decoding import (
    LOCAL_CORRECTION_MODES,
    LOCAL_CORRECTION_WORDS,
    local_corrections_apply,
    local_corrections_mode,
)
from napari_robustmedsam.engine.click_guard import REACH_SCOPES, EdgeReach, guard_clicks
from napari_robustmedsam.engine.local_correction import merge_local_correction
from napari_robustmedsam.prompting import corrective_click, jittered_box, random_positive_points, tight_box

from .data import TrainingError
from .options import UNLESS_DEFAULT, setting

CLICK_MODES = ("largest", "micro_sam")


def _counts(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise TrainingError(f"--points must be comma-separated integers, got {text!r}") from None


PROMPTS = "prompts and degradations"


@dataclass(frozen=True)
class PromptConfig:
    p_box: float = setting(0.5, "probability of a box start", flag="--p-box", group=PROMPTS)
    point_counts: tuple[int, ...] = setting((1, 3), "K of the K-point starts, comma-separated", flag="--points",
                                            parse=_counts, shown="1,3", group=PROMPTS)
    p_jitter: float = setting(0.5, "probability that a box start is jittered")
    box_jitter: float = setting(0.1, "a jittered box's corner shift, as a share of its side")
    n_steps: int = setting(3, "corrective clicks per iteration", flag="--n-steps", group=PROMPTS)
    p_mask: float = setting(0.5, "probability of feeding back the previous logits", flag="--p-mask", group=PROMPTS)
    click_mode: str = setting("largest", "corrective click sampler: largest = the evaluation's clicker (the largest "
                              "error region, at its centre or a random pixel of it); micro_sam = micro_sam's "
                              "trainer", flag=("--click-strategy", "--clicks"), choices=CLICK_MODES, group=PROMPTS)
    p_random_click: float = setting(0.5, "probability that a 'largest' click is a random pixel of the region")
    local_corrections: str = setting(
        "off", "simulate the annotator's 'Corrections stay local': the next click is sampled from, and the previous "
        "logits fed back are, the prediction merged around the last click", flag="--local-corrections",
        choices=LOCAL_CORRECTION_WORDS, parse=local_corrections_mode, fingerprint=UNLESS_DEFAULT, group=PROMPTS)
    click_guard: str = setting(
        "off", "simulate the annotator's 'Clicks only add / remove' after the local merge: a click's change is kept "
        "only in its direction and nearer to it than to earlier clicks of the other label (the annotator's default "
        "is 'always')", flag="--click-guard", choices=LOCAL_CORRECTION_WORDS, parse=local_corrections_mode,
        fingerprint=UNLESS_DEFAULT, group=PROMPTS)
    click_guard_reach: float = setting(
        0.0, "with the click guard: a click also reaches no further than this many times its distance to the "
        "previous mask's edge (0 = no such bound; the annotator's default is 2 for the clicks of "
        "--click-guard-reach-scope negatives-before-positive)", flag="--click-guard-reach", shown="0",
        fingerprint=UNLESS_DEFAULT, group=PROMPTS)
    click_guard_reach_scope: str = setting(
        "all", "the clicks --click-guard-reach bounds: all, or only a negative click made before any positive one",
        flag="--click-guard-reach-scope", choices=REACH_SCOPES, fingerprint=UNLESS_DEFAULT, group=PROMPTS)

    def __post_init__(self) -> None:
        for name in ("local_corrections", "click_guard"):
            if getattr(self, name) not in LOCAL_CORRECTION_MODES:
                raise ValueError(f"{name} must be one of {LOCAL_CORRECTION_MODES}, got {getattr(self, name)!r}")
        if self.click_guard_reach < 0:
            raise ValueError(f"click_guard_reach must be >= 0 (0 = no bound), got {self.click_guard_reach}")
        if self.click_guard_reach_scope not in REACH_SCOPES:
            raise ValueError(f"click_guard_reach_scope must be one of {REACH_SCOPES}, "
                             f"got {self.click_guard_reach_scope!r}")
        if self.click_mode not in CLICK_MODES:
            raise ValueError(f"click_mode must be one of {CLICK_MODES}, got {self.click_mode!r}")
        if not self.point_counts or min(self.point_counts) < 1:
            raise ValueError("point_counts must be positive integers")
        if self.n_steps < 0:
            raise ValueError("n_steps must be >= 0")

    @property
    def edge_reach(self) -> EdgeReach | None:
        """The guard's edge-reach bound as the annotator's click path takes it (None: unbounded)."""
        return EdgeReach(self.click_guard_reach, self.click_guard_reach_scope) if self.click_guard_reach else None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["point_counts"] = list(self.point_counts)
        return d


@dataclass
class PromptState:
    """Prompts of N objects in low-resolution pixel coordinates ((x, y) pixel indices, SAM's convention)."""

    points: np.ndarray  # (N, P, 2) float64, may have P = 0
    labels: np.ndarray  # (N, P) int64: 1 positive, 0 negative, -1 padding (SAM's "not a point")
    boxes: np.ndarray | None  # (N, 4) (x0, y0, x1, y1), exclusive upper corners
    mask_input: torch.Tensor | None = None  # (N, 1, 256, 256) previous logits
    start: str = "box"
    new_clicks: int = 0  # clicks per object added by the last corrective step (0: the first prompt)

    def to_model(self, scale: float, device: torch.device) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, torch.Tensor | None]:
        pts = None
        if self.points.shape[1] > 0:
            pts = (torch.as_tensor(self.points * scale, dtype=torch.float32, device=device),
                   torch.as_tensor(self.labels, dtype=torch.int64, device=device))
        boxes = None if self.boxes is None else torch.as_tensor(self.boxes * scale, dtype=torch.float32, device=device)
        return pts, boxes


def start_prompts(gt: np.ndarray, rng: np.random.Generator, cfg: PromptConfig) -> PromptState:
    """Initial prompts for every object of ``gt`` (N, H, W) bool: all boxes or all K points (one choice per batch,
    as micro_sam's trainer; token counts must agree inside one decoder call)."""
    n = gt.shape[0]
    if rng.random() < cfg.p_box:
        boxes = []
        for m in gt:
            if rng.random() < cfg.p_jitter:
                boxes.append(jittered_box(m, rng, cfg.box_jitter))
            else:
                boxes.append(tight_box(m))
        return PromptState(np.zeros((n, 0, 2)), np.zeros((n, 0), np.int64), np.stack(boxes), start="box")
    k = int(cfg.point_counts[int(rng.integers(len(cfg.point_counts)))])
    pts = np.stack([random_positive_points(m, k, rng) for m in gt])
    return PromptState(pts, np.ones((n, k), np.int64), None, start=f"points{k}")


def corrective_clicks(gt: np.ndarray, pred: np.ndarray, rng: np.random.Generator, cfg: PromptConfig
                      ) -> tuple[np.ndarray, np.ndarray]:
    """New clicks for every object: ``largest`` -> (N, 1, 2), ``micro_sam`` -> (N, 2, 2); labels (N, c) with -1
    where nothing is left to correct (a padding point SAM ignores)."""
    n = gt.shape[0]
    if cfg.click_mode == "micro_sam":
        from micro_sam.prompt_generators import IterativePromptGenerator

        state = np.random.get_state()
        try:  # micro_sam samples with the global numpy state: seed it from our generator, restore afterwards
            np.random.seed(int(rng.integers(2**32)))
            coords, labels, _, _ = IterativePromptGenerator()(
                torch.from_numpy(gt[:, None].astype(np.float32)), torch.from_numpy(pred[:, None].astype(np.float32)))
        finally:
            np.random.set_state(state)
        # micro_sam already returns SAM's (x, y) order; labels 1 / 0 (it always finds a location)
        return coords.numpy().astype(np.float64), labels.numpy().astype(np.int64)
    pts = np.zeros((n, 1, 2))
    labs = np.full((n, 1), -1, np.int64)
    for i in range(n):
        strategy = "random" if rng.random() < cfg.p_random_click else "center"
        click = corrective_click(gt[i], pred[i], strategy, rng if strategy == "random" else None)
        if click is not None:
            pts[i, 0] = click.point
            labs[i, 0] = click.label
    return pts, labs


def policy_settings(name: str) -> dict:
    """The prompt settings (flat field names) that make training's simulated click path the named click policy's
    (:mod:`napari_robustmedsam.annotation.click_policy`) up to the model's mask: its local corrections, guard and
    the edge reach that acts with its click refinement. The refinement itself runs after the model at full
    resolution and is not simulated: it changes what the user sees, not what the model is given (the model's own
    logits are fed back), so the simulated clicks are placed on the model's mask's errors."""
    from napari_robustmedsam.annotation.click_policy import click_policy

    try:
        policy = click_policy(name)
    except ValueError as err:
        raise TrainingError(str(err)) from None
    reach = policy.guard_reach
    return dict(local_corrections=policy.local_corrections, click_guard=policy.click_guard,
                click_guard_reach=0.0 if reach is None else reach.factor,
                click_guard_reach_scope="all" if reach is None else reach.scope)


def add_clicks(state: PromptState, pts: np.ndarray, labels: np.ndarray) -> PromptState:
    return PromptState(np.concatenate([state.points, pts], axis=1), np.concatenate([state.labels, labels], axis=1),
                       state.boxes, state.mask_input, state.start, new_clicks=pts.shape[1])


def shown_logits(state: PromptState, logits: torch.Tensor, cfg: PromptConfig) -> torch.Tensor:
    """The logits the annotator would show after predicting ``logits`` from ``state``: merged locally around the
    last step's clicks when ``cfg.local_corrections`` applies to this start, then guarded when ``cfg.click_guard``
    does (both only when the previous logits were fed back, as in the annotator and the evaluation); else
    ``logits`` unchanged. Padding clicks (label -1, nothing left to correct) add no region, so such an object keeps
    its previous mask."""
    if state.new_clicks == 0 or state.mask_input is None:
        return logits
    has_box = state.boxes is not None
    valid = state.labels >= 0
    if local_corrections_apply(cfg.local_corrections, has_box=has_box):
        pts = state.points[:, -state.new_clicks:]
        new_valid = valid[:, -state.new_clicks:]
        logits = merge_local_correction(state.mask_input, logits, [pts[i][new_valid[i]] for i in range(pts.shape[0])])
    if local_corrections_apply(cfg.click_guard, has_box=has_box):
        # an object with only a padding click gets n_new = 0: no change is allowed, its mask stays
        entries = [(state.points[i][valid[i]], state.labels[i][valid[i]], int(valid[i, -state.new_clicks:].sum()))
                   for i in range(state.points.shape[0])]
        logits = guard_clicks(state.mask_input, logits, entries, edge_reach=cfg.edge_reach)
    return logits
