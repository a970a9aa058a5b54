"""The robust decoder's per-click mask path at inference, in channels-last memory (same values up to rounding).

Per click, RobustSAM's mask-level AMFG (:class:`~.amfg.MaskFeatureAMFG`) runs four 3 x 3 convolutions and a
LayerNorm at 256 x 256 on the upscaled mask features, which is most of a robust click on a CPU. This module
computes ``weights . (AMFG(U) + F_img [+ U])`` (the robust single mask) with the same operations arranged
for oneDNN on a CPU:

* the features stay channels-last (NHWC) from the output upscaling on (built in token order, so no transposed
  convolution and no layout conversion); oneDNN's 3 x 3 convolutions at 32-64 channels are faster on NHWC than
  on NCHW;
* the selective BN/IN convolution's blend ``b * w + i * (1 - w)`` is ``i + (b - i) * w`` with ``w`` broadcast
  from its 4 x 4 grid (no upsampled weight maps);
* the channel-attention gate scales the input channels of the next convolution, so it is folded into that
  convolution's weights (one prompt; per prompt it is applied as in the module), and the concatenation
  ``[U, DNC(U)]`` is never formed: the convolution is split over its two input halves;
* LayerNorm2d is ``layer_norm`` over the contiguous channel axis of the NHWC tensor, and the instance norm is
  computed in place on NHWC (``F.instance_norm`` converts the layout);
* the last convolution and the combination with the robust token's weights are one convolution with one
  output channel per prompt (as in ``RobustMaskDecoder._robust_mask_folded``).

Only for RobustSAM's own mask AMFG with the released (identity) FGM and BatchNorm in eval mode:
:func:`fast_robust_mask_applies` says when; otherwise the module's forward runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling.common import LayerNorm2d
from torch import nn

from .amfg import MaskFeatureAMFG

__all__ = ["fast_robust_mask", "fast_robust_mask_applies"]


def fast_robust_mask_applies(amfg: nn.Module) -> bool:
    """True for RobustSAM's mask AMFG at inference on the CPU or CUDA: released FGM, BatchNorm using running
    statistics. (Apple MPS keeps the module path: its channels-last convolutions have had correctness bugs.)"""
    if type(amfg) is not MaskFeatureAMFG or amfg.fgm_block.mode != "released" or torch.is_grad_enabled():
        return False
    if amfg.conv_layer.weight.device.type not in ("cpu", "cuda"):
        return False
    sel = amfg.dnc_block_combined.SEMBlock.maxpool_conv[0]
    head = amfg.head
    return (
        not sel.BN.training
        and sel.BN.track_running_stats
        and not sel.IN.affine
        and len(head) == 4
        and type(head[1]) is LayerNorm2d
        and type(head[2]) is nn.GELU
    )


def _blend_weights(selector: nn.Module, summed: torch.Tensor) -> torch.Tensor:
    """The BatchNorm branch's selection weights on the selector's grid, (N, C, g, g) (see SpatialSelector)."""
    batch, channels = summed.shape[:2]
    pooled = F.adaptive_avg_pool2d(summed, selector.grid).reshape(batch, -1)
    squeezed = selector.fc(pooled)
    shape = (batch, channels, selector.grid, selector.grid)
    logits = torch.stack((selector.att_conv1(squeezed).view(shape), selector.att_conv2(squeezed).view(shape)))
    return torch.softmax(logits, dim=0)[0]


def _times_grid(x: torch.Tensor, grid_weights: torch.Tensor) -> torch.Tensor:
    """``x * nearest_upsample(grid_weights)`` without the upsampled map (H and W divisible by the grid)."""
    n, c, h, w = x.shape
    g = grid_weights.shape[-1]
    if h % g or w % g:
        return x * F.interpolate(grid_weights, size=(h, w), mode="nearest")
    tiles = x.unflatten(2, (g, h // g)).unflatten(4, (g, w // g))
    return (tiles * grid_weights[:, :, :, None, :, None]).flatten(4, 5).flatten(2, 3)


def _instance_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """InstanceNorm2d without affine parameters; on channels-last input faster than ``F.instance_norm``, which
    converts the layout.
    Other dtypes than float32 (half precision on CUDA) keep ``F.instance_norm``, whose statistics are accumulated in
    float32."""
    if x.dtype != torch.float32:
        return F.instance_norm(x, eps=eps)
    centred = x - x.mean(dim=(2, 3), keepdim=True)
    var = (centred * centred).mean(dim=(2, 3), keepdim=True)
    return centred.mul_((var + eps).rsqrt())


def _channel_norm(x: torch.Tensor, norm: LayerNorm2d) -> torch.Tensor:
    """LayerNorm2d over the channels of a channels-last tensor, as one fused layer_norm."""
    nhwc = x.permute(0, 2, 3, 1)
    return F.layer_norm(nhwc, nhwc.shape[-1:], norm.weight, norm.bias, norm.eps).permute(0, 3, 1, 2)


def _mask_amfg_hidden(amfg: MaskFeatureAMFG, u: torch.Tensor) -> torch.Tensor:
    """The mask AMFG up to its last convolution's input (N, 2C, H, W), channels-last."""
    sel = amfg.dnc_block_combined.SEMBlock.maxpool_conv[0]
    slope = sel.negative_slope
    b = sel.conv1(F.leaky_relu(sel.BN(u), slope))
    i = sel.conv2(F.leaky_relu_(_instance_norm(u, sel.IN.eps), slope))
    normalised = i + _times_grid(b - i, _blend_weights(sel.selector, b + i))
    # channel attention over [u, normalised] (SqueezeExcitation), folded into conv_layer's input channels
    c = u.shape[1]
    gate = amfg.dnc_block_combined.channel_attention.excitation(
        torch.cat((u.mean(dim=(-2, -1)), normalised.mean(dim=(-2, -1))), dim=1)
    )
    conv = amfg.conv_layer
    if u.shape[0] == 1:
        weight = conv.weight * gate[0][None, :, None, None]
        r = F.conv2d(u, weight[:, :c], conv.bias, padding=conv.padding)
        r = r + F.conv2d(normalised, weight[:, c:], None, padding=conv.padding)
    else:
        r = conv(torch.cat((u, normalised), dim=1) * gate[:, :, None, None])
    head = amfg.head
    z = _channel_norm(head[0](r), head[1])
    return head[2](z)


def fast_robust_mask(
    amfg: MaskFeatureAMFG, upscaled: torch.Tensor, img: torch.Tensor, weights: torch.Tensor, residual: bool
) -> torch.Tensor:
    """The robust single mask ``weights . (AMFG(U) + F_img [+ U])``, (N, 1, H, W).

    ``upscaled`` U (N, C, H, W), best channels-last (``upscale_channels_last``); ``img`` the cached image-level
    features (1 or N, C, H, W); ``weights`` (N, C) the robust token's hypernetwork output; ``residual`` adds U
    (the lite decoders' fusion).
    """
    n, c, h, w = upscaled.shape
    u = upscaled.contiguous(memory_format=torch.channels_last)
    z = _mask_amfg_hidden(amfg, u)
    last = amfg.head[-1]
    kernel = torch.einsum("nc,cikl->nikl", weights, last.weight)  # one output channel per prompt
    bias = weights @ last.bias if last.bias is not None else None
    if n == 1:
        mask = F.conv2d(z, kernel, bias, padding=last.padding)
    else:
        mask = F.conv2d(z.reshape(1, n * z.shape[1], h, w), kernel, bias, padding=last.padding, groups=n)
    mask = mask.reshape(n, h, w)
    mask = mask + (weights[:, None, :] @ img.reshape(img.shape[0], c, h * w)).reshape(-1, h, w)
    if residual:  # U is NHWC in memory: contract its channels as the last axis
        mask = mask + (u.permute(0, 2, 3, 1).reshape(n, h * w, c) @ weights[:, :, None]).reshape(n, h, w)
    return mask.unsqueeze(1)
