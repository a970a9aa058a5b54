"""The settings of a fine-tuning run (:class:`TrainConfig`): each one declared once, with its default, its help text,
its ``python -m training.fit`` flag and its place in the resume fingerprint (:mod:`.options`).

The named recipes built from these settings (``--preset robust-lite`` ...) are :mod:`.presets`.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass

from napari_robustmedsam.degradations.levels import normalize_level

from .data import TrainingError
from .losses import LOSS, LossWeights
from .options import NEVER, UNLESS_DEFAULT, fingerprint_dict, setting
from .prompt_simulation import PromptConfig

RUN = "model and run"
DATA = "prompts and degradations"


def _minutes(text: str) -> float:
    try:
        return float(text) * 60.0
    except ValueError:
        raise TrainingError(f"--time-budget must be a number of minutes, got {text!r}") from None


def _levels(text: str) -> tuple[str, ...]:
    try:
        return tuple(normalize_level(v) for v in str(text).split(",") if v.strip())
    except Exception as err:  # noqa: BLE001 - DegradationError or a bad value: one line for the user
        raise TrainingError(str(err)) from None


def _level(text: str) -> str:
    try:
        return normalize_level(text)
    except Exception as err:  # noqa: BLE001
        raise TrainingError(str(err)) from None


@dataclass
class TrainConfig:
    model: str = setting("litemedsam_robust", "registry name or checkpoint to start from", flag="--model",
                         shown="litemedsam_robust; litemedsam for the PGE head", group=RUN)
    device: str = setting("cpu", "torch device", flag="--device", fingerprint=NEVER, group=RUN)
    epochs: int = setting(10, "epochs to train", flag="--epochs", fingerprint=NEVER, group=RUN)
    steps_per_epoch: int | None = setting(None, "iterations per epoch", flag="--steps", parse=int,
                                          shown="one pass over this process's share of the data", group=RUN)
    batch_size: int = setting(2, "images per iteration and process", flag="--batch-size", group=RUN)
    objects_per_image: int = setting(2, "objects per image per iteration", flag="--objects", group=RUN)
    lr: float = setting(1e-4, "AdamW learning rate", flag="--lr", fingerprint=NEVER, group=RUN)
    weight_decay: float = setting(0.01, "AdamW weight decay", flag="--weight-decay", group=RUN)
    lr_decay: float = setting(0.9, "learning-rate factor per epoch (MedicoSAM)", flag="--lr-decay", group=RUN)
    grad_clip: float = setting(1.0, "gradient norm clip")
    trainable: str = setting("decoder", "train the whole mask decoder or only RobustSAM's added modules",
                             flag="--trainable", choices=("decoder", "robust"), group=RUN)
    train_amfg: bool = setting(True, "also train the three AMFG blocks (RobustSAM's full recipe; seconds per prompt "
                               "on a CPU)", flag="--train-amfg", off_flag="--frozen-amfg", group=RUN,
                               off_help="keep the AMFG blocks frozen (identity-initialised ones are then skipped: "
                               "fast on a CPU)")
    consistency_steps: str = setting("all", "consistency losses on every prediction of an iteration or only the "
                                     "first (cheaper)", flag="--consistency-steps", choices=("all", "first"),
                                     group=RUN)
    weights: LossWeights = setting(help="loss weights", default_factory=LossWeights)
    prompts: PromptConfig = setting(help="prompt simulation", default_factory=PromptConfig)
    variants: int = setting(3, "cached degraded variants per image", flag="--variants", group=DATA)
    levels: tuple[str, ...] = setting(("LQ-1", "LQ-2", "LQ-3", "LQ-3+"), "levels the variants are drawn from",
                                      flag="--levels", parse=_levels, shown="LQ-1,LQ-2,LQ-3,LQ-3+", group=DATA)
    p_identity: float = setting(0.2, "probability of a clean 'degraded' branch", flag="--p-identity", group=DATA)
    val_level: str = setting("LQ-3", "degradation level of the validation images", flag="--val-level", parse=_level,
                             group=DATA)
    val_max_objects: int = setting(3, "objects per validation image")
    seed: int = setting(0, "seed of every random choice of the run", flag="--seed", group=RUN)
    svd_neck: bool = setting(False, "also train the singular values of the encoder neck (RobustMedSAM Sec. 3.4)",
                             flag="--svd-neck", group=RUN)
    time_budget_s: float | None = setting(None, "stop training after this many minutes", flag="--time-budget",
                                          parse=_minutes, shown="no limit", fingerprint=NEVER, group=RUN)
    save_every_steps: int = setting(0, "also save a resumable state every N iterations (0: at epoch ends)",
                                    flag="--save-every", fingerprint=NEVER, group=RUN)
    cache_dir: str | None = setting(None, "feature cache folder", flag="--cache", parse=str,
                                    shown="the user cache, training-features/", fingerprint=NEVER, group=RUN)
    use_cache: bool = setting(True, "keep computed features in the disk cache", off_flag="--no-cache",
                              off_help="keep features in memory only", fingerprint=NEVER, group=RUN)
    memory_gb: float = setting(2.0, "features kept in RAM (the rest is read from the cache)", flag="--memory-gb",
                               fingerprint=NEVER, group=RUN)
    threads: int | None = setting(None, "torch threads", flag="--threads", parse=int, shown="torch's choice",
                                  fingerprint=NEVER, group=RUN)
    progress_bar: bool = setting(True, "show a progress bar", off_flag="--no-progress", off_help="no progress bar",
                                 fingerprint=NEVER, group=RUN)
    head: str = setting("robust", "robust: RobustSAM robust decoder; pge: PGE-SAM prompt-guided feature enhancer "
                        "trained jointly with the mask decoder (runs per click)", flag="--head",
                        choices=("robust", "pge"), fingerprint=UNLESS_DEFAULT, group=RUN)
    enhancer_blocks: int = setting(1, "EBlocks per stage of a new PGE enhancer (1 = lite; 5 = full)",
                                   flag="--enhancer-blocks", head="pge", group=RUN)
    enhancer_work_stride: int = setting(1, "a new PGE enhancer works on the embedding grid / this (2 = about 4x "
                                        "less work per click, its residual upsampled back)",
                                        flag="--enhancer-work-stride", choices=(1, 2, 4), head="pge",
                                        fingerprint=UNLESS_DEFAULT, group=RUN)
    enhancer_width: int = setting(0, "working channels of a new PGE enhancer (0 = the embedding's 256)",
                                  flag="--enhancer-width", head="pge", fingerprint=UNLESS_DEFAULT, group=RUN)
    enhancer_gate_channels: int = setting(64, "attention-gate channels of a new PGE enhancer",
                                          flag="--enhancer-gate-channels", head="pge", fingerprint=UNLESS_DEFAULT,
                                          group=RUN)
    fr_weight: float = setting(5.0, "PGE head: foreground reconstruction loss weight", flag="--w-fr", head="pge",
                               group=LOSS)

    def __post_init__(self) -> None:
        if self.head not in ("robust", "pge"):
            raise TrainingError(f"head must be 'robust' or 'pge', got {self.head!r}")
        if self.head == "pge" and self.svd_neck:
            raise TrainingError("the SVD neck option is for the robust decoder head; the PGE head keeps the encoder frozen")
        if int(self.enhancer_blocks) < 1:
            raise TrainingError(f"enhancer_blocks must be >= 1, got {self.enhancer_blocks}")
        if self.enhancer_work_stride not in (1, 2, 4):
            raise TrainingError(f"enhancer_work_stride must be 1, 2 or 4, got {self.enhancer_work_stride}")
        if self.enhancer_width < 0 or self.enhancer_gate_channels < 1:
            raise TrainingError("enhancer_width must be >= 0 (0: the embedding's channels) and "
                                f"enhancer_gate_channels >= 1, got {self.enhancer_width} / {self.enhancer_gate_channels}")
        if self.trainable not in ("decoder", "robust"):
            raise TrainingError(f"trainable must be 'decoder' or 'robust', got {self.trainable!r}")
        for name in ("epochs", "batch_size", "objects_per_image"):
            if int(getattr(self, name)) < 1:
                raise TrainingError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise TrainingError(f"steps per epoch must be >= 1, got {self.steps_per_epoch}")
        if self.consistency_steps not in ("all", "first"):
            raise TrainingError(f"consistency_steps must be 'all' or 'first', got {self.consistency_steps!r}")
        if not 0 <= self.p_identity <= 1:
            raise TrainingError("p_identity must be in [0, 1]")
        if self.lr <= 0 or not math.isfinite(self.lr):
            raise TrainingError(f"the learning rate must be a positive number, got {self.lr}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["weights"] = self.weights.to_dict()
        d["prompts"] = self.prompts.to_dict()
        d["levels"] = list(self.levels)
        return d

    def fingerprint(self) -> str:
        """Hash of the settings a resumed run must share; which ones is declared with each field (:mod:`.options`:
        the epochs, time budget, learning rate, device and caches may change; settings added later count only
        when they differ from their default, so older runs keep their fingerprint)."""
        d = fingerprint_dict(self, self.head)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]
