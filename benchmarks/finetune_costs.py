"""Benchmark: what one fine-tune from the widget costs on this machine, per preset (the time estimate's fallback).

    python benchmarks/finetune_costs.py [--data ../shared/data/medseg] [--dataset ph2_dermoscopy] [--images 6]
                                        [--iterations 3] [--presets quick,robust-lite,pge-lite,pge-lite-fast]
                                        [--out runs/finetune-costs]

For each preset: the widget's own run (:class:`training.finetune.user_run.UserFinetune`) on the first ``--images``
images of one dataset, with the preset's recipe but one epoch of ``--iterations`` iterations, from an empty feature
cache, judged against LiteMedSAM. It prints and writes (``<out>/costs.json``) the costs the run measured: seconds
per model load, image encoding, training iteration (median) and decoder call, and the run's wall time next to the
estimate made before it from the fallback figures. The figures feed ``FALLBACK_COSTS`` in
``training/finetune/time_estimate.py``; they are this machine's, under whatever else it runs at the time.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "medseg"))
    p.add_argument("--dataset", default="ph2_dermoscopy")
    p.add_argument("--images", type=int, default=6)
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--presets", default="quick,robust-lite,pge-lite,pge-lite-fast")
    p.add_argument("--out", default="runs/finetune-costs")
    args = p.parse_args(argv)

    import dataclasses
    import os

    from training.finetune import items_from_folder
    from training.finetune.never_worse import plan_holdout
    from training.finetune.presets import PRESETS, preset_config
    from training.finetune.time_estimate import FALLBACK_COSTS, Costs, estimate
    from training.finetune.user_run import UserFinetune

    items = items_from_folder(args.data, datasets=[args.dataset])[: args.images]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = {}
    for name in args.presets.split(","):
        with tempfile.TemporaryDirectory() as cache:
            os.environ["ROBUSTMEDSAM_CACHE_DIR"] = cache  # an empty feature cache: every encoding is counted
            cfg = dataclasses.replace(preset_config(name), epochs=1, steps_per_epoch=args.iterations,
                                      time_budget_s=None, progress_bar=False, cache_dir=str(Path(cache) / "features"))
            fallback = Costs(FALLBACK_COSTS["load_s"], FALLBACK_COSTS["encode_s"], FALLBACK_COSTS["decode_s"],
                             FALLBACK_COSTS["iteration_s"].get(name, FALLBACK_COSTS["iteration_s_unknown_preset"]),
                             "fallback")
            plan = plan_holdout(items, PRESETS[name].val_fraction, cfg.seed)
            before = estimate(plan, cfg, fallback)
            res = UserFinetune(cfg, items, out / name, preset_name=None, current_model="litemedsam",
                               hold_back_fraction=PRESETS[name].val_fraction).run()
            rows[name] = {"costs": res.costs, "wall_s": res.seconds, "estimate_s_from_fallback": before.seconds,
                          "images": len(items), "iterations": args.iterations, "mode": res.plan.mode,
                          "decision": res.decision.summary() if res.decision else None}
            print(name, json.dumps(rows[name]), flush=True)
    (out / "costs.json").write_text(json.dumps(rows, indent=1))
    print(f"wrote {out / 'costs.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
