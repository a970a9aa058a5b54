"""The fine-tuning loop: frozen encoders, a trained head, clean/degraded pairs, iterative prompts.

The head (:mod:`.heads`: RobustSAM's robust decoder, or PGE-SAM's feature enhancer with the mask decoder) loads
the base model, chooses the trained parameters and runs one iteration (:mod:`.robust_step`, :mod:`.pge_step`); the
loop here knows none of them by name. The run's files are written by :mod:`.run_io`.

One iteration of the robust decoder head (see :mod:`.prompt_simulation`, :mod:`.losses`, :mod:`.pairs`):

    sample B planes (this rank's shard of the epoch) and n_obj objects per plane
    pick a degraded variant per plane (or the clean image itself with probability p_identity)
    image-level robust features of the degraded images (with gradient, once per iteration)
    prompts: box or K points, then n_steps corrective clicks (previous logits fed back with probability p_mask)
    per prediction: degraded branch (robust path, trained) vs. clean branch (SAM path, no gradient, the anchor)
        loss = dice + 20 focal (+ iou) on the degraded branch + 100 MSE(mask features) + 2 MSE(tokens)
    average over the n_steps + 1 predictions, one AdamW step (gradients averaged across ranks under torchrun)

All randomness of an iteration comes from ``derive_seed(seed, epoch, step)`` and the epoch's order from
``(seed, epoch)``, so resuming (``resume=True``) from the saved state (weights, optimiser, position, logs)
continues exactly as an uninterrupted run would have.

Outputs in ``out_dir``: ``last.pth`` and ``best.pth`` (project checkpoint format, loadable with
``load_model``; best = highest mean validation Dice), ``train_state.pt`` (for ``--resume``), ``log.csv`` (one row
per epoch), ``log.json`` (config, per-epoch and per-step logs, notices), ``training.png`` (loss and Dice curves).
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from napari_robustmedsam.prompting import derive_seed

from . import ddp, run_io
from .config import TrainConfig
from .data import TrainingError, TrainItem, describe_items
from .heads import _ZeroAMFG, head_for
from .pairs import FeatureBank
from .validation import validate

_STOP_CODES = {"time budget": 1, "cancelled": 2, "interrupted": 3}
_STOP_NAMES = {0: None, 1: "time budget", 2: "cancelled", 3: "interrupted"}


class NonFiniteLoss(TrainingError):
    """The loss became NaN or infinite."""


@dataclass
class TrainResult:
    out_dir: Path
    last: Path | None
    best: Path | None
    history: list[dict]
    stopped: str  # "completed", "interrupted", "time budget", "nan", "cancelled"
    message: str = ""
    notices: list[str] = field(default_factory=list)


class Trainer:
    """Decoder fine-tuning on clean/degraded pairs. See the module docstring."""

    def __init__(
        self,
        config: TrainConfig,
        out_dir: str | os.PathLike,
        train_items: list[TrainItem],
        val_items: list[TrainItem] | None = None,
        *,
        data_description: dict | None = None,
        progress: Callable[[int, int, str], None] | None = None,
        on_step: Callable[[dict], None] | None = None,
        on_epoch: Callable[[dict], None] | None = None,
        cancel: Any = None,
        ctx: ddp.DistContext | None = None,
        notices: list[str] | None = None,
    ) -> None:
        if not train_items:
            raise TrainingError("no training planes with labelled objects")
        self.cfg = config
        self.ctx = ctx or ddp.DistContext()
        self.out_dir = run_io.check_out_dir(out_dir) if self.ctx.is_main else Path(out_dir)
        self.train_items = list(train_items)
        self.val_items = list(val_items or [])
        self.data_description = data_description or {"train": describe_items(self.train_items),
                                                     "validation": describe_items(self.val_items)}
        self.progress = progress
        self.on_step = on_step
        self.on_epoch = on_epoch
        self.cancel = cancel
        self.notices: list[str] = list(notices or [])
        self._stop_requested: str | None = None
        self.history: list[dict] = []
        self.step_log: list[dict] = []
        self.best: dict = {"score": None, "epoch": None}
        self.epoch = 0
        self.step_in_epoch = 0
        self.global_step = 0
        self.train_seconds = 0.0
        self.planes_seen = 0
        self.last_path = self.out_dir / "last.pth"
        self.best_path = self.out_dir / "best.pth"
        self.state_path = self.out_dir / "train_state.pt"

    # ------------------------------------------------------------------ control
    def request_stop(self, reason: str = "interrupted") -> None:
        """Stop after the current iteration, saving a resumable state (Ctrl-C / the widget's cancel)."""
        self._stop_requested = reason

    def _should_stop(self) -> str | None:
        if self._stop_requested:
            return self._stop_requested
        if self.cancel is not None:
            is_set = self.cancel.is_set() if hasattr(self.cancel, "is_set") else bool(self.cancel())
            if is_set:
                return "cancelled"
        if self.cfg.time_budget_s is not None and self.train_seconds >= self.cfg.time_budget_s:
            return "time budget"
        return None

    def _report(self, done: int, total: int, message: str) -> None:
        if self.progress is not None:
            self.progress(done, total, message)

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        if cfg.threads:
            torch.set_num_threads(int(cfg.threads))
        device = ddp.device_for(self.ctx, cfg.device)
        # The identity-initialised robust parts of a LiteMedSAM base have randomly initialised inner layers:
        # seed them, so that runs (and all ranks of a torchrun job) start from the same weights.
        torch.manual_seed(derive_seed(cfg.seed, "init") % (2**63))
        self.head = head_for(cfg.head)
        self.loaded = self.head.load(cfg, device)
        self.model = self.loaded.model
        self.device = self.model.device
        self.decoder = self.model.mask_decoder
        self.model.requires_grad_(False)
        self.model.eval()
        self._swapped: dict[str, torch.nn.Module] = {}  # frozen AMFG blocks replaced by stand-ins (robust head)
        self.svd = None  # the encoder neck's singular values, when the head trains them
        self.params = self.head.trainable_parameters(self)
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self._make_banks(**self.head.bank_features(cfg))
        self._prepare_features()

    def _make_banks(self, **features) -> None:
        """Feature banks of the training and validation planes (``features``: what FeatureBank stores extra)."""
        cfg = self.cfg
        memory = int(cfg.memory_gb * 1024**3)
        common = dict(cache_dir=cfg.cache_dir, use_cache=cfg.use_cache, **features)
        self.bank = FeatureBank(self.model, self.loaded.preprocessing, variants=cfg.variants, levels=tuple(cfg.levels),
                                seed=cfg.seed, memory_bytes=memory, **common)
        self.bank.add_items(self.train_items)
        self.val_bank = FeatureBank(self.model, self.loaded.preprocessing, variants=1, levels=(cfg.val_level,),
                                    seed=derive_seed(cfg.seed, "validation"), memory_bytes=memory // 4, **common)
        self.val_bank.add_items(self.val_items)
        self.notices.extend(n for n in self.bank.engine.notices if n not in self.notices)

    def _prepare_features(self) -> None:
        ctx = self.ctx
        t0 = time.perf_counter()
        total_train = len(self.train_items) * (self.cfg.variants + 1)

        def prog(done, total, msg):
            self._report(done, total, msg)

        if ctx.active:  # every rank computes its share into the shared disk cache, then all register everything
            self.bank.prepare(shard=(ctx.rank, ctx.world_size), progress=prog, cancel=self.cancel)
            ddp.barrier(ctx)
            self.bank.prepare(progress=None, cancel=self.cancel)
        else:
            self.bank.prepare(progress=prog, cancel=self.cancel)
        if self.val_items and ctx.is_main:
            self.val_bank.prepare(progress=prog, cancel=self.cancel)
        ddp.barrier(ctx)
        self.feature_seconds = time.perf_counter() - t0
        self.notices.append(
            f"features of {total_train} training images (clean + {self.cfg.variants} degraded variants each) and "
            f"{2 * len(self.val_items)} validation images ready in {self.feature_seconds:.1f} s "
            f"({self.bank.stats['encoded']} encoded, {self.bank.stats['from_cache']} from the cache)"
        )

    # ------------------------------------------------------------------ frozen AMFG stand-ins
    def _install_standins(self) -> None:
        for name in self._swapped:
            upscale = 1 if name == "fourier_mask_features" else 4
            self.decoder._modules[name] = _ZeroAMFG(self.decoder.transformer_dim // 8, upscale)

    def _restore_real(self) -> None:
        for name, block in self._swapped.items():
            self.decoder._modules[name] = block

    def _decoder_state(self) -> dict[str, torch.Tensor]:
        self._restore_real()
        try:
            return {k: v.detach().cpu().clone() for k, v in self.decoder.state_dict().items()}
        finally:
            self._install_standins()

    # ------------------------------------------------------------------ model pieces
    def embeddings_of(self, feats: dict[str, torch.Tensor], grad: bool) -> torch.Tensor:
        """The image embeddings of a feature batch (through the trained SVD neck when there is one)."""
        if self.svd is None:
            return feats["image_embeddings"]
        with torch.set_grad_enabled(grad):
            return self.svd(feats["neck_input"])

    def dense_pe(self) -> torch.Tensor:
        fn = getattr(self.model, "dense_pe", None)  # cached by newer segmenters
        return fn() if callable(fn) else self.model.prompt_encoder.get_dense_pe()

    def prompt_embed(self, state, scale: float):
        pts, boxes = state.to_model(scale, self.device)
        mask = state.mask_input
        with torch.no_grad():
            return self.model.prompt_encoder(points=pts, boxes=boxes, masks=mask)

    def decode(self, emb, early, sparse, dense, robust: bool, image_features=None) -> dict:
        """The robust decoder with its auxiliary outputs (robust or SAM path)."""
        return self.decoder.forward_with_aux(
            image_embeddings=emb,
            image_pe=self.dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
            image_features=image_features,
            early_features=early,
            robust=robust,
        )

    # ------------------------------------------------------------------ one iteration
    def train_step(self, planes: list[int], rng: np.random.Generator) -> dict:
        """One iteration of the head's step (:mod:`.heads`)."""
        return self.head.train_step(self, planes, rng)

    # ------------------------------------------------------------------ the end of every head's iteration
    def stop_if_nonfinite(self, bad_message: str) -> None:
        if ddp.broadcast_flag(bool(bad_message), self.ctx):  # every rank stops together
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLoss(bad_message or "the loss became NaN or infinite on another process")

    def finish_step(self) -> None:
        """Gradients of this iteration are in: all-reduce (DDP), clip, check, step the optimizer."""
        cfg = self.cfg
        ddp.allreduce_gradients(self.params, self.ctx)
        if cfg.grad_clip and cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        bad = any(p.grad is not None and not torch.isfinite(p.grad).all() for p in self.params)
        if bad:
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLoss("gradients became NaN or infinite")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        ddp.average_buffers(self.decoder, self.ctx)
        if self.model.feature_enhancer is not None:
            ddp.average_buffers(self.model.feature_enhancer, self.ctx)

    # ------------------------------------------------------------------ validation
    def validate(self) -> dict:
        return validate(self)

    # ------------------------------------------------------------------ saving
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        self._restore_real()
        try:
            state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        finally:
            self._install_standins()
        if self.svd is not None:
            state.update({k: v.cpu() for k, v in self.svd.merged_state_dict().items()})
        return state

    def _save_checkpoint(self, path: Path, metrics: dict, kind: str) -> Path:
        return run_io.save_checkpoint(self, path, metrics, kind)

    def save(self, metrics: dict, completed: bool = False) -> None:
        """last.pth (+ train_state.pt) atomically; rank 0 only."""
        if not self.ctx.is_main:
            return
        run_io.save_checkpoint(self, self.last_path, metrics, "last")
        run_io.save_state(self, completed)

    def load_state(self) -> None:
        run_io.load_state(self)

    def write_logs(self, stopped: str = "", message: str = "") -> None:
        run_io.write_logs(self, stopped, message)

    # ------------------------------------------------------------------ the loop
    def _epoch_lr(self, epoch: int) -> float:
        return self.cfg.lr * (self.cfg.lr_decay ** epoch)

    def _steps_in_epoch(self, n_mine: int) -> int:
        """One pass over this rank's shard, or exactly ``steps_per_epoch`` iterations (cycling over the shard)."""
        if self.cfg.steps_per_epoch is not None:
            return int(self.cfg.steps_per_epoch)
        return max(1, math.ceil(n_mine / self.cfg.batch_size))

    def _planes_for(self, order: list[int], step: int) -> list[int]:
        b = self.cfg.batch_size
        n = len(order)
        return [order[(step * b + j) % n] for j in range(b)]

    def run(self, resume: bool = False) -> TrainResult:
        cfg = self.cfg
        self.setup()
        if resume:
            self.load_state()
        self.decoder.train()
        if self.svd is not None:
            self.svd.train()
        stopped, message = "completed", ""
        handler_installed = False
        old_handler = None
        if threading.current_thread() is threading.main_thread():
            def on_sigint(signum, frame):
                if self._stop_requested:
                    raise KeyboardInterrupt
                self._stop_requested = "interrupted"
                print("\nCtrl-C: finishing the current iteration and saving a resumable checkpoint "
                      "(press Ctrl-C again to stop at once)", flush=True)

            old_handler = signal.signal(signal.SIGINT, on_sigint)
            handler_installed = True
        try:
            if not self.history and self.epoch == 0 and self.step_in_epoch == 0:
                base_metrics = self.validate()
                row = {"epoch": 0, "iterations": 0, "lr": self._epoch_lr(0), **base_metrics}
                self.history.append(row)
                if self.ctx.is_main:
                    self.best = {"score": base_metrics.get("val_score"), "epoch": 0}
                    self._save_checkpoint(self.best_path, base_metrics, "best (base model before fine-tuning)")
                    self.save(base_metrics)
                    self.write_logs("running")
                if self.on_epoch is not None:  # the curve's first point: the model before any training
                    self.on_epoch(row)
            while self.epoch < cfg.epochs:
                reason = self._run_epoch()
                if reason is not None:
                    stopped = reason
                    break
            if stopped == "completed" and self._should_stop() == "time budget":
                stopped = "time budget"
        except NonFiniteLoss as err:
            stopped = "nan"
            message = (f"training stopped at epoch {self.epoch + 1}, iteration {self.step_in_epoch + 1}: {err}. "
                       f"The last good checkpoint {self.last_path} (and train_state.pt) is kept unchanged; lower the "
                       "learning rate (--lr) and continue with --resume")
        except KeyboardInterrupt:
            stopped = "interrupted"
            self.save(self.history[-1] if self.history else {})
        finally:
            if handler_installed:
                signal.signal(signal.SIGINT, old_handler)
        if stopped in ("interrupted", "cancelled"):
            message = (f"stopped by the user at epoch {self.epoch + 1}, iteration {self.step_in_epoch}; "
                       f"{self.last_path} and {self.state_path.name} are saved: run the same command with --resume "
                       "to continue exactly where it stopped")
        elif stopped == "time budget":
            message = f"time budget of {cfg.time_budget_s:.0f} s reached after {self.global_step} iterations"
        if self.ctx.is_main:
            self.write_logs(stopped, message)
        ddp.barrier(self.ctx)
        return TrainResult(self.out_dir, self.last_path if self.last_path.exists() else None,
                           self.best_path if self.best_path.exists() else None, self.history, stopped, message,
                           self.notices)

    def _run_epoch(self) -> str | None:
        """One epoch (or its rest, after a resume): iterations until the shard is done or a stop is asked, then
        validation, the best checkpoint and the resumable state. Returns the stop reason, None to go on. One
        function on purpose: the order of these steps is what makes a resumed run identical to an uninterrupted
        one."""
        cfg = self.cfg
        epoch = self.epoch
        lr = self._epoch_lr(epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        order = ddp.shard_indices(len(self.train_items), self.ctx, epoch, cfg.seed)
        n_steps = self._steps_in_epoch(len(order))
        bar = None
        if cfg.progress_bar and self.ctx.is_main:
            from tqdm import tqdm

            bar = tqdm(total=n_steps, initial=self.step_in_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="it",
                       dynamic_ncols=True)
        sums: dict[str, float] = {}
        count = 0
        t_epoch = time.perf_counter()
        try:
            while self.step_in_epoch < n_steps:
                reason = self._should_stop()
                if self.ctx.active:  # every rank takes the same decision (the strongest stop reason of any rank)
                    reason = _STOP_NAMES[ddp.allreduce_max(_STOP_CODES.get(reason, 0), self.ctx)]
                if reason == "time budget":
                    break
                if reason is not None:
                    self.save(self.history[-1] if self.history else {})
                    return reason
                step = self.step_in_epoch
                planes = self._planes_for(order, step)
                rng = np.random.default_rng(derive_seed(cfg.seed, "iteration", epoch, step, self.ctx.rank))
                t0 = time.perf_counter()
                terms = self.train_step(planes, rng)
                dt = time.perf_counter() - t0
                self.train_seconds += dt
                self.planes_seen += len(planes) * self.ctx.world_size
                self.step_in_epoch += 1
                self.global_step += 1
                total = ddp.allreduce_mean(terms["total"], self.ctx)
                info = {"epoch": epoch + 1, "iteration": step + 1, "global_step": self.global_step, "loss": total,
                        **{k: v for k, v in terms.items() if k != "total"}, "lr": lr, "seconds": dt}
                self.step_log.append({k: (round(v, 6) if isinstance(v, float) else v) for k, v in info.items()})
                for k, v in terms.items():
                    if isinstance(v, float):
                        sums[k] = sums.get(k, 0.0) + v
                count += 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{total:.3f}", dice=f"{terms['dice_last']:.2f}")
                if self.on_step is not None:
                    self.on_step(info)
                self._report(self.step_in_epoch, n_steps, f"epoch {epoch + 1}/{cfg.epochs}: loss {total:.3f}")
                if cfg.save_every_steps and self.global_step % cfg.save_every_steps == 0 and self.step_in_epoch < n_steps:
                    self.save(self.history[-1] if self.history else {})
        finally:
            if bar is not None:
                bar.close()
        # end of epoch (complete, or cut short by the time budget)
        metrics = self.validate()
        row = {"epoch": epoch + 1, "iterations": self.step_in_epoch, "lr": lr,
               **{f"train_{k}": v / max(count, 1) for k, v in sums.items()},
               **metrics,
               "epoch_seconds": time.perf_counter() - t_epoch,
               "samples_per_s": self.planes_seen / self.train_seconds if self.train_seconds else None,
               "peak_rss_mb": run_io.peak_rss_mb()}
        self.history.append(row)
        self.epoch += 1
        self.step_in_epoch = 0
        score = metrics.get("val_score")
        if self.ctx.is_main:
            improved = score is not None and (self.best.get("score") is None or score > self.best["score"])
            if improved or (score is None and not self.val_items):
                self.best = {"score": score, "epoch": epoch + 1}
                self._save_checkpoint(self.best_path, metrics, "best")
            row["best_epoch"] = self.best.get("epoch")
            self.save(metrics, completed=self.epoch >= cfg.epochs)
            self.write_logs("running")
        if self.on_epoch is not None:
            self.on_epoch(row)
        ddp.barrier(self.ctx)
        if self._should_stop() == "time budget":
            return "time budget"
        return None
