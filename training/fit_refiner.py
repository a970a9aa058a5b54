"""Train the learned click refiner (the ``learned`` click refinement) on a medseg-layout folder.

Usage::

    python -m training.fit_refiner --data runs/splits/train --out runs/refiner          # about 10 min on 2 cores
    python -m training.fit_refiner --data runs/splits/train --out runs/refiner --resume  # after an interruption
    python -m training.fit_refiner --data runs/splits/train --out runs/refiner --install # into the package

The samples (``training/refiner_samples.py``) are simulated corrective clicks on the images, clean and degraded.
A tenth of the images (seeded) is held back to pick the best epoch by its loss. Every epoch writes
``state.pt`` (network, optimiser, epoch, best) atomically, so ``--resume`` continues exactly where the run stopped;
``best.pt`` is the refiner file the engine reads (``engine/learned_refinement.py``). ``--install`` copies it to
``napari_robustmedsam/heads/click_refiner.pt`` with its provenance (``click_refiner.json``: the command, the data,
the date, the file's sha256 and the run's figures).
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from napari_robustmedsam.checkpoints.project_format import utc_now_iso
from napari_robustmedsam.checkpoints.safe_load import file_sha256, load_untrusted
from napari_robustmedsam.engine.learned_refinement import SHIPPED_REFINER, load_refiner, refiner_state
from napari_robustmedsam.io.atomic import atomic_write_path
from napari_robustmedsam.models.click_refiner import DEFAULT_WIDTH
from napari_robustmedsam.prompting import rng_for
from training.evaluation.dataset import discover
from training.refiner_samples import SampleSet, build_samples

HOLDOUT_SHARE = 0.1
PROVENANCE_PATH = SHIPPED_REFINER.with_suffix(".json")
LICENCE = ("Research and non-commercial use. The click refiner was trained from scratch on the development datasets, "
           "whose terms allow research or non-commercial use only (PH2, ACDC, DRIVE) or state no licence (DC1000), "
           "next to CC BY 4.0 (HC18) and CC0 (DSB2018) data; see training_datasets and docs/models.md.")


def _save(obj, path: Path) -> None:
    import torch

    with atomic_write_path(path) as tmp:
        torch.save(obj, tmp)


def split_by_image(groups: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Boolean (train, held back) over the samples: a seeded tenth of the images is held back."""
    images = np.unique(groups)
    n_back = max(1, int(round(HOLDOUT_SHARE * len(images)))) if len(images) > 1 else 0
    back = set(rng_for(seed, "refiner-holdout").choice(images, size=n_back, replace=False).tolist()) if n_back else set()
    held = np.isin(groups, list(back))
    return ~held, held


def _augment(x, t, d, rng):
    """The same random flip / 90 degree turn of inputs, targets and disks (the window has no preferred side)."""
    import torch

    k = int(rng.integers(4))
    flip = bool(rng.integers(2))
    out = []
    for a in (x, t, d):
        a = torch.rot90(a, k, dims=(-2, -1))
        out.append(torch.flip(a, dims=(-1,)) if flip else a)
    return out


def disk_loss(logits, target, disk):
    """Binary cross-entropy over the disk's pixels, plus a soft Dice of the disk's foreground."""
    import torch.nn.functional as F

    w = disk.float()
    bce = (F.binary_cross_entropy_with_logits(logits, target.float(), reduction="none") * w).sum() / w.sum().clamp(min=1)
    p = logits.sigmoid() * w
    tf = target.float() * w
    dice = 1 - (2 * (p * tf).sum() + 1) / (p.sum() + tf.sum() + 1)
    return bce + dice


def evaluate(net, data: SampleSet, index: np.ndarray, batch: int = 256) -> dict:
    import torch

    net.eval()
    loss = agree = pixels = 0.0
    with torch.inference_mode():
        for s in range(0, len(index), batch):
            i = index[s:s + batch]
            x = torch.from_numpy(data.inputs[i].astype(np.float32))
            t, d = torch.from_numpy(data.targets[i]), torch.from_numpy(data.disks[i])
            out = net(x)[:, 0]
            loss += float(disk_loss(out, t, d)) * len(i)
            agree += float((((out > 0) == t) & d).sum())
            pixels += float(d.sum())
    net.train()
    return {"loss": loss / max(len(index), 1), "disk_accuracy": agree / max(pixels, 1)}


def train(data: SampleSet, out: Path, epochs: int, batch: int, lr: float, seed: int, resume: bool,
          time_budget_s: float | None = None, width: int = DEFAULT_WIDTH) -> dict:
    """Train (or continue) the refiner in ``out``; returns the run's log."""
    import torch

    from napari_robustmedsam.models.click_refiner import build_click_refiner

    torch.manual_seed(seed)
    net = build_click_refiner(width)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    train_idx, held_idx = (np.nonzero(m)[0] for m in split_by_image(data.groups, seed))
    log = {"samples": int(len(data.groups)), "train_samples": int(len(train_idx)), "held_back": int(len(held_idx)),
           "epochs": [], "best": None}
    start = 0
    state_path = out / "state.pt"
    if resume and state_path.is_file():
        state = load_untrusted(state_path, what="refiner training state")
        if int(state.get("width", DEFAULT_WIDTH)) != width:
            raise SystemExit(f"error: {state_path} was trained with --width {state.get('width', DEFAULT_WIDTH)}, "
                             f"not {width}; pass the same --width to resume, or a new --out")
        net.load_state_dict(state["net"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        log = json.loads(state["log"])
        start = int(state["epoch"])
        print(f"resumed after epoch {start}", flush=True)
    spent_before = float(log.get("train_seconds", 0.0))  # seconds of the epochs before a resume
    t0 = time.monotonic()
    for epoch in range(start + 1, epochs + 1):
        rng = rng_for(seed, "refiner-epoch", epoch)
        order = rng.permutation(train_idx)
        net.train()
        total = 0.0
        for s in range(0, len(order), batch):
            i = np.sort(order[s:s + batch])
            x = torch.from_numpy(data.inputs[i].astype(np.float32))
            t, d = torch.from_numpy(data.targets[i]), torch.from_numpy(data.disks[i])
            x, t, d = _augment(x, t, d, rng)
            loss = disk_loss(net(x)[:, 0], t, d)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(i)
        sched.step()
        row = {"epoch": epoch, "train_loss": total / len(order), **{f"held_{k}": v for k, v in
                                                                   evaluate(net, data, held_idx).items()}}
        log["epochs"].append(row)
        log["train_seconds"] = spent_before + time.monotonic() - t0
        print(json.dumps(row), flush=True)
        if log["best"] is None or row["held_loss"] < log["best"]["held_loss"]:
            log["best"] = row
            _save(refiner_state(net, {"trained": {"epoch": epoch, **row}}), out / "best.pt")
        _save({"net": net.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(), "epoch": epoch,
               "width": width,
               "log": json.dumps(log)}, state_path)
        if time_budget_s is not None and time.monotonic() - t0 > time_budget_s and epoch < epochs:
            log["stopped"] = "time budget"
            break
    else:
        log["stopped"] = "completed"
    return log


def install(best: Path, provenance: dict) -> Path:
    load_refiner(best)  # refuse to install a file the engine cannot read
    with atomic_write_path(SHIPPED_REFINER) as tmp:
        shutil.copyfile(best, tmp)
    provenance = {**provenance, "file": SHIPPED_REFINER.name, "sha256": file_sha256(SHIPPED_REFINER),
                  "size_bytes": SHIPPED_REFINER.stat().st_size}
    with atomic_write_path(PROVENANCE_PATH) as tmp:
        Path(tmp).write_text(json.dumps(provenance, indent=1) + "\n", encoding="utf-8")
    return SHIPPED_REFINER


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="a medseg-layout folder of images and masks (the training images)")
    p.add_argument("--out", required=True, help="the run's folder (samples, state.pt, best.pt, log.json)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--width", type=int, default=DEFAULT_WIDTH,
                   help="channels of the refiner's first level (the next levels have 2x and 4x)")
    p.add_argument("--variants", type=int, default=3, help="versions of each image: clean, then degraded ones")
    p.add_argument("--per-object", type=int, default=4, help="simulated clicks per object and version")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--time-budget", type=float, default=None, help="minutes of training (the samples not counted)")
    p.add_argument("--resume", action="store_true", help="continue from the run's state.pt")
    p.add_argument("--install", action="store_true", help="copy best.pt into the package with its provenance")
    args = p.parse_args(argv)
    data, out = Path(args.data), Path(args.out)
    if not data.is_dir():
        raise SystemExit(f"error: the data folder {data} does not exist; pass --data DIR (medseg layout)")
    if args.epochs < 1 or args.batch < 1 or args.width < 1:
        raise SystemExit("error: --epochs, --batch and --width must be at least 1")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    out.mkdir(parents=True, exist_ok=True)
    cache = out / f"samples-seed{args.seed}-v{args.variants}-k{args.per_object}.npz"
    if cache.is_file():
        with np.load(cache) as z:
            samples = SampleSet(z["inputs"], z["targets"], z["disks"], z["groups"])
    else:
        t0 = time.monotonic()
        samples = build_samples(str(data), args.seed, args.variants, args.per_object,
                                progress=lambda i, n, key: print(f"  samples {key} [{i}/{n}]", flush=True)
                                if i % 20 == 0 or i == n else None)
        with atomic_write_path(cache) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, inputs=samples.inputs, targets=samples.targets, disks=samples.disks, groups=samples.groups)
        print(f"{len(samples.groups)} samples in {time.monotonic() - t0:.0f} s", flush=True)
    log = train(samples, out, args.epochs, args.batch, args.lr, args.seed, args.resume,
                args.time_budget * 60 if args.time_budget else None, args.width)
    with atomic_write_path(out / "log.json") as tmp:
        Path(tmp).write_text(json.dumps(log, indent=1), encoding="utf-8")
    print(f"best epoch {log['best']['epoch']}: held-back loss {log['best']['held_loss']:.4f}, disk accuracy "
          f"{log['best']['held_disk_accuracy']:.4f}", flush=True)
    if args.install:
        command = shlex.join(["python", "-m", "training.fit_refiner", *(argv if argv is not None else sys.argv[1:])])
        images = sorted({s.key for info in discover(str(data)) for s in info.samples})
        provenance = {"command": command, "created_utc": utc_now_iso(), "licence": LICENCE,
                      "training_images": len(images), "training_datasets": sorted({k.split("/")[0] for k in images}),
                      "best": log["best"], "samples": log["samples"], "stopped": log.get("stopped"),
                      "train_seconds": log.get("train_seconds")}
        print(f"installed {install(out / 'best.pt', provenance)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
