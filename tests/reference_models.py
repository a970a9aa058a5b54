"""The reference RobustSAM ViT-B mask decoder (package ``robust_segment_anything``), built once here for the tests
that compare against its exact key names, shapes and outputs."""

from __future__ import annotations

import torch


def reference_robust_decoder(opt=None, meta: bool = False):
    """RobustSAM's ViT-B mask decoder with its constructor's random weights (seed them before calling);
    ``meta``: shapes only, no memory. ``opt``: the reference's options object (PyPI 1.0.0 reads it in forward)."""
    from robust_segment_anything.modeling import MaskDecoder, TwoWayTransformer

    with torch.device("meta") if meta else torch.device("cpu"):
        return MaskDecoder(
            opt={} if opt is None else opt,
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            transformer_dim=256,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
            vit_dim=768,
        )


def reference_robust_decoder_state(seed: int = 1, distinct_bn_statistics: bool = False) -> dict:
    """The reference decoder's tensors with keys prefixed ``mask_decoder.``. ``distinct_bn_statistics``: random
    BatchNorm running statistics (so that a test can tell them apart from the defaults)."""
    torch.manual_seed(seed)
    state = {}
    for key, value in reference_robust_decoder().state_dict().items():
        if distinct_bn_statistics and key.endswith(("running_mean", "running_var")):
            value = torch.rand_like(value) + 0.5
        state["mask_decoder." + key] = value
    return state
