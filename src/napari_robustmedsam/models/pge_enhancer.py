"""PGE-SAM's prompt-guided feature enhancer: a second robust head between the frozen encoder and the decoder.

Why: decoder-side robust heads (RobustSAM's AMFG/AOTG, a fine-tuned decoder) restore features once per
image, globally; PGE-SAM (``../shared/seeds/pge-sam.txt`` Sec. 3) restores the degraded embedding per
interaction, guided by where the user's clicks, box and previous mask point, and mixes in intermediate
encoder features through attention gates. It therefore runs on every click.

Structure (Sec. 3.1-3.2, App. 0.C):

* :class:`PromptGuidanceGenerator` (PGG): positive / negative clicks and the box rendered as Gaussian maps on
  the embedding grid and encoded by small conv stacks (summed), the previous mask through the frozen prompt
  encoder's dense path (the ``dense`` embedding the decoder gets anyway) and a 1x1 projection; the two are
  concatenated and fused by a 1x1 convolution into the guidance feature ``G``.
* Three stages. Stage ``i`` gates an intermediate encoder feature ``F_i`` (deepest first) with a
  :class:`MultiScaleAttentionGate` conditioned on the current enhanced feature ``x``, then
  ``x = EBlocks(x + gated + G)``. :class:`EBlock` is NAFNet's block with the spatial-channel module of the
  paper (parallel depth-wise convolutions of several kernel sizes + simplified channel attention).
* ``enhanced = degraded + out_proj(x)``; ``out_proj`` starts at zero, so an untrained enhancer is the
  identity and fine-tuning starts from the base model's masks.

Per-image work (projecting the intermediate features and the gate's feature branch) is split off in
:meth:`PromptGuidedEnhancer.image_side`, so an annotator computes it once per image and every click only
runs the prompt-dependent part.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from segment_anything.modeling.common import LayerNorm2d
from torch import Tensor, nn

__all__ = [
    "EBlock",
    "EnhancerConfig",
    "MultiScaleAttentionGate",
    "PromptGuidanceGenerator",
    "PromptGuidedEnhancer",
    "render_prompt_maps",
]

#: Prefix of the enhancer's parameters in a segmenter state dict / checkpoint.
ENHANCER_PREFIX = "feature_enhancer."


@dataclass(frozen=True)
class EnhancerConfig:
    """Shape of an enhancer; stored in checkpoints so that a file rebuilds its own head."""

    feature_channels: tuple[int, ...]  # channels of the intermediate features, deepest first (one per stage)
    feature_strides: tuple[int, ...]  # their grid side / embedding grid side (2 = twice as fine)
    blocks_per_stage: int = 1  # 1: lite (PGE-SAM's LiteMedSAM setting), 5: full (ViT-B)
    channels: int = 256  # embedding channels
    gate_channels: int = 64  # inner channels of the attention gates
    guidance_hidden: int = 32  # hidden channels of the PGG's map encoders
    gate_kernels: tuple[int, ...] = (7, 11)  # multi-scale large-kernel depth-wise convs in each gate
    block_kernels: tuple[int, ...] = (3, 5, 7)  # depth-wise convs of the EBlock's spatial branch
    point_sigma: float = 1.5  # Gaussian of a click, in embedding-grid cells
    box_sigma_scale: float = 0.5  # box Gaussian sigma = scale x half the box side
    image_size: int = 256  # model input side (prompt coordinates are in this frame)
    work_stride: int = 1  # the stages run on the embedding grid / work_stride; the residual is upsampled back
    width: int = 0  # channels the stages work with (0: the embedding's); 1x1 projections in and out otherwise

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "EnhancerConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown enhancer settings {sorted(unknown)}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**values)

    @property
    def stages(self) -> int:
        return len(self.feature_channels)

    @property
    def working_channels(self) -> int:
        return self.width or self.channels

    def summary(self) -> str:
        """One line for ``robustmedsam info`` and the widget: what shape of head this is."""
        grid = "the embedding grid" if self.work_stride == 1 else f"the embedding grid / {self.work_stride}"
        return f"{self.blocks_per_stage} EBlock(s) per stage on {grid}, {self.working_channels} channels"


def render_prompt_maps(
    points: tuple[Tensor, Tensor] | None,
    boxes: Tensor | None,
    n: int,
    grid: int,
    image_size: int,
    point_sigma: float,
    box_sigma_scale: float,
    device: torch.device,
    dtype: torch.dtype,
) -> Tensor:
    """(N, 3, grid, grid) maps: positive clicks, negative clicks (max of Gaussians), box Gaussian.

    ``points``: coordinates (N, P, 2) in the model input frame and labels (N, P) (1 positive, 0 negative,
    anything else, e.g. SAM's -1 padding, ignored); ``boxes`` (N, 4) x0, y0, x1, y1 in the same frame.
    """
    cell = image_size / grid
    centres = (torch.arange(grid, device=device, dtype=dtype) + 0.5) * cell
    yy, xx = centres[:, None], centres[None, :]
    maps = torch.zeros(n, 3, grid, grid, device=device, dtype=dtype)
    if points is not None:
        coords, labels = points
        coords = coords.to(device=device, dtype=dtype)
        labels = labels.to(device)
        sigma = point_sigma * cell
        dx = xx[None, None] - coords[..., 0, None, None]  # (N, P, grid, grid)
        dy = yy[None, None] - coords[..., 1, None, None]
        g = torch.exp(-(dx.square() + dy.square()) / (2 * sigma * sigma))
        for channel, label in ((0, 1), (1, 0)):
            keep = (labels == label)[..., None, None]
            if keep.any():
                maps[:, channel] = torch.where(keep, g, torch.zeros_like(g)).amax(dim=1)
    if boxes is not None:
        b = boxes.to(device=device, dtype=dtype).reshape(n, 4)
        cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
        sx = ((b[:, 2] - b[:, 0]) / 2 * box_sigma_scale).clamp_min(cell / 2)
        sy = ((b[:, 3] - b[:, 1]) / 2 * box_sigma_scale).clamp_min(cell / 2)
        gx = (xx[None] - cx[:, None, None]).square() / (2 * sx[:, None, None].square())
        gy = (yy[None] - cy[:, None, None]).square() / (2 * sy[:, None, None].square())
        maps[:, 2] = torch.exp(-(gx + gy))
    return maps


class PromptGuidanceGenerator(nn.Module):
    """Prompts (+ the previous mask's dense embedding) -> guidance feature G (N, C, grid, grid)."""

    def __init__(self, channels: int, hidden: int, dense_channels: int | None = None) -> None:
        super().__init__()
        self.point_encoder = nn.Sequential(
            nn.Conv2d(2, hidden, 3, padding=1), nn.GELU(), nn.Conv2d(hidden, channels, 3, padding=1)
        )
        self.box_encoder = nn.Sequential(
            nn.Conv2d(1, hidden, 3, padding=1), nn.GELU(), nn.Conv2d(hidden, channels, 3, padding=1)
        )
        self.mask_proj = nn.Conv2d(dense_channels or channels, channels, 1)
        self.fuse = nn.Conv2d(2 * channels, channels, 1)

    def forward(self, maps: Tensor, dense: Tensor) -> Tensor:
        geometric = self.point_encoder(maps[:, :2]) + self.box_encoder(maps[:, 2:3])
        mask_prior = self.mask_proj(dense.expand(maps.shape[0], -1, -1, -1))
        return self.fuse(torch.cat((geometric, mask_prior), dim=1))


def channel_norm(norm: LayerNorm2d, x: Tensor) -> Tensor:
    """``LayerNorm2d`` (normalise over channels per pixel) as one fused ``layer_norm`` over a channels-last view:
    the same values, without the five elementwise passes of segment_anything's implementation."""
    y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), norm.weight, norm.bias, norm.eps)
    return y.permute(0, 3, 1, 2)


def merged_depthwise(convs: nn.ModuleList, identity: bool = False) -> tuple[Tensor, Tensor, int]:
    """Parallel same-centre depth-wise convolutions (summed) as one: the kernels zero-padded to the largest
    and added (plus a centre 1 for ``identity``, the branch ``x + sum(conv(x))``). The same values with one
    convolution instead of several; gradients reach every kernel, so training uses it as well."""
    k = max(conv.kernel_size[0] for conv in convs)
    weight = sum(F.pad(conv.weight, [(k - conv.kernel_size[0]) // 2] * 4) for conv in convs)
    if identity:
        centre = torch.ones_like(weight[:, :, :1, :1])
        weight = weight + F.pad(centre, [k // 2] * 4)
    bias = sum(conv.bias for conv in convs)
    return weight, bias, k


def depthwise_sum(convs: nn.ModuleList, x: Tensor, identity: bool = False) -> Tensor:
    """``(x if identity else 0) + sum(conv(x) for conv in convs)`` in one depth-wise convolution."""
    weight, bias, k = merged_depthwise(convs, identity)
    return F.conv2d(x, weight, bias, padding=k // 2, groups=x.shape[1])


class _SimpleGate(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        a, b = x.chunk(2, dim=1)
        return a * b


class EBlock(nn.Module):
    """NAFNet block whose spatial mixing is a spatial-channel module (multi-kernel depth-wise + SCA)."""

    def __init__(self, channels: int, kernels: tuple[int, ...] = (3, 5, 7)) -> None:
        super().__init__()
        c = channels
        self.norm1 = LayerNorm2d(c)
        self.conv_in = nn.Conv2d(c, c, 1)
        self.spatial = nn.ModuleList(nn.Conv2d(c, c, k, padding=k // 2, groups=c) for k in kernels)
        self.channel = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, c, 1))  # simplified channel attention
        self.conv_out = nn.Conv2d(c, c, 1)
        self.norm2 = LayerNorm2d(c)
        self.ffn = nn.Sequential(nn.Conv2d(c, 2 * c, 1), _SimpleGate(), nn.Conv2d(c, c, 1))
        # NAFNet's zero-initialised residual scales: a new block starts as the identity
        self.beta = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.gamma = nn.Parameter(torch.zeros(1, c, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv_in(channel_norm(self.norm1, x))
        spatial = depthwise_sum(self.spatial, y)
        channel = y * self.channel(y)
        x = x + self.beta * self.conv_out(spatial + channel)
        return x + self.gamma * self.ffn(channel_norm(self.norm2, x))


class MultiScaleAttentionGate(nn.Module):
    """Attention gate over an intermediate feature, conditioned on the current enhanced feature.

    3x3 projections instead of the original gate's 1x1, plus parallel large-kernel depth-wise convolutions
    on the joint map (PGE-SAM Fig. 3b). The feature branch depends on the image only (:meth:`feature_side`).
    """

    def __init__(self, in_channels: int, channels: int, gate_channels: int, stride: int,
                 kernels: tuple[int, ...] = (7, 11)) -> None:
        super().__init__()
        if stride not in (1, 2, 4, 8):
            raise ValueError(f"intermediate feature stride {stride} not supported (1, 2, 4 or 8)")
        self.stride = stride
        self.project = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1)
        self.theta = nn.Conv2d(channels, gate_channels, 3, padding=1)
        self.phi = nn.Conv2d(channels, gate_channels, 3, padding=1)
        self.scales = nn.ModuleList(
            nn.Conv2d(gate_channels, gate_channels, k, padding=k // 2, groups=gate_channels) for k in kernels
        )
        self.psi = nn.Conv2d(gate_channels, 1, 1)

    def feature_side(self, feature: Tensor) -> tuple[Tensor, Tensor]:
        """Image-only part: the projected feature and its gate branch."""
        projected = self.project(feature)
        return projected, self.theta(projected)

    def forward(self, side: tuple[Tensor, Tensor], gate: Tensor) -> Tensor:
        projected, theta = side
        joint = F.relu(theta + self.phi(gate))  # theta broadcasts over the prompts
        joint = depthwise_sum(self.scales, joint, identity=True)
        alpha = torch.sigmoid(self.psi(joint))
        return alpha * projected


def _pool(dense: Tensor, stride: int) -> Tensor:
    """Average-pool a dense prompt embedding; the no-mask embedding (one vector broadcast over the grid, zero
    spatial strides) is pooled by taking every ``stride``-th cell: the same values without reading the grid."""
    if dense.stride(-1) == 0 and dense.stride(-2) == 0:
        return dense[..., ::stride, ::stride]
    return F.avg_pool2d(dense, stride)


def _channels_last(x: Tensor) -> Tensor:
    """Channels-last memory (same values): oneDNN's CPU convolutions and the per-pixel LayerNorm are faster on
    it, and the decoder's token-major view of the output needs no copy."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


class PromptGuidedEnhancer(nn.Module):
    """Degraded embedding + intermediate features + prompts -> enhanced embedding, per object."""

    def __init__(self, config: EnhancerConfig) -> None:
        super().__init__()
        if len(config.feature_strides) != config.stages:
            raise ValueError("feature_channels and feature_strides must have one entry per stage")
        if config.work_stride not in (1, 2, 4):
            raise ValueError(f"enhancer work_stride {config.work_stride} not supported (1, 2 or 4)")
        self.config = config
        c, w = config.channels, config.working_channels
        self.guidance = PromptGuidanceGenerator(w, config.guidance_hidden, dense_channels=c)
        self.gates = nn.ModuleList(
            MultiScaleAttentionGate(ch, w, config.gate_channels, s * config.work_stride, config.gate_kernels)
            for ch, s in zip(config.feature_channels, config.feature_strides)
        )
        self.stages = nn.ModuleList(
            nn.Sequential(*(EBlock(w, config.block_kernels) for _ in range(config.blocks_per_stage)))
            for _ in range(config.stages)
        )
        # a narrower working width reads the embedding through a projection (none at full width: old files load)
        self.in_proj = nn.Conv2d(c, w, 1) if w != c else None
        self.out_proj = nn.Conv2d(w, c, 1)
        nn.init.zeros_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)

    def image_side(self, intermediates: list[Tensor] | tuple[Tensor, ...]) -> list[tuple[Tensor, Tensor]]:
        """Per-image part: intermediate features (deepest first, channels-first) through the gates' projections."""
        if len(intermediates) != len(self.gates):
            raise ValueError(f"the enhancer needs {len(self.gates)} intermediate features, got {len(intermediates)}")
        return [gate.feature_side(_channels_last(f)) for gate, f in zip(self.gates, intermediates)]

    def embedding_side(self, embeddings: Tensor) -> tuple[Tensor, Tensor]:
        """Per-image part of the embedding path: the embedding in channels-last memory (the enhancer works
        channels-last) and the stages' input, pooled to the working grid and projected to the working width."""
        embeddings = _channels_last(embeddings)
        x = F.avg_pool2d(embeddings, self.config.work_stride) if self.config.work_stride > 1 else embeddings
        if self.in_proj is not None:
            x = self.in_proj(x)
        return embeddings, x

    def forward(
        self,
        embeddings: Tensor,
        side: list[tuple[Tensor, Tensor]],
        points: tuple[Tensor, Tensor] | None,
        boxes: Tensor | None,
        dense: Tensor,
        embedding_side: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """``embeddings`` (1 or N, C, g, g); prompts in the model frame; ``dense`` the prompt encoder's dense
        embedding (the previous mask's, or the no-mask embedding); ``embedding_side``: a cached
        :meth:`embedding_side` of these embeddings. Returns (N, C, g, g)."""
        cfg = self.config
        n = max(dense.shape[0], embeddings.shape[0])
        if points is not None:
            n = max(n, points[0].shape[0])
        if boxes is not None:
            n = max(n, boxes.reshape(-1, 4).shape[0])
        embeddings, x = embedding_side if embedding_side is not None else self.embedding_side(embeddings)
        if cfg.work_stride > 1:  # a coarser working grid: about work_stride^2 times less work per click
            dense = _pool(dense, cfg.work_stride)
        dense = _channels_last(dense)
        grid = x.shape[-1]
        maps = render_prompt_maps(points, boxes, n, grid, cfg.image_size, cfg.point_sigma, cfg.box_sigma_scale,
                                  embeddings.device, embeddings.dtype)
        g = self.guidance(_channels_last(maps), dense)
        x = x.expand(n, -1, -1, -1) if x.shape[0] == 1 else x
        for gate, feature_side, stage in zip(self.gates, side, self.stages):
            x = stage(x + gate(feature_side, x) + g)
        residual = self.out_proj(x)
        if cfg.work_stride > 1:
            residual = F.interpolate(residual, size=embeddings.shape[-2:], mode="bilinear", align_corners=False)
        return embeddings + residual

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())


# ------------------------------------------------------------------------------------------------------
# configurations per encoder
# ------------------------------------------------------------------------------------------------------
def lite_config(blocks_per_stage: int = 1) -> EnhancerConfig:
    """LiteMedSAM's TinyViT: stage outputs layers[2] (320 ch, 64x64), layers[1] (160, 64x64), layers[0] (128, 128x128)."""
    return EnhancerConfig(feature_channels=(320, 160, 128), feature_strides=(1, 1, 2),
                          blocks_per_stage=blocks_per_stage, image_size=256)


def head_metadata(enhancer: PromptGuidedEnhancer) -> dict:
    """The checkpoint metadata entry ``head`` that lets a file rebuild its enhancer."""
    return {"kind": "pge", "config": enhancer.config.to_dict(), "parameters": enhancer.parameter_count()}


def enhancer_for(model: nn.Module, blocks_per_stage: int = 1, **overrides) -> PromptGuidedEnhancer:
    """A new (identity) enhancer matching ``model``'s image encoder."""
    from .intermediate_features import intermediate_spec

    _, channels, strides = intermediate_spec(model.image_encoder)
    cfg = EnhancerConfig(feature_channels=tuple(channels), feature_strides=tuple(strides),
                         blocks_per_stage=blocks_per_stage, image_size=int(model.architecture.image_size),
                         **overrides)
    return PromptGuidedEnhancer(cfg)
