"""A user's fine-tune from the widget: train on their labelled planes, check the result on held-back ones, decide.

:class:`UserFinetune` runs, in order (see :mod:`.never_worse` for the split and the rule):

1. the training run(s) of :class:`~.trainer.Trainer` with the chosen preset: one run on the planes not held back
   (``hold-out``), or one run per fold and a final run on every plane (``folds``); the held-back planes are each
   run's validation set, so the live curve shows their Dice at every validation (epoch 0 = before training);
2. judging: the user's current model and the candidate (the last checkpoint of the run, not the epoch that scored
   best on the held-back planes, so that they stay unseen by every choice) on the held-back planes;
3. the decision, saved in the candidate's metadata and in ``decision.json``;
4. the costs it measured, for the next estimate (:mod:`.time_estimate`).

No Qt here: the widget passes callbacks (per iteration, per validation, progress) and a cancel flag.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from napari_robustmedsam.io.atomic import atomic_write_path

from .data import TrainItem, TrainingError
from .never_worse import (JUDGE_CLICKS, Decision, HoldoutPlan, decide, judge_level_of, plan_holdout, record_decision,
                          score_items)
from .time_estimate import remember_costs, run_budgets, zoomed_objects
from .trainer import Trainer


@dataclass
class UserRunResult:
    out_dir: Path
    plan: HoldoutPlan
    stopped: str  # "completed", "cancelled", "nan", "time budget" (of the last run)
    checkpoint: Path | None = None  # the candidate offered to the user
    decision: Decision | None = None
    message: str = ""
    notices: list[str] = field(default_factory=list)
    seconds: float = 0.0
    costs: dict = field(default_factory=dict)
    ranking: list = field(default_factory=list)  # next_image.RankedPlane, most uncertain first


class UserFinetune:
    """See the module docstring. ``current_model``: registry name or checkpoint of the model the user works with."""

    def __init__(self, cfg, items: list[TrainItem], out_dir: str | Path, *, preset_name: str | None,
                 current_model: str, hold_back_fraction: float, device: str = "cpu",
                 on_step: Callable[[dict], None] | None = None, on_epoch: Callable[[dict], None] | None = None,
                 progress: Callable[[int, int, str], None] | None = None, cancel: Callable[[], bool] | None = None,
                 notices: list[str] | None = None, rank: list | None = None) -> None:
        self.cfg = cfg
        self.items = list(items)
        self.out_dir = Path(out_dir)
        self.preset_name = preset_name
        self.current_model = str(current_model)
        self.plan = plan_holdout(self.items, hold_back_fraction, cfg.seed)
        self.device = device
        self.on_step, self.on_epoch, self.progress = on_step, on_epoch, progress
        self.cancel = cancel or (lambda: False)
        self.notices = list(notices or [])
        self._x0 = 0  # iterations of the earlier runs: one continuous x axis for the live curve
        self.measured: dict[str, list[float]] = {}
        self.rank = list(rank or [])  # next_image.PlaneToRank: unlabelled planes to rank after the decision

    # ---- helpers --------------------------------------------------------------------------------------
    def _measure(self, key: str, value: float) -> None:
        self.measured.setdefault(key, []).append(float(value))

    def _report(self, done: int, total: int, text: str) -> None:
        if self.progress is not None:
            self.progress(done, total, text)

    def _train(self, label: str, out: Path, train: list[TrainItem], val: list[TrainItem], budget: float | None):
        cfg = dataclasses.replace(self.cfg, time_budget_s=budget)
        x0 = self._x0

        def step(info: dict) -> None:
            if self.on_step is not None:
                self.on_step({**info, "run": label, "x": x0 + int(info["global_step"])})

        def epoch(row: dict) -> None:
            if self.on_epoch is not None:
                self.on_epoch({**row, "run": label, "x": x0 + int(trainer.global_step)})

        def prog(done: int, total: int, text: str) -> None:
            self._report(done, total, f"{label}: {text}")

        trainer = Trainer(cfg, out, train, val, progress=prog, cancel=self.cancel, on_step=step, on_epoch=epoch,
                          notices=self.notices)
        result = trainer.run()
        self._x0 += trainer.global_step
        for n in trainer.notices:
            if n not in self.notices:
                self.notices.append(n)
        encoded = trainer.bank.stats["encoded"] + trainer.val_bank.stats["encoded"]
        if encoded:
            self._measure("encode_s", trainer.feature_seconds / encoded)
        seconds = [s["seconds"] for s in trainer.step_log if isinstance(s.get("seconds"), float)]
        if seconds:
            self._measure("iteration_s", float(np.median(seconds)))
        return result

    def _load(self, source: str):
        from napari_robustmedsam.checkpoints import load_model
        from napari_robustmedsam.engine.predictor import Predictor

        t0 = time.perf_counter()
        loaded = load_model(str(source), device=self.device, progress=False)
        self._measure("load_s", time.perf_counter() - t0)
        return Predictor.from_loaded(loaded)

    def _judge(self, predictor, items: list[TrainItem], what: str, source: str) -> dict:
        from napari_robustmedsam.annotation.prompt_decoding import zoom_default

        t0 = time.perf_counter()
        # the zoom as the annotator opens this model (a fine-tuned checkpoint file: the annotator's default)
        zoom = zoom_default(source)
        # as labelled and, for a model trained to be robust, as degraded copies: a gain that shows only under
        # degradation is the point of the fine-tune (docs/results/user-loop/rule-judge-degraded.md)
        level = judge_level_of(self.cfg)
        scores = score_items(predictor, items, zoom=zoom, level=level, seed=self.cfg.seed, cancel=self.cancel,
                             progress=lambda d, t, s: self._report(d, t, f"judging {what}: {s}"))
        n_dec = sum(s.objects for s in scores.values()) * (1 + JUDGE_CLICKS)
        # the planes' encodings and the zoomed crops' are costed as encodings (the estimate counts both), not decodes
        n_enc = (len(items) + (zoomed_objects(items) if zoom else 0)) * (2 if level else 1)
        enc = float(np.mean(self.measured.get("encode_s", [0.0])))
        if n_dec:
            self._measure("decode_s", max(0.005, (time.perf_counter() - t0 - enc * n_enc) / n_dec))
        return scores

    # ---- the run ---------------------------------------------------------------------------------------
    def run(self) -> UserRunResult:
        t_start = time.perf_counter()
        plan = self.plan
        res = UserRunResult(self.out_dir, plan, "completed", notices=self.notices)
        self.notices.append(plan.describe())
        if plan.mode == "folds":
            runs = [(f"fold {i + 1}/{len(plan.folds)}", self.out_dir / f"fold-{i + 1}", f.train, f.held)
                    for i, f in enumerate(plan.folds)]
            runs.append(("final (all planes)", self.out_dir, plan.all_items, []))
        elif plan.mode == "hold-out":
            runs = [("training", self.out_dir, plan.folds[0].train, plan.folds[0].held)]
        else:
            runs = [("training", self.out_dir, plan.all_items, [])]
        budgets = run_budgets(self.cfg.time_budget_s, len(runs))
        last_of: list[Path | None] = []
        for (label, out, train, val), budget in zip(runs, budgets):
            result = self._train(label, out, train, val, budget)
            last_of.append(result.last)
            if result.stopped in ("cancelled", "interrupted", "nan"):
                res.stopped, res.message = result.stopped, result.message
                res.checkpoint = result.last if out == self.out_dir else None
                return self._finish(res, t_start)
            res.stopped = result.stopped
        res.checkpoint = last_of[-1]
        if res.checkpoint is None:
            raise TrainingError("the training run wrote no checkpoint")
        current_predictor = candidate_predictor = None
        if plan.mode != "none" and not self.cancel():
            current_predictor = self._load(self.current_model)
            current = self._judge(current_predictor, plan.held_back, "the current model", self.current_model)
            candidate: dict = {}
            for fold, path in zip(plan.folds, last_of):
                if self.cancel():
                    break
                candidate_predictor = self._load(str(path))
                candidate.update(self._judge(candidate_predictor, fold.held, "the fine-tuned model", str(path)))
            if self.cancel():
                res.stopped = "cancelled"
                res.message = "cancelled while judging; the current model is kept"
                return self._finish(res, t_start)
            res.decision = decide(current, candidate, mode=plan.mode, current_model=self.current_model,
                                  candidate_path=str(res.checkpoint))
        else:
            res.decision = decide({}, {}, mode=plan.mode, current_model=self.current_model,
                                  candidate_path=str(res.checkpoint))
        record_decision(res.checkpoint, res.decision)
        with atomic_write_path(self.out_dir / "decision.json") as tmp:
            Path(tmp).write_text(json.dumps(res.decision.to_dict(), indent=1, default=float))
        if self.rank and not self.cancel():
            res.ranking = self._rank(res, current_predictor, candidate_predictor)
        return self._finish(res, t_start)

    def _rank(self, res: UserRunResult, current_predictor, candidate_predictor) -> list:
        """Which image next, by the model the user now has (the candidate if it was swapped in)."""
        from .next_image import rank_planes, spread

        if res.decision is not None and res.decision.swapped:
            if self.plan.mode != "hold-out" or candidate_predictor is None:  # folds: the final model was not loaded
                candidate_predictor = self._load(str(res.checkpoint))
            predictor = candidate_predictor
        else:
            predictor = current_predictor or self._load(self.current_model)
        return rank_planes(predictor, spread(self.rank), seed=self.cfg.seed, cancel=self.cancel,
                           progress=lambda d, t, s: self._report(d, t, s))

    def _finish(self, res: UserRunResult, t_start: float) -> UserRunResult:
        res.seconds = time.perf_counter() - t_start
        res.costs = {k: float(np.median(v)) for k, v in self.measured.items() if v}
        remember_costs(self.preset_name, res.costs)
        return res


def describe_run(res: UserRunResult) -> dict[str, Any]:
    """JSON-ready summary of a run (for logs and tests)."""
    return {"out_dir": str(res.out_dir), "mode": res.plan.mode, "stopped": res.stopped,
            "checkpoint": None if res.checkpoint is None else str(res.checkpoint),
            "decision": None if res.decision is None else res.decision.to_dict(), "seconds": res.seconds,
            "costs": res.costs}
