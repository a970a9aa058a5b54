"""How long a fine-tune from the widget will take, said before it starts.

The estimate adds up the run's work, each part times its cost on this machine:

- model loads (each training run and each judged model loads one);
- image encodings (every labelled plane once per cached variant, plus the degraded copy of each held-back plane;
  the feature cache makes later runs on the same planes free);
- training iterations (epochs x iterations per epoch of every run, cut at the time budget when one is set);
- decoder calls (the per-epoch validation and the never-worse judging of both models).

Costs are those measured by this machine's last fine-tune with the same preset (:func:`remember_costs` writes
them after every run), else :data:`FALLBACK_COSTS`, measured once on the development CPU with
``benchmarks/finetune_costs.py`` (figures and machine in docs/results/finetune-tab/results.md).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from napari_robustmedsam.io.atomic import atomic_write_path

from .never_worse import JUDGE_CLICKS, JUDGE_MAX_OBJECTS, HoldoutPlan, judge_level_of

#: seconds per model load, image encoding, decoder call, and training iteration of each preset, measured by
#: benchmarks/finetune_costs.py (see the module docstring)
FALLBACK_COSTS: dict = {
    "load_s": 0.4,
    "encode_s": 2.0,
    "decode_s": 0.07,
    "iteration_s": {"quick": 9.0, "robust-lite": 4.8, "pge-lite": 13.4, "pge-lite-fast": 3.0},
    "iteration_s_unknown_preset": 13.4,
}
_PARTS = ("load_s", "encode_s", "decode_s")


@dataclass
class Costs:
    load_s: float
    encode_s: float
    decode_s: float
    iteration_s: float
    source: str  # where the figures come from, in words


def costs_file() -> Path:
    from .pairs import default_training_cache_dir

    return default_training_cache_dir().parent / "finetune-costs.json"


def _read_costs_file() -> dict:
    try:
        data = json.loads(costs_file().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def known_costs(preset: str | None) -> Costs:
    """This machine's last measured costs for ``preset``, else the fallback figures."""
    mine = _read_costs_file().get(str(preset))
    if isinstance(mine, dict) and all(isinstance(mine.get(k), (int, float)) for k in _PARTS + ("iteration_s",)):
        return Costs(*(float(mine[k]) for k in _PARTS), float(mine["iteration_s"]),
                     f"measured on this machine by the last '{preset}' fine-tune")
    it = FALLBACK_COSTS["iteration_s"].get(str(preset), FALLBACK_COSTS["iteration_s_unknown_preset"])
    return Costs(*(float(FALLBACK_COSTS[k]) for k in _PARTS), float(it),
                 "measured on the development CPU; the estimate adapts to this machine after the first fine-tune")


def remember_costs(preset: str | None, measured: dict) -> None:
    """Keep the costs measured by a run (only the parts it measured replace the previous ones)."""
    data = _read_costs_file()
    old = data.get(str(preset)) if isinstance(data.get(str(preset)), dict) else {}
    new = {**old, **{k: float(v) for k, v in measured.items() if isinstance(v, (int, float)) and v > 0}}
    if not new:
        return
    data[str(preset)] = new
    path = costs_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write_path(path) as tmp:
            Path(tmp).write_text(json.dumps(data, indent=1))
    except OSError:
        pass  # an estimate is a courtesy: a read-only cache folder must not fail the run


def run_budgets(total_s: float | None, runs: int) -> list[float | None]:
    """The training-time budget of each run: the user's budget is for the whole fine-tune, its folds included."""
    if total_s is None:
        return [None] * runs
    return [float(total_s) / max(1, runs)] * runs


def iterations_per_run(cfg, n_train: int) -> int:
    per_epoch = cfg.steps_per_epoch or max(1, math.ceil(n_train / cfg.batch_size))
    return int(cfg.epochs * per_epoch)


@dataclass
class Estimate:
    seconds: float
    iterations: int
    encodings: int
    decodes: int
    loads: int
    costs: Costs
    capped_by_budget: bool

    def text(self) -> str:
        c = self.costs
        minutes = self.seconds / 60.0
        head = f"about {minutes:.0f} min" if minutes >= 1.5 else f"about {max(1, round(self.seconds)):.0f} s"
        budget = " (training cut at the time budget)" if self.capped_by_budget else ""
        return (f"{head}: {self.iterations} iterations x {c.iteration_s:.2g} s{budget} + {self.encodings} image "
                f"encodings x {c.encode_s:.2g} s + {self.loads} model loads x {c.load_s:.2g} s + {self.decodes} "
                f"decoder calls x {c.decode_s:.2g} s (costs {c.source})")


def zoomed_objects(items) -> int:
    """The judged objects of ``items`` whose box the annotator's zoom decodes in a crop: judging encodes that crop
    once per model (an upper bound: a model whose zoom is off, such as pge-lite-fast, skips it)."""
    from napari_robustmedsam.engine.focus_crop import plan_crop
    from napari_robustmedsam.prompting import tight_box

    return sum(plan_crop(tight_box(it.labels == oid), it.labels.shape) is not None
               for it in items for oid in it.object_ids[:JUDGE_MAX_OBJECTS])


def estimate(plan: HoldoutPlan, cfg, costs: Costs, *, rank_planes: int = 0) -> Estimate:
    """The expected wall time of :class:`~.user_run.UserFinetune` on ``plan`` with settings ``cfg``.

    ``rank_planes``: unlabelled planes ranked afterwards ("which image next": two encodings each)."""
    trains = [f.train for f in plan.folds] if plan.mode != "none" else [plan.all_items]
    if plan.mode == "folds":
        trains.append(plan.all_items)
    budgets = run_budgets(cfg.time_budget_s, len(trains))
    iterations, train_s, capped = 0, 0.0, False
    for items, budget in zip(trains, budgets):
        n = iterations_per_run(cfg, len(items))
        t = n * costs.iteration_s
        if budget is not None and t > budget:
            n, t, capped = max(1, int(budget / costs.iteration_s)), budget, True
        iterations += n
        train_s += t
    n_all, n_held = len(plan.all_items), len(plan.held_back)
    encodings = n_all * (cfg.variants + 1) + n_held  # each variant once (cached), + held-back degraded copies
    judged = 2 if judge_level_of(cfg) else 1  # conditions judged: as labelled, and degraded copies
    encodings += 2 * judged * n_held + 2 * rank_planes  # judging: both models encode the held-back planes; ranking
    encodings += 2 * judged * zoomed_objects(plan.held_back)  # judging: each model's crop of a small object (zoom)
    held_objects = sum(min(len(it.object_ids), JUDGE_MAX_OBJECTS) for it in plan.held_back)
    val_objects = sum(min(len(it.object_ids), cfg.val_max_objects) for it in plan.held_back)
    decodes = 2 * judged * held_objects * (1 + JUDGE_CLICKS) + (cfg.epochs + 1) * val_objects * 4
    loads = len(trains) + (1 + len(plan.folds) if plan.mode != "none" else 0)
    seconds = train_s + encodings * costs.encode_s + loads * costs.load_s + decodes * costs.decode_s
    return Estimate(seconds, iterations, encodings, decodes, loads, costs, capped)
