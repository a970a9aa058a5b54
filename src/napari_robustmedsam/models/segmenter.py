"""The one model container every engine, widget and training loop talks to.

A :class:`PromptableSegmenter` holds SAM's three parts under SAM's attribute names
(``image_encoder``, ``prompt_encoder``, ``mask_decoder``), so its state dict uses SAM's key names and
loads SAM, MedSAM, LiteMedSAM and RobustSAM weights directly. It adds the two things SAM's own ``Sam``
class does not know: a robust decoder that also needs early encoder features, and the split of the
decoder's work into an image-level part (cached once per image) and a prompt-level part (per click).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ArchitectureInfo:
    """What the rest of the code needs to know about an architecture without inspecting modules."""

    name: str  # "vit_b", "vit_l", "vit_h" or "tiny_vit"
    image_size: int  # encoder input side in pixels (1024 for ViT, 256 for TinyViT)
    embedding_size: int  # side of the image embedding grid (64 for all supported encoders)
    embed_dim: int  # channels of the image embedding (256)
    decoder: str  # "sam" or "robust"


class PromptableSegmenter(nn.Module):
    """SAM-style segmenter: ``encode`` once per image, ``decode`` once per prompt set."""

    def __init__(
        self,
        image_encoder: nn.Module,
        prompt_encoder: nn.Module,
        mask_decoder: nn.Module,
        architecture: ArchitectureInfo,
    ) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.architecture = architecture

    @property
    def is_robust(self) -> bool:
        return hasattr(self.mask_decoder, "image_level_features")

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run the image encoder on preprocessed images (B, 3, S, S).

        Returns ``{"image_embeddings": (B, 256, 64, 64)}`` plus, for a robust decoder, the
        image-level robust features it precomputes (see :meth:`image_features`). Everything returned
        depends on the image only, so the embedding engine can cache all of it.
        """
        if not self.is_robust:
            return {"image_embeddings": self.image_encoder(images)}
        from .early_features import EarlyFeatureCapture

        with EarlyFeatureCapture(self.image_encoder) as capture:
            embeddings = self.image_encoder(images)
        features = {"image_embeddings": embeddings}
        features.update(self.image_features(embeddings, capture.features))
        return features

    @torch.no_grad()
    def image_features(self, image_embeddings: torch.Tensor, early_features: torch.Tensor | None) -> dict:
        """Image-level part of a robust decoder (empty for a plain SAM decoder)."""
        if not self.is_robust:
            return {}
        return self.mask_decoder.image_level_features(image_embeddings, early_features)

    def embed_prompts(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts already in the model's input frame -> (sparse, dense) prompt embeddings."""
        return self.prompt_encoder(points=points, boxes=boxes, masks=masks)

    def dense_pe(self) -> torch.Tensor:
        """``prompt_encoder.get_dense_pe()`` (1, 256, 64, 64), computed once and reused on every click.

        The encoding depends only on the prompt encoder's fixed random Gaussian matrix (a buffer, never
        trained); the cache is keyed on that buffer's identity, version counter, device and dtype, so a
        reloaded or moved model recomputes it. Computed outside autograd and inference mode, so the cached
        tensor is usable in training code as well.
        """
        pe_layer = self.prompt_encoder.pe_layer
        gauss = pe_layer.positional_encoding_gaussian_matrix
        key = (
            id(gauss),
            gauss.data_ptr(),
            getattr(gauss, "_version", 0),
            gauss.device,
            gauss.dtype,
            tuple(self.prompt_encoder.image_embedding_size),
        )
        cached = self.__dict__.get("_dense_pe_cache")
        if cached is not None and cached[0] == key:
            return cached[1]
        with torch.inference_mode(False), torch.no_grad():
            pe = self.prompt_encoder.get_dense_pe().contiguous()
        self.__dict__["_dense_pe_cache"] = (key, pe)
        return pe

    def decode(
        self,
        features: dict[str, torch.Tensor],
        sparse: torch.Tensor,
        dense: torch.Tensor,
        multimask_output: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt-level decoding: returns low-resolution logits (N, C, 256, 256) and IoU predictions."""
        kwargs = dict(
            image_embeddings=features["image_embeddings"],
            image_pe=self.dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
        )
        if self.is_robust:
            image_level = {k: v for k, v in features.items() if k != "image_embeddings"}
            kwargs["image_features"] = image_level
        elif not torch.is_grad_enabled() and _fast_plain_decoder_applies(self.mask_decoder, dense):
            return _fast_plain_decode(self, features["image_embeddings"], kwargs["image_pe"], sparse, multimask_output)
        return self.mask_decoder(**kwargs)


# ------------------------------------------------------------------------------------------------------
# Click-time fast path of SAM's plain mask decoder (inference only).
#
# With no mask prompt, the first two-way attention block's image-side inputs depend on the image alone:
# keys = embedding + no-mask embedding, and the token->image keys/values and image->token queries projected
# from them. They are computed once per image (last image kept) and reused on every click; the remaining
# computation is SAM's, step by step, on the same modules (so loaded weights are used as they are), and only
# the mask token(s) that are returned are decoded. Results equal SAM's MaskDecoder up to float rounding
# (the prompt batch is broadcast instead of materialised); see tests/test_embeddings.py.
# ------------------------------------------------------------------------------------------------------
def _fast_plain_decoder_applies(decoder: nn.Module, dense: torch.Tensor) -> bool:
    from segment_anything.modeling.mask_decoder import MaskDecoder
    from segment_anything.modeling.transformer import Attention, TwoWayAttentionBlock, TwoWayTransformer

    if type(decoder) is not MaskDecoder or type(decoder.transformer) is not TwoWayTransformer:
        return False
    layers = decoder.transformer.layers
    if len(layers) == 0 or not all(type(layer) is TwoWayAttentionBlock for layer in layers):
        return False
    first = layers[0]
    if type(first.cross_attn_token_to_image) is not Attention or type(first.cross_attn_image_to_token) is not Attention:
        return False
    # dense must be the no-mask embedding broadcast over the grid (PromptEncoder without a mask prompt)
    return dense.dim() == 4 and dense.stride(-1) == 0 and dense.stride(-2) == 0


def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.reshape(b, n, num_heads, c // num_heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, n, c = x.shape
    return x.transpose(1, 2).reshape(b, n, h * c)


def _attend(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """segment_anything's Attention.forward on already projected, head-separated q, k, v."""
    scores = q @ k.permute(0, 1, 3, 2)
    scores = scores / math.sqrt(q.shape[-1])
    out = torch.softmax(scores, dim=-1) @ v
    return attn.out_proj(_merge_heads(out))


def _image_side(model: "PromptableSegmenter", image_embeddings: torch.Tensor, image_pe: torch.Tensor, dense_row: torch.Tensor) -> dict:
    decoder = model.mask_decoder
    first = decoder.transformer.layers[0]
    t2i, i2t = first.cross_attn_token_to_image, first.cross_attn_image_to_token
    weights = tuple(
        (id(t), t._version, t.data_ptr())
        for m in (t2i.k_proj, t2i.v_proj, i2t.q_proj)
        for t in (m.weight, m.bias)
    )
    key = (
        id(image_embeddings),
        image_embeddings.data_ptr(),
        image_embeddings._version,
        tuple(image_embeddings.shape),
        image_embeddings.dtype,
        id(image_pe),
        dense_row.data_ptr(),
        dense_row._version,
        weights,
    )
    cache = model.__dict__.get("_image_side_cache")
    if cache is not None and cache["key"] == key:
        return cache
    src = image_embeddings + dense_row  # (B, C, H, W) + (1, C, 1, 1), as SAM's src + dense
    b, c, h, w = src.shape
    keys = src.flatten(2).permute(0, 2, 1)
    key_pe = image_pe.flatten(2).permute(0, 2, 1)
    k = keys + key_pe
    cache = {
        "key": key,
        "shape": (b, c, h, w),
        "keys": keys,
        "key_pe": key_pe,
        "t2i_k": _heads(t2i.k_proj(k), t2i.num_heads),
        "t2i_v": _heads(t2i.v_proj(keys), t2i.num_heads),
        "i2t_q": _heads(i2t.q_proj(k), i2t.num_heads),
        # keep the embedding alive so that its id/data_ptr cannot be reused by another tensor
        "_embedding": image_embeddings,
    }
    model.__dict__["_image_side_cache"] = cache
    return cache


def _fast_plain_decode(
    model: "PromptableSegmenter",
    image_embeddings: torch.Tensor,
    image_pe: torch.Tensor,
    sparse: torch.Tensor,
    multimask_output: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    decoder = model.mask_decoder
    transformer = decoder.transformer
    dense_row = model.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
    n = sparse.shape[0]
    if image_embeddings.shape[0] not in (1, n):
        raise ValueError(f"image_embeddings batch {image_embeddings.shape[0]} does not match {n} prompts")
    side = _image_side(model, image_embeddings, image_pe, dense_row)
    b, c, h, w = side["shape"]

    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    tokens = torch.cat((output_tokens.unsqueeze(0).expand(n, -1, -1), sparse), dim=1)
    query_pe = tokens
    keys, key_pe = side["keys"], side["key_pe"]

    # first block, image side from the cache
    first = transformer.layers[0]
    if first.skip_first_layer_pe:
        queries = first.self_attn(q=tokens, k=tokens, v=tokens)
    else:
        q = tokens + query_pe
        queries = tokens + first.self_attn(q=q, k=q, v=tokens)
    queries = first.norm1(queries)
    t2i = first.cross_attn_token_to_image
    q = _heads(t2i.q_proj(queries + query_pe), t2i.num_heads)
    queries = first.norm2(queries + _attend(t2i, q, side["t2i_k"], side["t2i_v"]))
    queries = first.norm3(queries + first.mlp(queries))
    i2t = first.cross_attn_image_to_token
    token_side = queries + query_pe
    k = _heads(i2t.k_proj(token_side), i2t.num_heads)
    v = _heads(i2t.v_proj(queries), i2t.num_heads)
    keys = first.norm4(keys + _attend(i2t, side["i2t_q"], k, v))  # broadcasts to (n, HW, C)

    for layer in transformer.layers[1:]:
        queries, keys = layer(queries=queries, keys=keys, query_pe=query_pe, key_pe=key_pe)
    q = queries + query_pe
    k = keys + key_pe
    queries = transformer.norm_final_attn(queries + transformer.final_attn_token_to_image(q=q, k=k, v=keys))
    if keys.shape[0] != n:
        keys = keys.expand(n, -1, -1)

    iou_token_out = queries[:, 0, :]
    mask_tokens_out = queries[:, 1 : 1 + decoder.num_mask_tokens, :]
    src = keys.transpose(1, 2).reshape(n, c, h, w)
    upscaled = decoder.output_upscaling(src)
    indices = list(range(1, decoder.num_mask_tokens)) if multimask_output else [0]
    hyper_in = torch.stack([decoder.output_hypernetworks_mlps[i](mask_tokens_out[:, i, :]) for i in indices], dim=1)
    _, uc, uh, uw = upscaled.shape
    masks = (hyper_in @ upscaled.reshape(n, uc, uh * uw)).reshape(n, -1, uh, uw)
    iou_pred = decoder.iou_prediction_head(iou_token_out)
    iou_pred = iou_pred[:, 1:] if multimask_output else iou_pred[:, 0:1]
    return masks, iou_pred
