"""Anti-degradation Mask Feature Generation (AMFG) building blocks of RobustSAM.

RobustSAM (Chen et al., CVPR 2024, Sec. 3.2.2) refines three feature maps of SAM's
mask decoder before they are fused into the "robust mask feature":

* the early ViT features (output of the first global-attention block, ``vit_dim``
  channels at 64 x 64)                      -> :class:`EarlyFeatureAMFG`
* the final 256-channel image embedding (64 x 64)  -> :class:`EmbeddingAMFG`
* the 32-channel upscaled mask features (256 x 256) -> :class:`MaskFeatureAMFG`

Each block has the same refinement trunk followed by a block-specific resampling
head that brings the result to 32 channels at 256 x 256:

1. DNC ("dual normalisation + channel attention", :class:`DualNormBlock`): a
   selective convolution over a BatchNorm branch and an InstanceNorm branch
   (:class:`SelectiveNormConv`; IN removes image "style" such as degradations, BN
   keeps detail), the result concatenated with the input, then squeeze-excitation
   channel attention (:class:`SqueezeExcitation`).  Doubles the channel count.
2. FGM, the Fourier degradation-suppression module (:class:`FourierModulation`).
3. a 3 x 3 convolution back to the input channel count.
4. the resampling head (transposed convolutions for the 64 x 64 inputs, a small
   convolution stack for the mask features).

With ``refine=False`` the trunk is skipped and only the resampling head runs: that
is the "clean" branch of RobustSAM's training (the reference's ``clear=True``).

Checkpoint compatibility
------------------------
Module attribute names and tensor shapes reproduce the layout of the released
RobustSAM checkpoints (``fourier_*_features.dnc_block_combined.SEMBlock.maxpool_conv.0.*``
and so on), so those state dicts load without renaming.  Some of these names are
historical (``SEMBlock``, ``maxpool_conv``, ``upsample_layer``); they are kept only
for the key layout.

FGM modes
---------
``fgm_mode="released"`` (default)
    The FGM returns its input unchanged.  This is what the released RobustSAM code
    does: its FGM computes a filtered spectrum and then discards it, so every
    released RobustSAM / RobustMedSAM weight was trained with an identity FGM (its
    ``conv_layer`` weights in the checkpoint never received a gradient).  Use this
    mode for all released weights.
``fgm_mode="paper"``
    The module as the paper describes it: 2-D FFT over the spatial axes, the
    amplitude spectrum filtered by the 1 x 1 convolution, the phase kept, inverse
    FFT, real part.  Only meaningful for weights trained in this mode; with
    released weights it feeds untrained filters into trained layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling.common import LayerNorm2d
from torch import nn

FGM_MODES: tuple[str, ...] = ("released", "paper")

__all__ = [
    "FGM_MODES",
    "DualNormBlock",
    "EarlyFeatureAMFG",
    "EmbeddingAMFG",
    "FourierModulation",
    "MaskFeatureAMFG",
    "SelectiveNormConv",
    "SpatialSelector",
    "SqueezeExcitation",
    "check_fgm_mode",
]


def check_fgm_mode(mode: str) -> str:
    """Return ``mode`` if it is a known FGM mode, else raise ``ValueError``."""
    if mode not in FGM_MODES:
        raise ValueError(f"fgm_mode must be one of {FGM_MODES}, got {mode!r}")
    return mode


class SpatialSelector(nn.Module):
    """Soft selection weights between two branches on a coarse spatial grid.

    The summed branch output is average-pooled to a ``grid x grid`` map, flattened,
    squeezed by a bias-free linear layer (``fc``) and expanded by two linear heads
    (``att_conv1``/``att_conv2``) into one logit map per branch.  A softmax across the
    two branches gives per-channel, per-cell weights that are upsampled (nearest) to
    the full resolution.
    """

    def __init__(self, channels: int, reduction: int = 16, grid: int = 4) -> None:
        super().__init__()
        self.grid = grid
        flat = channels * grid * grid
        self.fc = nn.Sequential(nn.Linear(flat, flat // reduction, bias=False), nn.ReLU(inplace=True))
        self.att_conv1 = nn.Linear(flat // reduction, flat)
        self.att_conv2 = nn.Linear(flat // reduction, flat)

    def forward(self, summed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, channels, height, width = summed.shape
        pooled = F.adaptive_avg_pool2d(summed, self.grid).reshape(batch, -1)
        squeezed = self.fc(pooled)
        shape = (batch, channels, self.grid, self.grid)
        logits = torch.stack(
            (self.att_conv1(squeezed).view(shape), self.att_conv2(squeezed).view(shape)), dim=0
        )
        weights = torch.softmax(logits, dim=0)
        weights = F.interpolate(
            weights.flatten(0, 1), size=(height, width), mode="nearest"
        ).unflatten(0, (2, batch))
        return weights[0], weights[1]


class SelectiveNormConv(nn.Module):
    """Selective convolution over a BatchNorm branch and an InstanceNorm branch.

    ``conv1`` sees ``LeakyReLU(BN(x))``, ``conv2`` sees ``LeakyReLU(IN(x))``; a
    :class:`SpatialSelector` computed from their sum weighs the two outputs.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        padding: int = 1,
        bias: bool = False,
        reduction: int = 16,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, bias=bias)
        self.conv2 = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, bias=bias)
        self.selector = SpatialSelector(out_channels, reduction=reduction)
        # Instance norm without affine parameters or running stats: contributes no keys.
        self.IN = nn.InstanceNorm2d(in_channels)
        self.BN = nn.BatchNorm2d(in_channels)
        self.negative_slope = 0.01

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch_branch = self.conv1(F.leaky_relu(self.BN(x), self.negative_slope))
        instance_branch = self.conv2(F.leaky_relu(self.IN(x), self.negative_slope))
        w_batch, w_instance = self.selector(batch_branch + instance_branch)
        return batch_branch * w_batch + instance_branch * w_instance


class _SelectiveConvHolder(nn.Module):
    """Container that only reproduces the checkpoint key path ``SEMBlock.maxpool_conv.0``."""

    def __init__(self, conv: SelectiveNormConv) -> None:
        super().__init__()
        self.maxpool_conv = nn.Sequential(conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool_conv(x)


class SqueezeExcitation(nn.Module):
    """Squeeze-and-excitation channel attention (global average pool -> MLP -> sigmoid gate)."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = channels // reduction
        self.excitation = nn.Sequential(
            nn.Linear(channels, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, channels),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.excitation(x.mean(dim=(-2, -1)))
        return x * gate[:, :, None, None]


class DualNormBlock(nn.Module):
    """DNC: selective BN/IN convolution, concatenated with its input, then channel attention.

    Input ``(B, C, H, W)`` -> output ``(B, 2C, H, W)``.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.channel_attention = SqueezeExcitation(2 * channels)
        self.SEMBlock = _SelectiveConvHolder(SelectiveNormConv(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normalised = self.SEMBlock(x)
        return self.channel_attention(torch.cat((x, normalised), dim=1))


class FourierModulation(nn.Module):
    """FGM: Fourier degradation suppression on ``channels`` feature maps.

    ``mode="released"`` returns the input unchanged (behaviour of the released
    RobustSAM code and weights).  ``mode="paper"`` filters the FFT amplitude with the
    1 x 1 ``conv_layer``, keeps the phase and returns the real part of the inverse
    FFT.  See the module docstring.  The mode can be switched at run time through the
    ``mode`` attribute; it is not part of the state dict.
    """

    def __init__(self, channels: int, mode: str = "released") -> None:
        super().__init__()
        self.channels = channels
        self.mode = check_fgm_mode(mode)
        self.conv_layer = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "released":
            return x
        # FFTs run in float32 (half-precision FFTs are restricted to power-of-two sizes on GPU
        # and unsupported on CPU).
        dtype = x.dtype
        spectrum = torch.fft.fft2(x.float(), dim=(-2, -1))
        weight = self.conv_layer.weight.float()
        bias = None if self.conv_layer.bias is None else self.conv_layer.bias.float()
        amplitude = F.conv2d(spectrum.abs(), weight, bias)
        phase = spectrum.angle()
        # The filtered amplitude may become negative; it is used as a signed magnitude.
        filtered = torch.complex(amplitude * torch.cos(phase), amplitude * torch.sin(phase))
        return torch.fft.ifft2(filtered, dim=(-2, -1)).real.to(dtype)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, mode={self.mode!r}"


class _AMFGBase(nn.Module):
    """Shared trunk: DNC -> FGM -> 3x3 conv; subclasses add the resampling head."""

    head_name: str = ""

    def __init__(self, channels: int, fgm_mode: str = "released") -> None:
        super().__init__()
        self.channels = channels
        self.dnc_block_combined = DualNormBlock(channels)
        self.fgm_block = FourierModulation(2 * channels, mode=fgm_mode)
        self.conv_layer = nn.Conv2d(2 * channels, channels, kernel_size=3, padding=1)

    @property
    def head(self) -> nn.Sequential:
        return getattr(self, self.head_name)

    def refine(self, x: torch.Tensor) -> torch.Tensor:
        """Run the DNC -> FGM -> conv trunk (same channel count in and out)."""
        return self.conv_layer(self.fgm_block(self.dnc_block_combined(x)))

    def forward(self, x: torch.Tensor, refine: bool = True) -> torch.Tensor:
        if refine:
            x = self.refine(x)
        return self.head(x)

    def zero_init_output(self) -> None:
        """Zero the last layer of the head so that the block outputs exactly 0."""
        last = self.head[-1]
        nn.init.zeros_(last.weight)
        if last.bias is not None:
            nn.init.zeros_(last.bias)


def _upsample_x4(in_channels: int, hidden: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.ConvTranspose2d(in_channels, hidden, kernel_size=2, stride=2),
        LayerNorm2d(hidden),
        nn.GELU(),
        nn.ConvTranspose2d(hidden, out_channels, kernel_size=2, stride=2),
    )


class EarlyFeatureAMFG(_AMFGBase):
    """AMFG for the early encoder features: ``(B, vit_dim, 64, 64)`` -> ``(B, dim/8, 256, 256)``.

    For ViT-B (``vit_dim=768``) this block holds ~53 M parameters, most of the robust
    decoder; it depends only on the image, so callers should run it once per image.
    """

    head_name = "upsample_layer"

    def __init__(self, vit_dim: int, transformer_dim: int = 256, fgm_mode: str = "released") -> None:
        super().__init__(vit_dim, fgm_mode)
        self.upsample_layer = _upsample_x4(vit_dim, transformer_dim, transformer_dim // 8)


class EmbeddingAMFG(_AMFGBase):
    """AMFG for the final image embedding: ``(B, dim, 64, 64)`` -> ``(B, dim/8, 256, 256)``."""

    head_name = "upsample_layer"

    def __init__(self, transformer_dim: int = 256, fgm_mode: str = "released") -> None:
        super().__init__(transformer_dim, fgm_mode)
        self.upsample_layer = _upsample_x4(transformer_dim, transformer_dim, transformer_dim // 8)


class MaskFeatureAMFG(_AMFGBase):
    """AMFG for the upscaled mask features: ``(N, dim/8, 256, 256)`` -> same shape."""

    head_name = "downsample_layer"

    def __init__(self, transformer_dim: int = 256, fgm_mode: str = "released") -> None:
        channels = transformer_dim // 8
        super().__init__(channels, fgm_mode)
        self.downsample_layer = nn.Sequential(
            nn.Conv2d(channels, 2 * channels, 3, 1, 1),
            LayerNorm2d(2 * channels),
            nn.GELU(),
            nn.Conv2d(2 * channels, channels, 3, 1, 1),
        )
