"""A run's files: the checkpoints' metadata, the resumable state (train_state.pt), the logs (log.csv, log.json)
and the plot (training.png). Functions of the :class:`~.trainer.Trainer` whose run they record; the loop itself
never writes a file.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import resource
from pathlib import Path

import numpy as np
import torch

from napari_robustmedsam.checkpoints import make_metadata
from napari_robustmedsam.checkpoints import save_checkpoint as write_checkpoint
from napari_robustmedsam.checkpoints.project_format import atomic_torch_save
from napari_robustmedsam.checkpoints.safe_load import load_untrusted
from napari_robustmedsam.errors import UserFacingError
from napari_robustmedsam.io.atomic import atomic_write_path
from napari_robustmedsam.io.output_paths import check_output_folder

from .config import TrainConfig
from .data import TrainingError
from .options import NEVER

STATE_FORMAT = "napari-robustmedsam-train-state"
STATE_VERSION = 1
#: the settings a resumed run may change (the others must be those of the interrupted run)
RESUME_MAY_CHANGE = frozenset(f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("fingerprint") == NEVER)


# The files a run writes into its --out folder.
RUN_FILES = ("last.pth", "best.pth", "train_state.pt", "log.csv", "log.json", "training.png")


def check_run_outputs(out_dir: str | os.PathLike, *, inputs=(), resume: bool = False, overwrite: bool = False) -> Path:
    """Before any work: a run never writes over one of its inputs (the base checkpoint, a session, an image), and
    a new run does not replace an earlier run's files in ``out_dir`` unless ``overwrite`` (``--resume`` continues
    them instead)."""
    try:
        return check_output_folder(out_dir, RUN_FILES, inputs=inputs, overwrite=overwrite or resume)
    except UserFacingError as err:
        text = str(err)
        if "already exists" in text:
            text += " (or --resume to continue that run)"
        raise TrainingError(text) from None


def check_out_dir(out_dir: str | os.PathLike, create: bool = True) -> Path:
    """Make sure files can be written in ``out_dir`` (before any work is done); create it if ``create``.

    With ``create=False`` nothing is made on disk: the folder, or its nearest existing parent, must be a
    writable folder (a run that fails before it starts leaves no empty folder behind).
    """
    out = Path(out_dir).expanduser()
    if not create:
        existing = out
        while not existing.exists() and existing.parent != existing:
            existing = existing.parent
        if not existing.is_dir():
            raise TrainingError(f"cannot write to the output folder {out}: {existing} is a file; choose another --out")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise TrainingError(f"cannot write to the output folder {out}: no permission in {existing}; choose another --out")
        return out
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise TrainingError(f"cannot write to the output folder {out}: {err.strerror or err}; choose another --out") from None
    return out


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def checkpoint_metadata(tr, metrics: dict, kind: str) -> dict:
    """The project-format metadata of a checkpoint the run writes (base model, what was trained, the settings,
    the data and the metrics)."""
    loaded = tr.loaded
    cfg = tr.cfg
    extra_meta = tr.head.checkpoint_metadata(tr)
    return make_metadata(
        **extra_meta,
        architecture=loaded.architecture,
        decoder=loaded.decoder,
        preprocessing=loaded.preprocessing,
        preprocessing_reason=f"inherited from the fine-tuned base model {loaded.name}",
        box_primary=bool(cfg.prompts.p_box >= 1.0),
        provenance={
            "base_model": {
                "given": str(cfg.model),
                "name": loaded.name,
                "sha256": loaded.sha256,
                "path": str(loaded.checkpoint_path) if loaded.checkpoint_path else None,
                "layout": loaded.layout,
            },
            "trained": ["mask_decoder"] + (["image_encoder.neck (singular values)"] if tr.svd is not None else [])
            + tr.head.trained_parts(tr),
            "frozen": ["image_encoder" if tr.svd is None else "image_encoder except neck singular values",
                       "prompt_encoder"],
            "sources": [{"role": "base", "registry_name": loaded.name if loaded.checkpoint_path else None,
                         "filename": loaded.checkpoint_path.name if loaded.checkpoint_path else None,
                         "given": str(cfg.model), "sha256": loaded.sha256,
                         "prefixes": ["image_encoder", "prompt_encoder", "mask_decoder (initial)"]}],
        },
        extra={
            "training": {
                "kind": kind,
                "tool": "python -m training.fit",
                "hyperparameters": cfg.to_dict(),
                "data": tr.data_description,
                "epoch": tr.epoch,
                "global_step": tr.global_step,
                "metrics": metrics,
                "best": dict(tr.best),
                "world_size": tr.ctx.world_size,
                "consistency_terms": bool(cfg.weights.consistency),
            }
        },
    )


def save_checkpoint(tr, path: Path, metrics: dict, kind: str) -> Path:
    try:
        return write_checkpoint(path, tr.full_state_dict(), checkpoint_metadata(tr, metrics, kind))
    except UserFacingError as err:
        raise TrainingError(str(err)) from None


def save_state(tr, completed: bool) -> None:
    """train_state.pt: everything --resume needs to continue exactly (weights, optimiser, position, logs, RNG)."""
    state = {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "fingerprint": tr.cfg.fingerprint(),
        "config": tr.cfg.to_dict(),
        "epoch": tr.epoch,
        "step_in_epoch": tr.step_in_epoch,
        "global_step": tr.global_step,
        "train_seconds": tr.train_seconds,
        "planes_seen": tr.planes_seen,
        "decoder": tr._decoder_state(),
        "svd": None if tr.svd is None else {k: v.detach().cpu() for k, v in tr.svd.state_dict().items()},
        "enhancer": None if tr.model.feature_enhancer is None else {
            k: v.detach().cpu().clone() for k, v in tr.model.feature_enhancer.state_dict().items()},
        "optimizer": tr.optimizer.state_dict(),
        "history": tr.history,
        "step_log": tr.step_log,
        "best": dict(tr.best),
        "torch_rng": torch.get_rng_state(),
        "completed": bool(completed),
    }
    try:
        atomic_torch_save(state, tr.state_path)
    except UserFacingError as err:
        raise TrainingError(str(err)) from None


def load_state(tr) -> None:
    """Put the run saved in train_state.pt back into ``tr`` (after its setup); the settings must match."""
    if not tr.state_path.is_file():
        raise TrainingError(f"nothing to resume: {tr.state_path} does not exist (run without --resume first)")
    try:
        state = load_untrusted(
            tr.state_path,
            what="training state",
            source_hint="a fresh run (start without --resume, or choose another --out)",
            fix="training.fit writes only tensors and numbers there, so this file was not written by it or was "
            "altered: delete it and start without --resume, or choose another --out",
        )
    except UserFacingError as err:
        raise TrainingError(f"cannot resume from {tr.state_path}: {err}") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise TrainingError(f"{tr.state_path} is not a training state written by training.fit")
    if state["fingerprint"] != tr.cfg.fingerprint():
        old = state.get("config", {})
        new = tr.cfg.to_dict()
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k)
                      and k not in ("epochs", "time_budget_s", "save_every_steps", "cache_dir", "use_cache",
                                    "memory_gb", "threads", "progress_bar", "lr", "device"))
        raise TrainingError(
            f"cannot resume {tr.out_dir}: the settings differ from the interrupted run ({', '.join(diff)}); "
            "use the same options (only --epochs, --time-budget and --lr may change) or another --out"
        )
    tr._restore_real()
    try:
        tr.decoder.load_state_dict(state["decoder"])
    finally:
        tr._install_standins()
    if tr.svd is not None and state.get("svd") is not None:
        tr.svd.load_state_dict(state["svd"])
    if tr.model.feature_enhancer is not None:
        if state.get("enhancer") is None:
            raise TrainingError(f"{tr.state_path} holds no feature-enhancer weights to resume the PGE head from")
        tr.model.feature_enhancer.load_state_dict(state["enhancer"])
    tr.optimizer.load_state_dict(state["optimizer"])
    for group in tr.optimizer.param_groups:
        group["initial_lr"] = tr.cfg.lr
    tr.epoch = int(state["epoch"])
    tr.step_in_epoch = int(state["step_in_epoch"])
    tr.global_step = int(state["global_step"])
    tr.train_seconds = float(state.get("train_seconds", 0.0))
    tr.planes_seen = int(state.get("planes_seen", 0))
    tr.history = list(state.get("history", []))
    tr.step_log = list(state.get("step_log", []))
    tr.best = dict(state.get("best", {"score": None, "epoch": None}))
    torch.set_rng_state(state["torch_rng"])
    tr.notices.append(f"resumed from {tr.state_path} at epoch {tr.epoch + 1}, iteration {tr.step_in_epoch}")


def write_logs(tr, stopped: str = "", message: str = "") -> None:
    """log.csv (one row per epoch), log.json (settings, logs, notices) and training.png; rank 0 only."""
    if not tr.ctx.is_main:
        return
    fields: list[str] = []
    for row in tr.history:
        for k in row:
            if k not in fields:
                fields.append(k)
    with atomic_write_path(tr.out_dir / "log.csv") as tmp:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields)
            writer.writeheader()
            for row in tr.history:
                writer.writerow(row)
    payload = {
        "config": tr.cfg.to_dict(),
        "base_model": {"name": tr.loaded.name, "sha256": tr.loaded.sha256},
        "data": tr.data_description,
        "history": tr.history,
        "steps": tr.step_log,
        "best": tr.best,
        "stopped": stopped,
        "message": message,
        "notices": tr.notices,
        "feature_seconds": getattr(tr, "feature_seconds", None),
        "train_seconds": tr.train_seconds,
        "planes_seen": tr.planes_seen,
        "samples_per_s": tr.planes_seen / tr.train_seconds if tr.train_seconds else None,
        "peak_rss_mb": peak_rss_mb(),
        "world_size": tr.ctx.world_size,
    }
    with atomic_write_path(tr.out_dir / "log.json") as tmp:
        Path(tmp).write_text(json.dumps(payload, indent=1, default=float))
    try:
        plot_history(tr.history, tr.step_log, tr.out_dir / "training.png")
    except Exception as err:  # noqa: BLE001 - a plot must never fail a run
        tr.notices.append(f"could not draw training.png: {err}")


def plot_history(history: list[dict], steps: list[dict], path: Path) -> None:
    """training.png: per-iteration loss (and its terms per epoch) and validation Dice per epoch."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2))
    ax1, ax2 = fig.subplots(1, 2)
    if steps:
        x = [s["global_step"] for s in steps]
        y = [s["loss"] for s in steps]
        ax1.plot(x, y, lw=0.6, alpha=0.5, label="total (per iteration)")
        if len(y) >= 5:
            k = max(2, len(y) // 20)
            smooth = np.convolve(y, np.ones(k) / k, mode="valid")
            ax1.plot(x[k - 1:], smooth, lw=1.5, label=f"total (mean of {k})")
        for term in ("dice", "focal", "feature", "token", "iou", "fr", "fall"):
            vals = [s.get(term) for s in steps]
            if any(v for v in vals if isinstance(v, float)):
                ax1.plot(x, vals, lw=0.5, alpha=0.6, label=term + " (unweighted)")
    ax1.set_xlabel("iteration")
    ax1.set_ylabel("loss")
    ax1.set_yscale("log")
    if steps:
        ax1.legend(fontsize=7)
    else:  # before the first iteration (the epoch-0 plot): say so instead of an empty legend's warning
        ax1.text(0.5, 0.5, "no iteration yet", ha="center", va="center", transform=ax1.transAxes)
    ax1.set_title("training loss")
    epochs = [r["epoch"] for r in history]
    for key in ("val_dice_clean_box", "val_dice_degraded_box", "val_dice_clean_points3", "val_dice_degraded_points3"):
        vals = [r.get(key) for r in history]
        if any(v is not None for v in vals):
            ax2.plot(epochs, [np.nan if v is None else v for v in vals], marker="o", label=key.replace("val_dice_", ""))
    ax2.set_xlabel("epoch (0 = before fine-tuning)")
    ax2.set_ylabel("validation Dice")
    ax2.set_ylim(0, 1)
    ax2.grid(alpha=0.3)
    if ax2.get_lines():
        ax2.legend(fontsize=7)
    else:  # --val-fraction 0: nothing to plot; say so instead of an empty legend's warning
        ax2.text(0.5, 0.5, "no validation split", ha="center", va="center", transform=ax2.transAxes)
    ax2.set_title("validation")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
