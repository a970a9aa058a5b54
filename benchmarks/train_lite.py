"""Benchmark: fine-tune the lite robust decoder (LiteMedSAM encoder) on a fixed train split of
../shared/data/medseg, then evaluate on the held-out split, clean and degraded (LQ-3, LQ-3+), next to
LiteMedSAM and the ablation without consistency terms.

    python benchmarks/train_lite.py [--data ../shared/data/medseg] [--out runs/bench-train-lite]
                                    [--budget-min 45] [--heldout 0.2] [--seed 0] [--skip-train]

Steps (all seeded):
1. split: per dataset, a seeded 20 % of the images is held out (``split.json``); symlinked folders
   ``<out>/split/train`` and ``<out>/split/heldout`` in the medseg layout (with MANIFEST.json for the modalities);
2. features: the encoder runs once on every training image and its cached degraded variants (shared cache
   ``<out>/cache``), so both trainings below only run the decoder;
3. training: ``python -m training.fit --preset robust-lite`` (RobustMedSAM losses) and the same with
   ``--no-consistency`` (plain decoder fine-tuning, the papers' ablation), run side by side, each with a
   wall-clock budget of ``--budget-min`` minutes (samples/s and peak RSS are read from their log.json);
4. evaluation on the held-out split with the evaluation package's protocol (``training.evaluation``: the same
   seeded prompts, degradations, corrective clicks and metrics as ``python -m training.evaluate``): tight box,
   3 random positive points, and box + 5 corrective clicks (centre of the largest error region, previous
   logits fed back), Dice at the original resolution, for clean, LQ-3 and LQ-3+ images. The encoder is shared
   by the three models, so every image is embedded once; frozen identity AMFG blocks (exact zeros) are skipped.

Writes ``<out>/results.json`` and ``<out>/results.md`` (tables + targets check).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

from training.data_split import make_split  # noqa: E402

CONDITIONS = ("clean", "LQ-3", "LQ-3+")
PROMPTS = ("box", "points3", "iter_box")


def precompute(out: Path, seed: int, variants: int | None = None) -> dict:
    """Run the training's feature preparation once (same settings as the preset) so both runs reuse it."""
    from training.finetune import split_items
    from training.finetune.data import items_from_folder
    from training.finetune.pairs import FeatureBank
    from training.finetune.heads import load_base_model
    from training.finetune.presets import PRESETS

    preset = PRESETS["robust-lite"]
    t0 = time.perf_counter()
    items = items_from_folder(out / "split" / "train", min_object_px=20)
    train, val = split_items(items, preset.val_fraction, seed=seed)
    loaded = load_base_model("litemedsam_robust", "cpu")
    bank = FeatureBank(loaded.model, loaded.preprocessing, variants=variants or preset.settings["variants"], seed=seed,
                       cache_dir=str(out / "cache"), memory_bytes=0)
    bank.add_items(train)
    bank.prepare(progress=lambda d, t, m: print(f"  {m} [{d}/{t}]", flush=True) if d % 50 == 0 or d == t else None)
    from napari_robustmedsam.prompting import derive_seed

    vbank = FeatureBank(loaded.model, loaded.preprocessing, variants=1, levels=("LQ-3",),
                        seed=derive_seed(seed, "validation"), cache_dir=str(out / "cache"), memory_bytes=0)
    vbank.add_items(val)
    vbank.prepare()
    return {"train_images": len(train), "val_images": len(val), "seconds": time.perf_counter() - t0,
            "encoded": bank.stats["encoded"] + vbank.stats["encoded"]}


def train(out: Path, budget_min: float, seed: int, variants: int | None = None) -> dict:
    runs = {"robust": [], "ablation": ["--no-consistency"]}
    procs = {}
    for name, extra in runs.items():
        cmd = [sys.executable, "-m", "training.fit", "--data", str(out / "split" / "train"), "--preset", "robust-lite",
               "--out", str(out / name), "--cache", str(out / "cache"), "--seed", str(seed), "--time-budget",
               str(budget_min), "--epochs", "100", "--threads", "1", "--no-progress", *extra]
        if variants:
            cmd += ["--variants", str(variants)]
        if (out / name / "train_state.pt").exists():
            cmd.append("--resume")
        log = open(out / f"{name}.log", "a")
        print("$", " ".join(cmd), flush=True)
        procs[name] = (subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT), log)
    result = {}
    for name, (proc, log) in procs.items():
        code = proc.wait()
        log.close()
        info = json.loads((out / name / "log.json").read_text()) if (out / name / "log.json").exists() else {}
        result[name] = {"exit_code": code, "samples_per_s": info.get("samples_per_s"),
                        "peak_rss_mb": info.get("peak_rss_mb"), "train_seconds": info.get("train_seconds"),
                        "feature_seconds": info.get("feature_seconds"), "planes_seen": info.get("planes_seen"),
                        "iterations": len(info.get("steps", [])), "best": info.get("best"),
                        "stopped": info.get("stopped")}
    return result


def _fast_model(path: str | None):
    """A Predictor for a checkpoint (or LiteMedSAM for None) whose frozen zero-output AMFG blocks are skipped."""
    from napari_robustmedsam.checkpoints import load_model
    from napari_robustmedsam.engine.predictor import Predictor
    from training.finetune.heads import AMFG_NAMES, _outputs_zero, _ZeroAMFG

    loaded = load_model(path or "litemedsam", device="cpu", progress=False)
    model = loaded.model
    if loaded.decoder == "robust":
        dec = model.mask_decoder
        for name in AMFG_NAMES:
            block = getattr(dec, name)
            if not _outputs_zero(block):
                raise RuntimeError(f"{path}: {name} is trained (non-zero output); evaluate with training.evaluate")
            dec._modules[name] = _ZeroAMFG(dec.transformer_dim // 8, 1 if name == "fourier_mask_features" else 4)
    return loaded, Predictor(model.eval(), loaded.preprocessing, loaded.box_primary)


def evaluate(out: Path, models: dict[str, str | None], seed: int, steps: int = 5, max_objects: int = 3,
             per_dataset: int | None = None) -> list[dict]:
    import torch

    from napari_robustmedsam.engine.predictor import ImageEmbedding
    from training.evaluation.dataset import discover, select_objects
    from training.evaluation.runner import Condition, EvalConfig, run_prompt_mode

    torch.set_num_threads(2)
    cfg = EvalConfig(prompts=PROMPTS, steps=steps, seed=seed, max_objects=max_objects)
    handles = {name: _fast_model(path) for name, path in models.items()}
    base_loaded, base_pred = handles[next(iter(handles))]
    from napari_robustmedsam.prompting import rng_for

    samples = []
    for d in discover(out / "split" / "heldout"):
        chosen = sorted(d.samples, key=lambda s: s.key)
        if per_dataset:
            idx = rng_for(seed, "bench-eval", d.name).permutation(len(chosen))[:per_dataset]
            chosen = [chosen[i] for i in sorted(idx)]
        samples.extend(chosen)
    conds = [Condition("clean"), Condition("LQ-3", "LQ-3"), Condition("LQ-3+", "LQ-3+")]
    rows: list[dict] = []
    t0 = time.perf_counter()
    for k, sample in enumerate(samples):
        image, labels = sample.load()
        objects = select_objects(labels, sample.key, seed, cfg.objects, cfg.min_object_px, cfg.max_objects)
        if not objects:
            continue
        for cond in conds:
            img, _ = cond.apply(image, sample.modality, sample.key, seed)
            with torch.no_grad():
                emb0 = base_pred.compute_embedding(img)  # same encoder in every model
            for name, (loaded, pred) in handles.items():
                feats = {"image_embeddings": emb0.features["image_embeddings"]}
                if loaded.decoder == "robust":
                    feats["robust_image_features"] = torch.zeros(1, 32, 256, 256)
                emb = ImageEmbedding(feats, emb0.frame)
                for prompt in PROMPTS:
                    for row in run_prompt_mode(pred, emb, objects, prompt, sample.key, cfg):
                        rows.append({"model": name, "condition": cond.name, "sample": sample.key,
                                     "dataset": sample.dataset, **{k2: row[k2] for k2 in
                                                                   ("object_id", "prompt", "step", "dice", "iou")}})
        if (k + 1) % 5 == 0:
            print(f"  evaluated {k + 1}/{len(samples)} images ({time.perf_counter() - t0:.0f} s)", flush=True)
    return rows


def summarise(rows: list[dict]) -> dict:
    import pandas as pd

    df = pd.DataFrame(rows)
    out: dict = {}
    for (model, cond, prompt, step), g in df.groupby(["model", "condition", "prompt", "step"]):
        out.setdefault(model, {}).setdefault(cond, {}).setdefault(prompt, {})[int(step)] = {
            "dice": round(float(g["dice"].mean()), 4), "n": int(len(g))}
    return out


def report(out: Path, summary: dict, meta: dict) -> str:
    lines = ["# benchmarks/train_lite.py results", "",
             f"Train split: {meta.get('train_images')} images; held-out split: {meta.get('heldout_images')} images, "
             f"{meta.get('evaluated_images')} evaluated; objects per image <= 3; Dice at the original resolution.",
             ""]
    models = list(summary)
    lines.append("| model | condition | box | 3 points | iter box step 0..5 |")
    lines.append("|---|---|---|---|---|")
    for model in models:
        for cond in CONDITIONS:
            s = summary[model].get(cond, {})
            box = s.get("box", {}).get(0, {}).get("dice")
            pts = s.get("points3", {}).get(0, {}).get("dice")
            it = s.get("iter_box", {})
            its = " / ".join(f"{it[k]['dice']:.3f}" for k in sorted(it))
            lines.append(f"| {model} | {cond} | {box} | {pts} | {its} |")
    lines.append("")
    ft = summary.get("finetuned", {})
    base = summary.get("litemedsam", {})
    checks = []
    for cond in ("LQ-3", "LQ-3+"):
        s = ft.get(cond, {})
        b = base.get(cond, {})
        p3 = s.get("points3", {}).get(0, {}).get("dice")
        bx, bbx = s.get("box", {}).get(0, {}).get("dice"), b.get("box", {}).get(0, {}).get("dice")
        it = s.get("iter_box", {})
        last = it.get(5, {}).get("dice")
        mono = all(it[k + 1]["dice"] >= it[k]["dice"] for k in range(5) if k in it and k + 1 in it)
        checks.append(f"- {cond}: 3-point Dice {p3} (target >= 0.55: {'met' if p3 is not None and p3 >= 0.55 else 'NOT met'}); "
                      f"box {bx} vs LiteMedSAM {bbx} ({'above' if bx is not None and bbx is not None and bx > bbx else 'NOT above'}); "
                      f"after 5 clicks {last} (target >= 0.80: {'met' if last is not None and last >= 0.8 else 'NOT met'}); "
                      f"never falling: {'yes' if mono else 'NO'}")
    cb, cbb = ft.get("clean", {}).get("box", {}).get(0, {}).get("dice"), base.get("clean", {}).get("box", {}).get(0, {}).get("dice")
    if cb is not None and cbb is not None:
        checks.append(f"- clean box Dice {cb} vs LiteMedSAM {cbb}: drop {cbb - cb:+.4f} (target: drop <= 0.01: "
                      f"{'met' if cbb - cb <= 0.01 else 'NOT met'})")
    lines += ["## Targets (fine-tuned model, held-out split)", ""] + checks + [""]
    tr = meta.get("training", {})
    for name, info in tr.items():
        lines.append(f"- training `{name}`: {info.get('iterations')} iterations, {info.get('planes_seen')} images in "
                     f"{(info.get('train_seconds') or 0):.0f} s of training ({(info.get('samples_per_s') or 0):.3f} "
                     f"images/s), peak RSS {(info.get('peak_rss_mb') or 0):.0f} MB, stopped: {info.get('stopped')}, "
                     f"best epoch {(info.get('best') or {}).get('epoch')}")
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "medseg"))
    p.add_argument("--out", default="runs/bench-train-lite")
    p.add_argument("--budget-min", type=float, default=45.0, help="training wall-clock budget per run (minutes)")
    p.add_argument("--heldout", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-per-dataset", type=int, default=None,
                   help="train on a seeded subset of N images per dataset of the train split (CPU budget)")
    p.add_argument("--eval-per-dataset", type=int, default=None,
                   help="evaluate a seeded subset of N held-out images per dataset (CPU budget)")
    p.add_argument("--variants", type=int, default=None, help="degraded variants per training image (preset: 2)")
    p.add_argument("--skip-train", action="store_true", help="only evaluate existing runs")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("ROBUSTMEDSAM_CACHE_DIR", str(out / "cache"))
    meta: dict = {"args": vars(args), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    t0 = time.perf_counter()
    split = make_split(Path(args.data), out, args.heldout, args.seed, args.train_per_dataset)
    meta["train_images"], meta["heldout_images"] = len(split["train"]), len(split["heldout"])
    print(f"split: {len(split['train'])} train, {len(split['heldout'])} held out", flush=True)
    if not args.skip_train:
        meta["precompute"] = precompute(out, args.seed, args.variants)
        print(f"features: {meta['precompute']}", flush=True)
        meta["training"] = train(out, args.budget_min, args.seed, args.variants)
    else:
        meta["training"] = {}
        for name in ("robust", "ablation"):
            if (out / name / "log.json").exists():
                info = json.loads((out / name / "log.json").read_text())
                meta["training"][name] = {k: info.get(k) for k in ("samples_per_s", "peak_rss_mb", "train_seconds",
                                                                   "planes_seen", "best", "stopped")}
                meta["training"][name]["iterations"] = len(info.get("steps", []))
    print(f"training: {json.dumps(meta['training'])}", flush=True)
    models = {"litemedsam": None}
    for name, label in (("robust", "finetuned"), ("ablation", "ablation_no_consistency")):
        ckpt = out / name / "best.pth"
        if ckpt.exists():
            models[label] = str(ckpt)
    rows = evaluate(out, models, args.seed, per_dataset=args.eval_per_dataset)
    meta["evaluated_images"] = len({r["sample"] for r in rows})
    import pandas as pd

    pd.DataFrame(rows).to_csv(out / "measurements.csv", index=False)
    summary = summarise(rows)
    meta["summary"] = summary
    meta["total_seconds"] = time.perf_counter() - t0
    (out / "results.json").write_text(json.dumps(meta, indent=1, default=str))
    print(report(out, summary, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
