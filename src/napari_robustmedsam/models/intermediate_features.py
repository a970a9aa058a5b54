"""Capture the multi-scale intermediate encoder features PGE-SAM's enhancer gates (deepest first).

Which features (PGE-SAM Sec. 3.2; the issue's choice for TinyViT):

SAM / MedSAM ViT
    Outputs of the third, second and first global-attention blocks (``window_size == 0``), all
    ``(B, 64, 64, embed_dim)`` channels-last; returned channels-first.

LiteMedSAM TinyViT (256 px input)
    Stage outputs ``layers[2]`` (320 ch, 64 x 64), ``layers[1]`` (160 ch, 64 x 64) and ``layers[0]``
    (128 ch, 128 x 128), emitted as tokens and reshaped to channels-first grids.

The hooks do not change the encoder; the captured tensors are detached (the encoder is frozen).
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from .early_features import _is_tiny_vit, _is_vit, _unwrap

#: Feature keys in the embedding engine's feature dicts, deepest first.
INTERMEDIATE_KEYS = ("pge_feature_0", "pge_feature_1", "pge_feature_2")


def intermediate_spec(image_encoder: nn.Module) -> tuple[list[nn.Module], tuple[int, ...], tuple[int, ...]]:
    """(modules to hook, deepest first; their channels; their grid side relative to the 64 x 64 embedding)."""
    encoder = _unwrap(image_encoder)
    if _is_vit(encoder):
        globals_ = [b for b in encoder.blocks if b.window_size == 0]
        if len(globals_) < 3:
            raise TypeError(f"ViT encoder has {len(globals_)} global-attention blocks; the enhancer needs 3")
        modules = globals_[:3][::-1]
        channels = tuple(int(b.norm1.normalized_shape[0]) for b in modules)
        return modules, channels, (1, 1, 1)
    if _is_tiny_vit(encoder):
        modules = [encoder.layers[2], encoder.layers[1], encoder.layers[0]]
        channels = []
        for stage in modules:
            down = getattr(stage, "downsample", None)
            channels.append(int(down.out_dim) if down is not None else int(stage.dim))
        return modules, tuple(channels), (1, 1, 2)
    raise TypeError(f"unsupported image encoder {type(encoder).__name__} for the feature enhancer")


class IntermediateFeatureCapture:
    """Context manager: records the enhancer's intermediate features during one encoder forward."""

    def __init__(self, image_encoder: nn.Module) -> None:
        self.modules, self.channels, self.strides = intermediate_spec(image_encoder)
        self._handles: list = []
        self._features: dict[int, Tensor] = {}

    def _hook(self, index: int):
        channels = self.channels[index]

        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            out = output.detach()
            if out.dim() == 3:  # TinyViT tokens (B, HW, C)
                b, length, c = out.shape
                side = math.isqrt(length)
                if side * side != length or c != channels:
                    raise RuntimeError(f"cannot reshape {tuple(out.shape)} TinyViT tokens to a square grid")
                out = out.reshape(b, side, side, c)
            self._features[index] = out.permute(0, 3, 1, 2).contiguous()  # channels-first

        return hook

    def __enter__(self) -> "IntermediateFeatureCapture":
        self._handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self.modules)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @property
    def features(self) -> dict[str, Tensor]:
        if len(self._features) != len(self.modules):
            raise RuntimeError("intermediate features not captured: run the image encoder inside the capture")
        return {INTERMEDIATE_KEYS[i]: self._features[i] for i in range(len(self.modules))}


def has_intermediates(features: dict) -> bool:
    return all(k in features for k in INTERMEDIATE_KEYS)


def stack_intermediates(features: dict) -> list[Tensor]:
    missing = [k for k in INTERMEDIATE_KEYS if k not in features]
    if missing:
        raise KeyError(f"intermediate encoder features {missing} missing (recompute the embedding)")
    return [features[k] for k in INTERMEDIATE_KEYS]


__all__ = ["INTERMEDIATE_KEYS", "IntermediateFeatureCapture", "has_intermediates", "intermediate_spec",
           "stack_intermediates"]

