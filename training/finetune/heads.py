"""The trainer's heads: what is trained on top of the frozen encoders, each an object with its own base model,
trained parameters, training step, validation decoding and checkpoint metadata. The loop
(:class:`~.trainer.Trainer`) asks the head of ``TrainConfig.head`` and knows none of them by name.

A new head: a :class:`Head` subclass here, its step in its own module (as :mod:`.robust_step` and :mod:`.pge_step`),
its settings as ``setting(..., head="name")`` fields of :class:`~.config.TrainConfig`, an entry in :data:`HEADS`.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from napari_robustmedsam.checkpoints import load_model
from napari_robustmedsam.errors import UserFacingError
from napari_robustmedsam.models.pge_enhancer import enhancer_for, head_metadata

from .data import TrainingError
from .pge_step import pge_train_step
from .robust_step import robust_train_step
from .svd_neck import SVDNeck

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


def load_pge_base_model(name_or_path: str, device: str, blocks_per_stage: int = 1, **enhancer_options):
    """The model to train a PGE head on: its plain decoder, and its enhancer (a new identity one if it has none,
    shaped by ``enhancer_options``: work_stride, width, gate_channels)."""
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


class Head:
    """What a head contributes to a run (see the module docstring)."""

    name = ""
    base_model = "litemedsam_robust"  # the model a run starts from when --model is not given
    consistency_terms = True  # trains with the clean/degraded consistency losses of the robust decoder

    def load(self, cfg, device) -> Any:
        raise NotImplementedError

    def trainable_parameters(self, tr) -> list[torch.nn.Parameter]:
        """Mark the head's trained parameters (``tr.model`` is frozen before) and return them."""
        raise NotImplementedError

    def bank_features(self, cfg) -> dict:
        """What the feature banks store besides the embeddings (keyword arguments of FeatureBank)."""
        return {}

    def train_step(self, tr, planes: list[int], rng: np.random.Generator) -> dict:
        raise NotImplementedError

    def validation_decoder(self, tr, feats: dict) -> Callable:
        """``decode(sparse, dense, points, boxes) -> low-resolution logits`` for one validation image."""
        raise NotImplementedError

    def trained_parts(self, tr) -> list[str]:
        """The parts of the checkpoint this head trained besides the mask decoder (provenance)."""
        return []

    def checkpoint_metadata(self, tr) -> dict:
        """Extra top-level metadata of the checkpoints (e.g. the head's configuration)."""
        return {}


class RobustDecoderHead(Head):
    """RobustSAM's robust decoder: the whole mask decoder or only its robust modules; frozen identity AMFG blocks
    are replaced by stand-ins while training; optionally the encoder neck's singular values (--svd-neck)."""

    name = "robust"

    def load(self, cfg, device):
        return load_base_model(cfg.model, device)

    def trainable_parameters(self, tr):
        cfg, decoder = tr.cfg, tr.decoder
        named = list(decoder.named_parameters()) if cfg.trainable == "decoder" else decoder.robust_named_parameters()
        if not cfg.train_amfg:
            named = [(n, p) for n, p in named if n.split(".")[0] not in AMFG_NAMES]
        params = [p for _, p in named]
        for p in params:
            p.requires_grad_(True)
        if not cfg.train_amfg:
            for name in AMFG_NAMES:
                block = getattr(decoder, name)
                if _outputs_zero(block):
                    tr._swapped[name] = block
            tr._install_standins()
            if tr._swapped:
                tr.notices.append(
                    "AMFG blocks frozen (" + ", ".join(sorted(tr._swapped)) + " output exactly zero, as "
                    "identity-initialised: they are skipped during training)")
        if cfg.svd_neck:
            tr.svd = SVDNeck(tr.model.image_encoder.neck).to(tr.device)
            params = params + tr.svd.trainable_parameters()
        return params

    def bank_features(self, cfg):
        return {"neck_input": cfg.svd_neck}

    def train_step(self, tr, planes, rng):
        return robust_train_step(tr, planes, rng)

    def validation_decoder(self, tr, feats):
        emb = tr.embeddings_of(feats, grad=False)
        image_features = tr.decoder.image_level_features(emb, feats["early_features"])

        def decode(sparse, dense, points, boxes):
            return tr.decoder(emb, tr.dense_pe(), sparse, dense, False, image_features=image_features)[0]

        return decode


class PGEHead(Head):
    """PGE-SAM's prompt-guided feature enhancer, trained jointly with the whole mask decoder (encoders frozen)."""

    name = "pge"
    base_model = "litemedsam"
    consistency_terms = False  # its feature term is the foreground reconstruction loss (fr_weight)

    def load(self, cfg, device):
        return load_pge_base_model(cfg.model, device, cfg.enhancer_blocks, work_stride=cfg.enhancer_work_stride,
                                   width=cfg.enhancer_width, gate_channels=cfg.enhancer_gate_channels)

    def trainable_parameters(self, tr):
        enhancer = tr.model.feature_enhancer
        params = list(tr.decoder.parameters()) + list(enhancer.parameters())
        for p in params:
            p.requires_grad_(True)
        tr.notices.append(f"PGE head: {enhancer.parameter_count() / 1e6:.2f} M enhancer parameters + "
                          f"{sum(p.numel() for p in tr.decoder.parameters()) / 1e6:.2f} M decoder parameters trained")
        return params

    def bank_features(self, cfg):
        return {"intermediates": True}

    def train_step(self, tr, planes, rng):
        return pge_train_step(tr, planes, rng)

    def validation_decoder(self, tr, feats):
        def decode(sparse, dense, points, boxes):
            return tr.model.decode(feats, sparse, dense, False, prompts=(points, boxes))[0]

        return decode

    def trained_parts(self, tr):
        return ["feature_enhancer (PGE-SAM head)"]

    def checkpoint_metadata(self, tr):
        return {"head": head_metadata(tr.model.feature_enhancer)}


HEADS: dict[str, Head] = {head.name: head for head in (RobustDecoderHead(), PGEHead())}


def head_for(name: str) -> Head:
    try:
        return HEADS[name]
    except KeyError:
        raise TrainingError(f"unknown head {name!r}; valid: {', '.join(HEADS)}") from None
