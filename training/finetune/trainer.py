"""The fine-tuning loop: frozen encoders, trained (lite) robust decoder, clean/degraded pairs, iterative prompts.

One iteration (see :mod:`.prompt_simulation`, :mod:`.losses`, :mod:`.pairs`):

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

import csv
import json
import math
import os
import resource
import signal
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from napari_robustmedsam.errors import UserFacingError
from napari_robustmedsam.models.robust_decoder import IMAGE_FEATURES_KEY
from napari_robustmedsam.prompting import derive_seed, random_positive_points, rng_for, tight_box

from . import ddp
from .config import TrainConfig
from .data import TrainingError, TrainItem, describe_items
from .prompt_simulation import add_clicks, corrective_clicks, shown_logits, start_prompts
from .losses import dice_score, robust_loss, soft_dice
from .pairs import FeatureBank, sample_variant

STATE_FORMAT = "napari-robustmedsam-train-state"
STATE_VERSION = 1


_STOP_CODES = {"time budget": 1, "cancelled": 2, "interrupted": 3}
_STOP_NAMES = {0: None, 1: "time budget", 2: "cancelled", 3: "interrupted"}


AMFG_NAMES = ("fourier_first_layer_features", "fourier_last_layer_features", "fourier_mask_features")


class _ZeroAMFG(torch.nn.Module):
    """Stand-in for a frozen AMFG block whose output layer is all zeros: returns the same exact zeros without
    running the block (the block costs seconds per call on a CPU). Never saved: the real block is put back
    for every state dict."""

    def __init__(self, channels: int, upscale: int) -> None:
        super().__init__()
        self.channels, self.upscale = channels, upscale

    def forward(self, x: torch.Tensor, refine: bool = True) -> torch.Tensor:
        return x.new_zeros(x.shape[0], self.channels, x.shape[-2] * self.upscale, x.shape[-1] * self.upscale)


def _outputs_zero(block: torch.nn.Module) -> bool:
    last = block.head[-1]
    return bool((last.weight == 0).all()) and (last.bias is None or bool((last.bias == 0).all()))


class NonFiniteLoss(TrainingError):
    """The loss became NaN or infinite."""


@dataclass
class SampledBatch:
    """One iteration's objects: (plane, variant) pairs of both branches and the ground truth, grouped by plane."""

    pairs_c: list[tuple[int, int]]
    pairs_d: list[tuple[int, int]]
    target: torch.Tensor  # (N, 1, 256, 256) bool
    valid: torch.Tensor  # (N, 1, 256, 256) bool
    gt_np: np.ndarray  # (N, 256, 256) bool
    scale: float  # model frame / low-resolution frame


def leaf_of(graph: torch.Tensor) -> torch.Tensor:
    """A detached copy that collects the gradients of every interaction of an iteration."""
    return graph.detach().requires_grad_(graph.requires_grad)


def backward_through_leaves(pairs) -> None:
    """Carry the gradients the leaves collected back through their graphs, in one backward pass."""
    roots, grads = [], []
    for graph, leaf in pairs:
        if graph.requires_grad and leaf.grad is not None:
            roots.append(graph)
            grads.append(leaf.grad)
    if roots:
        torch.autograd.backward(roots, grads)


def finish_sums(sums: dict, dices: list[float], state) -> dict:
    sums["dice_first"] = dices[0] if dices else float("nan")
    sums["dice_last"] = dices[-1] if dices else float("nan")
    sums["start"] = state.start
    return sums


@dataclass
class TrainResult:
    out_dir: Path
    last: Path | None
    best: Path | None
    history: list[dict]
    stopped: str  # "completed", "interrupted", "time budget", "nan", "cancelled"
    message: str = ""
    notices: list[str] = field(default_factory=list)


# The files a run writes into its --out folder.
RUN_FILES = ("last.pth", "best.pth", "train_state.pt", "log.csv", "log.json", "training.png")


def check_run_outputs(out_dir: str | os.PathLike, *, inputs=(), resume: bool = False, overwrite: bool = False) -> Path:
    """Before any work: a run never writes over one of its inputs (the base checkpoint, a session, an image), and
    a new run does not replace an earlier run's files in ``out_dir`` unless ``overwrite`` (``--resume`` continues
    them instead)."""
    from napari_robustmedsam.io.output_paths import check_output_folder

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


def load_pge_base_model(name_or_path: str, device: str, blocks_per_stage: int = 1, **enhancer_options):
    """The model to train a PGE head on: its plain decoder, and its enhancer (a new identity one if it has none,
    shaped by ``enhancer_options``: work_stride, width, gate_channels)."""
    from napari_robustmedsam.checkpoints import load_model
    from napari_robustmedsam.models.pge_enhancer import enhancer_for

    try:
        loaded = load_model(name_or_path, device=device, half=False, progress=False)
        if loaded.decoder == "robust":
            loaded = load_model(name_or_path, device=device, half=False, decoder_override="sam", progress=False)
    except UserFacingError as err:
        raise TrainingError(f"cannot load the model to fine-tune: {err}") from None
    model = loaded.model.float()
    if model.feature_enhancer is None:
        try:
            model.attach_enhancer(enhancer_for(model, blocks_per_stage, **enhancer_options).to(model.device))
        except (TypeError, ValueError) as err:
            raise TrainingError(f"cannot add a PGE enhancer to {name_or_path}: {err}") from None
    return loaded


def load_base_model(name_or_path: str, device: str):
    """Load the model to fine-tune; a plain TinyViT (LiteMedSAM) decoder gets the identity-initialised lite robust
    decoder. Errors are :class:`TrainingError` with the reason."""
    from napari_robustmedsam.checkpoints import load_model

    try:
        loaded = load_model(name_or_path, device=device, half=False, progress=False)
        if loaded.decoder != "robust":
            if loaded.architecture == "tiny_vit":
                loaded = load_model(name_or_path, device=device, half=False, decoder_override="robust", progress=False)
            else:
                raise TrainingError(
                    f"{name_or_path} has a plain SAM decoder; fine-tuning trains a robust decoder. Start from "
                    "'litemedsam_robust', a RobustSAM / RobustMedSAM checkpoint, or a fused one (`robustmedsam fuse`)"
                )
    except UserFacingError as err:
        if isinstance(err, TrainingError):
            raise
        raise TrainingError(f"cannot load the model to fine-tune: {err}") from None
    loaded.model.float()
    return loaded


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
        self.out_dir = check_out_dir(out_dir) if self.ctx.is_main else Path(out_dir)
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
        self.loaded = load_pge_base_model(
            cfg.model, device, cfg.enhancer_blocks, work_stride=cfg.enhancer_work_stride, width=cfg.enhancer_width,
            gate_channels=cfg.enhancer_gate_channels) if cfg.head == "pge" else (
            load_base_model(cfg.model, device))
        self.model = self.loaded.model
        self.device = self.model.device
        self.decoder = self.model.mask_decoder
        self.model.requires_grad_(False)
        self.model.eval()
        if cfg.head == "pge":
            self._setup_pge()
            return
        if cfg.trainable == "decoder":
            named = list(self.decoder.named_parameters())
        else:
            named = self.decoder.robust_named_parameters()
        if not cfg.train_amfg:
            named = [(n, p) for n, p in named if n.split(".")[0] not in AMFG_NAMES]
        params = [p for _, p in named]
        for p in params:
            p.requires_grad_(True)
        self._swapped: dict[str, torch.nn.Module] = {}
        if not cfg.train_amfg:
            for name in AMFG_NAMES:
                block = getattr(self.decoder, name)
                if _outputs_zero(block):
                    self._swapped[name] = block
            self._install_standins()
            if self._swapped:
                self.notices.append(
                    "AMFG blocks frozen (" + ", ".join(sorted(self._swapped)) + " output exactly zero, as "
                    "identity-initialised: they are skipped during training)")
        self.svd = None
        if cfg.svd_neck:
            from .svd_neck import SVDNeck

            self.svd = SVDNeck(self.model.image_encoder.neck).to(self.device)
            params = params + self.svd.trainable_parameters()
        self.params = params
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self._make_banks(neck_input=cfg.svd_neck)
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

    def _setup_pge(self) -> None:
        """PGE head: the enhancer and the whole mask decoder are trained; encoders frozen."""
        cfg = self.cfg
        self._swapped = {}
        self.svd = None
        enhancer = self.model.feature_enhancer
        params = list(self.decoder.parameters()) + list(enhancer.parameters())
        for p in params:
            p.requires_grad_(True)
        self.params = params
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.notices.append(f"PGE head: {enhancer.parameter_count() / 1e6:.2f} M enhancer parameters + "
                            f"{sum(p.numel() for p in self.decoder.parameters()) / 1e6:.2f} M decoder parameters trained")
        self._make_banks(intermediates=True)
        self._prepare_features()

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
    def _embeddings(self, feats: dict[str, torch.Tensor], grad: bool) -> torch.Tensor:
        if self.svd is None:
            return feats["image_embeddings"]
        with torch.set_grad_enabled(grad):
            return self.svd(feats["neck_input"])

    def _dense_pe(self) -> torch.Tensor:
        fn = getattr(self.model, "dense_pe", None)  # cached by newer segmenters
        return fn() if callable(fn) else self.model.prompt_encoder.get_dense_pe()

    def _prompt_embed(self, state, scale: float):
        pts, boxes = state.to_model(scale, self.device)
        mask = state.mask_input
        with torch.no_grad():
            return self.model.prompt_encoder(points=pts, boxes=boxes, masks=mask)

    def _decode(self, emb, early, sparse, dense, robust: bool, image_features=None) -> dict:
        return self.decoder.forward_with_aux(
            image_embeddings=emb,
            image_pe=self._dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
            image_features=image_features,
            early_features=early,
            robust=robust,
        )

    # ------------------------------------------------------------------ one iteration
    def train_step(self, planes: list[int], rng: np.random.Generator) -> dict:
        cfg = self.cfg
        if cfg.head == "pge":
            from .pge_step import pge_train_step

            return pge_train_step(self, planes, rng)
        batch = self.sample_batch(planes, rng)
        target, valid, gt_np, scale = batch.target, batch.valid, batch.gt_np, batch.scale
        pairs_c, pairs_d = batch.pairs_c, batch.pairs_d

        feats_d = self.bank.batch(pairs_d, self.device)
        consistency = cfg.weights.consistency
        feats_c = self.bank.batch(pairs_c, self.device) if consistency else None
        # Degraded branch: image-level robust features once per iteration, with gradient. Leaves collect the
        # gradients of all steps, then one backward pass through the image-level part (memory-light).
        emb_d_graph = self._embeddings(feats_d, grad=True)
        img_graph = self.decoder.image_level_features(emb_d_graph, feats_d["early_features"])[IMAGE_FEATURES_KEY]
        emb_d = leaf_of(emb_d_graph)
        img_d = leaf_of(img_graph)
        if consistency:
            with torch.no_grad():
                emb_c = self._embeddings(feats_c, grad=False)

        state = start_prompts(gt_np, rng, cfg.prompts)
        n_pred = cfg.prompts.n_steps + 1
        bad_message = ""
        sums: dict[str, float] = {}
        dices = []
        previous_dice = None
        for step in range(n_pred):
            sparse, dense = self._prompt_embed(state, scale)
            clean_out = None
            weights = cfg.weights
            if consistency and (cfg.consistency_steps == "all" or step == 0):
                with torch.no_grad():
                    clean_out = self._decode(emb_c, feats_c["early_features"], sparse, dense, robust=False)
            out = self._decode(emb_d, feats_d["early_features"], sparse, dense, robust=True,
                               image_features={IMAGE_FEATURES_KEY: img_d})
            if consistency and clean_out is None:
                weights = replace(weights, feature=0.0, token=0.0)
            loss, terms = robust_loss(out, target, weights, clean_out, valid, previous_dice)
            bad_message = self.backward_step(loss, terms, n_pred, sums)
            if bad_message:
                break
            logits = out["masks"][:, :1].detach()
            dices.append(float(dice_score(logits, target, valid).mean()))
            if step + 1 < n_pred:
                shown, previous_dice = self.shown_and_dice(state, logits, target, valid)
                state = self.next_prompts(state, shown, gt_np, rng)
        self.stop_if_nonfinite(bad_message)
        # one backward pass through the image-level part (AMFG on images, SVD neck)
        backward_through_leaves([(img_graph, img_d), (emb_d_graph, emb_d)])
        self.finish_step()
        return finish_sums(sums, dices, state)

    # ------------------------------------------------------------------ pieces shared by the heads' steps
    def sample_batch(self, planes: list[int], rng: np.random.Generator) -> "SampledBatch":
        """Objects and clean/degraded variants of one iteration's planes (same draws for every head)."""
        cfg = self.cfg
        n_obj = cfg.objects_per_image
        pairs_c, pairs_d, gts, valids = [], [], [], []
        for i in planes:
            tgt = self.bank.targets[i]
            k = tgt.masks.shape[0]
            pick = rng.choice(k, size=n_obj, replace=k < n_obj)
            gts.append(tgt.masks[pick])
            valids.append(tgt.valid[None].expand(n_obj, -1, -1))
            v = sample_variant(rng, cfg.variants, cfg.p_identity)
            pairs_c.append((i, 0))
            pairs_d.append((i, v))
        gt = torch.cat(gts)  # (N, 256, 256) bool, grouped by plane
        return SampledBatch(
            pairs_c=pairs_c,
            pairs_d=pairs_d,
            target=gt[:, None].to(self.device),
            valid=torch.cat(valids)[:, None].to(self.device),
            gt_np=gt.numpy(),
            scale=self.bank.targets[planes[0]].frame.model_size / gt.shape[-1],
        )

    @staticmethod
    def backward_step(loss: torch.Tensor, terms: dict, n_pred: int, sums: dict[str, float]) -> str:
        """Backward of one interaction's loss (averaged over the iteration) and its logged terms; returns a
        message instead when the loss is not finite (nothing is backpropagated then)."""
        if not torch.isfinite(loss):
            return ("loss became " + ("NaN" if torch.isnan(loss) else "infinite") + " ("
                    + ", ".join(f"{k} {float(v):.4g}" for k, v in terms.items()) + ")")
        (loss / n_pred).backward()
        for key, value in terms.items():
            sums[key] = sums.get(key, 0.0) + float(value.detach()) / n_pred
        sums["total"] = sums.get("total", 0.0) + float(loss.detach()) / n_pred
        return ""

    def shown_and_dice(self, state, logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor):
        """The logits the annotator would show after this prediction (merged around the last clicks under local
        corrections, ``shown_logits``) and, when the fall penalty is on, their soft Dice per object (else None)."""
        shown = shown_logits(state, logits, self.cfg.prompts)
        if self.cfg.weights.fall <= 0:
            return shown, None
        return shown, soft_dice(shown, target, valid.expand_as(shown)).detach()

    def next_prompts(self, state, shown: torch.Tensor, gt_np: np.ndarray, rng: np.random.Generator):
        """One corrective click from the errors of the mask shown (``shown_and_dice``); those logits fed back with
        p_mask."""
        pred = (shown[:, 0] > 0).cpu().numpy()
        pts, labs = corrective_clicks(gt_np, pred, rng, self.cfg.prompts)
        state = add_clicks(state, pts, labs)
        state.mask_input = shown if rng.random() < self.cfg.prompts.p_mask else None
        return state

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
    @torch.no_grad()
    def validate(self) -> dict:
        """Mean Dice (low-resolution model frame) of box and 3-point prompts on clean and degraded validation planes."""
        if not self.val_items or not self.ctx.is_main:
            return {}
        was_training = self.decoder.training
        self.decoder.eval()
        scores: dict[str, list[float]] = {}
        try:
            for i, item in enumerate(self.val_items):
                tgt = self.val_bank.targets.get(i)
                if tgt is None:
                    continue
                masks = tgt.masks
                if masks.shape[0] > self.cfg.val_max_objects:
                    idx = np.sort(rng_for(self.cfg.seed, "val-objects", item.key).choice(
                        masks.shape[0], self.cfg.val_max_objects, replace=False))
                    masks = masks[idx]
                n = masks.shape[0]
                gt_np = masks.numpy()
                target = masks[:, None].to(self.device)
                valid = tgt.valid[None, None].expand(n, 1, -1, -1).to(self.device)
                scale = tgt.frame.model_size / masks.shape[-1]
                boxes = torch.as_tensor(np.stack([tight_box(m) for m in gt_np]) * scale, dtype=torch.float32,
                                        device=self.device)
                pts = np.stack([random_positive_points(m, 3, rng_for(self.cfg.seed, "val-points", item.key, j))
                                for j, m in enumerate(gt_np)])
                points = (torch.as_tensor(pts * scale, dtype=torch.float32, device=self.device),
                          torch.ones(pts.shape[:2], dtype=torch.int64, device=self.device))
                for v, cond in ((0, "clean"), (1, "degraded")):
                    feats = self.val_bank.batch([(i, v)], self.device)
                    pge = self.cfg.head == "pge"
                    emb = self._embeddings(feats, grad=False)
                    if not pge:
                        image_features = self.decoder.image_level_features(emb, feats["early_features"])
                    for prompt, kw in (("box", dict(points=None, boxes=boxes)), ("points3", dict(points=points, boxes=None))):
                        sparse, dense = self.model.prompt_encoder(masks=None, **kw)
                        if pge:
                            low, _ = self.model.decode(feats, sparse, dense, False, prompts=(kw["points"], kw["boxes"]))
                        else:
                            low, _ = self.decoder(emb, self._dense_pe(), sparse, dense, False,
                                                  image_features=image_features)
                        d = dice_score(low[:, :1], target, valid)
                        scores.setdefault(f"val_dice_{cond}_{prompt}", []).extend(d.tolist())
        finally:
            self.decoder.train(was_training)
        out = {k: float(np.mean(v)) for k, v in scores.items() if v}
        if out:
            out["val_score"] = float(np.mean(list(out.values())))
        return out

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

    def _metadata(self, metrics: dict, kind: str) -> dict:
        from napari_robustmedsam.checkpoints import make_metadata

        loaded = self.loaded
        cfg = self.cfg
        extra_meta = {}
        if cfg.head == "pge":
            from napari_robustmedsam.models.pge_enhancer import head_metadata

            extra_meta["head"] = head_metadata(self.model.feature_enhancer)
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
                "trained": ["mask_decoder"] + (["image_encoder.neck (singular values)"] if self.svd is not None else [])
                + (["feature_enhancer (PGE-SAM head)"] if cfg.head == "pge" else []),
                "frozen": ["image_encoder" if self.svd is None else "image_encoder except neck singular values",
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
                    "data": self.data_description,
                    "epoch": self.epoch,
                    "global_step": self.global_step,
                    "metrics": metrics,
                    "best": dict(self.best),
                    "world_size": self.ctx.world_size,
                    "consistency_terms": bool(cfg.weights.consistency),
                }
            },
        )

    def _save_checkpoint(self, path: Path, metrics: dict, kind: str) -> Path:
        from napari_robustmedsam.checkpoints import save_checkpoint

        try:
            return save_checkpoint(path, self.full_state_dict(), self._metadata(metrics, kind))
        except UserFacingError as err:
            raise TrainingError(str(err)) from None

    def _save_state(self, completed: bool) -> None:
        from napari_robustmedsam.checkpoints.project_format import atomic_torch_save

        state = {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "fingerprint": self.cfg.fingerprint(),
            "config": self.cfg.to_dict(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "train_seconds": self.train_seconds,
            "planes_seen": self.planes_seen,
            "decoder": self._decoder_state(),
            "svd": None if self.svd is None else {k: v.detach().cpu() for k, v in self.svd.state_dict().items()},
            "enhancer": None if self.model.feature_enhancer is None else {
                k: v.detach().cpu().clone() for k, v in self.model.feature_enhancer.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "history": self.history,
            "step_log": self.step_log,
            "best": dict(self.best),
            "torch_rng": torch.get_rng_state(),
            "completed": bool(completed),
        }
        try:
            atomic_torch_save(state, self.state_path)
        except UserFacingError as err:
            raise TrainingError(str(err)) from None

    def save(self, metrics: dict, completed: bool = False) -> None:
        """last.pth (+ train_state.pt) atomically; rank 0 only."""
        if not self.ctx.is_main:
            return
        self._save_checkpoint(self.last_path, metrics, "last")
        self._save_state(completed)

    def load_state(self) -> None:
        if not self.state_path.is_file():
            raise TrainingError(f"nothing to resume: {self.state_path} does not exist (run without --resume first)")
        from napari_robustmedsam.checkpoints.safe_load import load_untrusted

        try:
            state = load_untrusted(
                self.state_path,
                what="training state",
                source_hint="a fresh run (start without --resume, or choose another --out)",
                fix="training.fit writes only tensors and numbers there, so this file was not written by it or was "
                "altered: delete it and start without --resume, or choose another --out",
            )
        except UserFacingError as err:
            raise TrainingError(f"cannot resume from {self.state_path}: {err}") from None
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise TrainingError(f"{self.state_path} is not a training state written by training.fit")
        if state["fingerprint"] != self.cfg.fingerprint():
            old = state.get("config", {})
            new = self.cfg.to_dict()
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k)
                          and k not in ("epochs", "time_budget_s", "save_every_steps", "cache_dir", "use_cache",
                                        "memory_gb", "threads", "progress_bar", "lr", "device"))
            raise TrainingError(
                f"cannot resume {self.out_dir}: the settings differ from the interrupted run ({', '.join(diff)}); "
                "use the same options (only --epochs, --time-budget and --lr may change) or another --out"
            )
        self._restore_real()
        try:
            self.decoder.load_state_dict(state["decoder"])
        finally:
            self._install_standins()
        if self.svd is not None and state.get("svd") is not None:
            self.svd.load_state_dict(state["svd"])
        if self.model.feature_enhancer is not None:
            if state.get("enhancer") is None:
                raise TrainingError(f"{self.state_path} holds no feature-enhancer weights to resume the PGE head from")
            self.model.feature_enhancer.load_state_dict(state["enhancer"])
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:
            group["initial_lr"] = self.cfg.lr
        self.epoch = int(state["epoch"])
        self.step_in_epoch = int(state["step_in_epoch"])
        self.global_step = int(state["global_step"])
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self.planes_seen = int(state.get("planes_seen", 0))
        self.history = list(state.get("history", []))
        self.step_log = list(state.get("step_log", []))
        self.best = dict(state.get("best", {"score": None, "epoch": None}))
        torch.set_rng_state(state["torch_rng"])
        self.notices.append(f"resumed from {self.state_path} at epoch {self.epoch + 1}, iteration {self.step_in_epoch}")

    # ------------------------------------------------------------------ logs
    def write_logs(self, stopped: str = "", message: str = "") -> None:
        if not self.ctx.is_main:
            return
        from napari_robustmedsam.io.atomic import atomic_write_path

        fields: list[str] = []
        for row in self.history:
            for k in row:
                if k not in fields:
                    fields.append(k)
        with atomic_write_path(self.out_dir / "log.csv") as tmp:
            with open(tmp, "w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=fields)
                writer.writeheader()
                for row in self.history:
                    writer.writerow(row)
        payload = {
            "config": self.cfg.to_dict(),
            "base_model": {"name": self.loaded.name, "sha256": self.loaded.sha256},
            "data": self.data_description,
            "history": self.history,
            "steps": self.step_log,
            "best": self.best,
            "stopped": stopped,
            "message": message,
            "notices": self.notices,
            "feature_seconds": getattr(self, "feature_seconds", None),
            "train_seconds": self.train_seconds,
            "planes_seen": self.planes_seen,
            "samples_per_s": self.planes_seen / self.train_seconds if self.train_seconds else None,
            "peak_rss_mb": peak_rss_mb(),
            "world_size": self.ctx.world_size,
        }
        with atomic_write_path(self.out_dir / "log.json") as tmp:
            Path(tmp).write_text(json.dumps(payload, indent=1, default=float))
        try:
            plot_history(self.history, self.step_log, self.out_dir / "training.png")
        except Exception as err:  # noqa: BLE001 - a plot must never fail a run
            self.notices.append(f"could not draw training.png: {err}")

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
               "peak_rss_mb": peak_rss_mb()}
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
