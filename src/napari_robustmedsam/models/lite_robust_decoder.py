"""A lite robust decoder for LiteMedSAM's TinyViT encoder.

No released RobustSAM weights fit LiteMedSAM (its early features are 160 channels from
TinyViT stage 2, see :mod:`.early_features`, not 768 ViT channels), so the lite robust
decoder is a new model that has to be trained.  It is :class:`RobustMaskDecoder` with

* ``vit_dim=160`` (first-layer AMFG sized for TinyViT's stage-2 output; about 2.5 M
  parameters instead of ViT-B's 53 M), and
* ``residual=True`` fusions (``R = U + AMFG_mask(U) + F_img``, ``AOTG(t) = t + MLP``),

initialised so that its untrained robust parts change nothing:

* all SAM parts are LiteMedSAM's decoder weights;
* ``custom_robust_token`` is a copy of ``mask_tokens`` and ``robust_mlp`` a copy of
  ``output_hypernetworks_mlps[0]``;
* the last layer of every AMFG head and of the AOTG MLP is zero.

At initialisation the robust single-mask output therefore equals LiteMedSAM's own
single-mask output exactly (and the IoU predictions too).  The zeroed layers receive
non-zero gradients from the start (their inputs are non-zero), so the robust parts
train from that point like zero-initialised residual branches.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from .early_features import TINY_VIT_EARLY_CHANNELS
from .robust_decoder import ROBUST_KEY_PREFIXES, RobustMaskDecoder

__all__ = [
    "LITE_EARLY_FEATURE_DIM",
    "build_lite_robust_decoder",
    "init_robust_parts_as_identity",
    "sam_decoder_state_from_checkpoint",
]

#: Channels of TinyViT stage 2 (``layers[1]``) in LiteMedSAM.
LITE_EARLY_FEATURE_DIM = TINY_VIT_EARLY_CHANNELS
#: the seed of the robust parts' initial values (their outputs start at zero whatever the seed)
ROBUST_INIT_SEED = 0


def sam_decoder_state_from_checkpoint(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Extract decoder tensors from a full checkpoint (``mask_decoder.`` keys, optional
    ``module.``) or return a decoder-only state dict unchanged."""
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}
    if any(k.startswith("mask_decoder.") for k in state):
        return {k[len("mask_decoder."):]: v for k, v in state.items() if k.startswith("mask_decoder.")}
    return dict(state)


@torch.no_grad()
def init_robust_parts_as_identity(decoder: RobustMaskDecoder) -> None:
    """Initialise the robust parts of a residual decoder so its robust output equals SAM's.

    Requires ``decoder.residual``; copies the mask tokens / first hypernetwork MLP and
    zeroes the last layer of every AMFG head and of the AOTG MLP.
    """
    if not decoder.residual:
        raise ValueError("identity initialisation needs a decoder built with residual=True")
    decoder.custom_robust_token.weight.copy_(decoder.mask_tokens.weight)
    decoder.robust_mlp.load_state_dict(decoder.output_hypernetworks_mlps[0].state_dict())
    for block in (
        decoder.fourier_first_layer_features,
        decoder.fourier_last_layer_features,
        decoder.fourier_mask_features,
    ):
        block.zero_init_output()
    last = decoder.custom_token_block.mlp[-1]
    last.weight.zero_()
    last.bias.zero_()


def build_lite_robust_decoder(
    sam_decoder_state_dict: Mapping[str, Tensor],
    *,
    vit_dim: int = LITE_EARLY_FEATURE_DIM,
    fgm_mode: str = "released",
) -> RobustMaskDecoder:
    """Build the lite robust decoder, SAM parts taken from LiteMedSAM's decoder.

    Args:
        sam_decoder_state_dict: decoder weights, either decoder-only keys or a full
            LiteMedSAM checkpoint (``mask_decoder.*`` keys are extracted), read by the
            checkpoint package (models never read files).  If it also holds the
            robust keys (a trained lite robust decoder), they are loaded as they are;
            otherwise the robust parts are identity-initialised.
        vit_dim: early-feature channels (160 for LiteMedSAM's TinyViT stage 2).
        fgm_mode: ``"released"`` (identity FGM) or ``"paper"``.
    """
    state = sam_decoder_state_from_checkpoint(sam_decoder_state_dict)

    # A fixed seed for the robust parts' initial values: their outputs start at zero either way, but the same
    # start on every build lets a fine-tuned head store only the tensors training changed (checkpoints.head_delta).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ROBUST_INIT_SEED)
        decoder = RobustMaskDecoder(transformer_dim=256, vit_dim=vit_dim, fgm_mode=fgm_mode, residual=True)
    state = {k: v for k, v in state.items() if k != "residual_fusion"}
    result = decoder.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"unexpected decoder keys: {result.unexpected_keys[:5]} ...")
    missing = [k for k in result.missing_keys if k != "residual_fusion"]
    missing_sam = [k for k in missing if k.split(".")[0] not in ROBUST_KEY_PREFIXES]
    if missing_sam:
        raise ValueError(f"decoder state dict lacks SAM decoder keys: {missing_sam[:5]} ...")
    has_robust = any(k.split(".")[0] in ROBUST_KEY_PREFIXES for k in state)
    missing_robust = [k for k in missing if k.split(".")[0] in ROBUST_KEY_PREFIXES]
    if has_robust and missing_robust:
        raise ValueError(f"decoder state dict holds only part of the robust keys; missing {missing_robust[:5]} ...")
    if not has_robust:
        init_robust_parts_as_identity(decoder)
    return decoder
