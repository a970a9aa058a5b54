"""Click-time fast path of SAM's plain mask decoder (inference only); results equal SAM's up to float rounding.

Why: a click must feel instant, and most of SAM's decoder work per click is either image-only (so it can be
cached per image) or spent in memory traffic that a different but equivalent order of operations avoids.

1. With no mask prompt, the first two-way attention block's image-side inputs depend on the image alone:
   keys = embedding + no-mask embedding, and the token->image keys/values and image->token queries projected
   from them. They are computed once per image (last image kept) and reused on every click. With a mask
   prompt (corrective clicks with the previous logits) they are computed per call; the rest still applies.
2. The output upscaling (two 2x2 stride-2 transposed convolutions with a channel LayerNorm and GELUs) is run
   as per-pixel matrix products in token order, and only the returned mask tokens' hypernetwork weights are
   applied before the single final reshuffle into image order. A 2x2 stride-2 transposed convolution writes
   each input pixel's 4 output pixels independently, so it *is* a (C_in -> 4 C_out) linear map per pixel; this
   skips the (N, 32, 256, 256) intermediate in image layout and its copies.

3. Attention between the 4096 image positions and the handful of prompt tokens (T = 5 output tokens + the
   prompt's points/box corners) runs with the image-side projections folded into the token side: for a head h,
   ``q_h . (W_k,h x + b_k,h) = (W_k,h^T q_h) . x + const``, so the scores are the image tokens times T x heads
   "absorbed" query vectors of width 256 instead of projecting all 4096 image tokens to keys and values
   (and likewise for the values, the image->token queries and the output projection). With heads x T below the
   projection width (8 x T < 128, i.e. up to 15 tokens) this does less than half the image-sized arithmetic;
   otherwise the projections are computed as SAM does. Inference only (no autograd); the bias terms that
   cancel in a softmax are dropped, the others kept.

Everything else is SAM's computation, step by step, on the same modules (so loaded weights are used as they
are). The prompt batch is broadcast instead of materialised. See tests/test_embeddings.py.
"""

from __future__ import annotations

import math
import torch
import torch.nn.functional as F
from torch import nn

def fast_transformer_applies(decoder: nn.Module, dense: torch.Tensor) -> bool:
    """SAM's TwoWayTransformer of plain Attention blocks, and a (B, C, h, w) dense prompt embedding."""
    from segment_anything.modeling.transformer import Attention, TwoWayAttentionBlock, TwoWayTransformer

    if type(getattr(decoder, "transformer", None)) is not TwoWayTransformer:
        return False
    layers = decoder.transformer.layers
    if len(layers) == 0 or not all(type(layer) is TwoWayAttentionBlock for layer in layers):
        return False
    if any(
        type(layer.cross_attn_token_to_image) is not Attention or type(layer.cross_attn_image_to_token) is not Attention
        for layer in layers
    ):
        return False
    if any(layer.skip_first_layer_pe for layer in layers[1:]):
        return False
    return dense.dim() == 4


def _dense_is_constant(dense: torch.Tensor) -> bool:
    """The no-mask embedding broadcast over the grid (PromptEncoder without a mask prompt)."""
    return dense.stride(-1) == 0 and dense.stride(-2) == 0


def fast_plain_decoder_applies(decoder: nn.Module, dense: torch.Tensor) -> bool:
    from segment_anything.modeling.mask_decoder import MaskDecoder

    return type(decoder) is MaskDecoder and fast_transformer_applies(decoder, dense)


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


def _attend_image_to_tokens(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``_attend`` for many image queries over a handful of tokens (the softmax axis has 5-10 entries).

    The scores are formed transposed, (B, heads, tokens, HW), so that the softmax reduces over a short
    strided axis instead of a contiguous axis of length 7 (about 9x faster on the CPU; same values).
    """
    scores_t = k @ q.transpose(-1, -2)
    scores_t = scores_t / math.sqrt(q.shape[-1])
    out = torch.softmax(scores_t, dim=-2).transpose(-1, -2) @ v
    return attn.out_proj(_merge_heads(out))


def _absorb_applies(attn: nn.Module, n_tokens: int) -> bool:
    """Absorbed attention is cheaper when heads x tokens < the projection width, and used without autograd."""
    return attn.num_heads * n_tokens < attn.internal_dim and not torch.is_grad_enabled()


def _per_head(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """A (internal, D) projection weight as (heads, head_dim, D)."""
    return weight.reshape(num_heads, weight.shape[0] // num_heads, weight.shape[1])


def _tokens_attend_image_absorbed(attn: nn.Module, q: torch.Tensor, k_image: torch.Tensor, v_image: torch.Tensor) -> torch.Tensor:
    """``attn(q=q, k=k_image, v=v_image)`` for T tokens over HW image positions, without projecting the image.

    q: (n, T, D) token side; k_image, v_image: (B, HW, D), B in {1, n}. Scores ``(W_k,h^T q_h) . x`` (the key
    bias adds a per-row constant, which the softmax over positions cancels); values ``(S_h x) W_v,h^T + b_v,h``
    (softmax rows sum to one).
    """
    n, t, _ = q.shape
    heads = attn.num_heads
    qh = _heads(attn.q_proj(q), heads)  # (n, H, T, c)
    absorbed = torch.einsum("nhtc,hcd->nhtd", qh, _per_head(attn.k_proj.weight, heads)).reshape(n, heads * t, -1)
    scores = absorbed @ k_image.transpose(-1, -2)  # (n, H*T, HW)
    weights = torch.softmax(scores / math.sqrt(qh.shape[-1]), dim=-1)
    mixed = (weights @ v_image).reshape(n, heads, t, -1)  # (n, H, T, D)
    out = torch.einsum("nhtd,hcd->nhtc", mixed, _per_head(attn.v_proj.weight, heads))
    out = out + attn.v_proj.bias.reshape(heads, 1, -1)
    return attn.out_proj(_merge_heads(out))


def _image_attends_tokens_absorbed(
    attn: nn.Module,
    residual: torch.Tensor,
    q_image: torch.Tensor | None,
    k: torch.Tensor,
    v: torch.Tensor,
    q_projected: torch.Tensor | None = None,
) -> torch.Tensor:
    """``residual + attn(q=q_image, k=k, v=v)`` for HW image queries over T tokens, output projection folded in.

    q_image: (B, HW, D) image side, or ``q_projected`` (B, H, HW, c) already projected (the per-image cache);
    k, v: (n, T, D) token side; residual: (B, HW, D), the block's skip connection (added by the product itself).
    Scores per head ``x . (W_q,h^T k_h) + b_q,h . k_h`` (this bias varies over the softmax axis, so it is kept),
    formed transposed (tokens x positions) so that the softmax runs over a short strided axis; output
    ``sum_h,t p_h,t (W_o,h v_h,t + b_o / H)``: each head's weights sum to one, so the output bias rides along.
    """
    heads = attn.num_heads
    kh = _heads(attn.k_proj(k), heads)  # (n, H, T, c)
    vh = _heads(attn.v_proj(v), heads)
    n, _, t, c = kh.shape
    if q_projected is not None:
        scores_t = (kh @ q_projected.transpose(-1, -2)).reshape(n, heads * t, -1)  # (n, H*T, HW)
    else:
        absorbed = torch.einsum("nhtc,hcd->nhtd", kh, _per_head(attn.q_proj.weight, heads)).reshape(n, heads * t, -1)
        bias = torch.einsum("nhtc,hc->nht", kh, attn.q_proj.bias.reshape(heads, c)).reshape(n, heads * t, 1)
        scores_t = torch.baddbmm(bias, absorbed, q_image.transpose(-1, -2)) if q_image.shape[0] == n else (
            absorbed @ q_image.transpose(-1, -2) + bias)
    weights = torch.softmax((scores_t / math.sqrt(c)).reshape(n, heads, t, -1), dim=2).reshape(n, heads * t, -1)
    w_out = attn.out_proj.weight  # (D, H*c)
    folded = torch.einsum("nhtc,dhc->nhtd", vh, w_out.reshape(w_out.shape[0], heads, c)) + attn.out_proj.bias / heads
    return torch.baddbmm(residual, weights.transpose(-1, -2), folded.reshape(n, heads * t, -1))


def _tokens_attend_image(attn: nn.Module, q: torch.Tensor, k_image: torch.Tensor, v_image: torch.Tensor) -> torch.Tensor:
    """``attn(q=q, k=k_image, v=v_image)``: absorbed when that is cheaper, SAM's module otherwise."""
    if _absorb_applies(attn, q.shape[1]):
        return _tokens_attend_image_absorbed(attn, q, k_image, v_image)
    return attn(q=q, k=k_image, v=v_image)


def _image_attends_tokens(
    attn: nn.Module,
    residual: torch.Tensor,
    q_image: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_projected: torch.Tensor | None = None,
) -> torch.Tensor:
    """``residual + attn(q=q_image, k=k, v=v)``: absorbed when that is cheaper, else projected (the image queries
    from ``q_projected`` when the per-image cache has them)."""
    if _absorb_applies(attn, k.shape[1]):
        return _image_attends_tokens_absorbed(attn, residual, q_image, k, v, q_projected=q_projected)
    q = q_projected if q_projected is not None else _heads(attn.q_proj(q_image), attn.num_heads)
    return residual + _attend_image_to_tokens(
        attn, q, _heads(attn.k_proj(k), attn.num_heads), _heads(attn.v_proj(v), attn.num_heads))


def _two_way_block(layer: nn.Module, queries, keys, query_pe, key_pe):
    """SAM's TwoWayAttentionBlock (not the first one) with ``keys + key_pe`` formed once instead of twice."""
    q = queries + query_pe
    queries = layer.norm1(queries + layer.self_attn(q=q, k=q, v=queries))
    q = queries + query_pe
    k = keys + key_pe
    queries = layer.norm2(queries + _tokens_attend_image(layer.cross_attn_token_to_image, q, k, keys))
    queries = layer.norm3(queries + layer.mlp(queries))
    q = queries + query_pe
    keys = layer.norm4(_image_attends_tokens(layer.cross_attn_image_to_token, keys, k, q, queries))
    return queries, keys


def _image_side(decoder: nn.Module, image_embeddings: torch.Tensor, image_pe: torch.Tensor, dense_row: torch.Tensor) -> dict:
    """Image-only inputs of the first block, cached on the decoder (last image kept)."""
    key = _side_key(decoder, image_embeddings, image_pe, dense_row)
    cache = decoder.__dict__.get("_image_side_cache")
    if key is not None and cache is not None and cache["key"] == key:
        return cache
    cache = _compute_image_side(decoder, image_embeddings + dense_row, image_pe)  # SAM's src + dense
    if key is None:  # inference-mode tensors: no version counter, so not cached
        return cache
    cache["key"] = key
    # keep the keyed tensors alive so that their memory cannot be handed to another tensor
    cache["_alive"] = (image_embeddings, image_pe)
    decoder.__dict__["_image_side_cache"] = cache
    return cache


def tensor_key(t: torch.Tensor) -> tuple | None:
    """Identity of a tensor's current values: storage position, layout and in-place version (the cache entry
    keeps the tensor alive, so its memory cannot be handed to another tensor while the key is in use).
    None for an inference-mode tensor, which has no version counter: never cached."""
    if t.is_inference():
        return None
    return (t.data_ptr(), t._version, tuple(t.shape), t.stride(), t.dtype, t.device)


def _side_key(decoder: nn.Module, *tensors: torch.Tensor) -> tuple | None:
    """Key of a cached first-block image side: its input tensors' identities and the projection weights."""
    keys = tuple(tensor_key(t) for t in tensors)
    return None if None in keys else keys + (_first_block_weights_key(decoder),)


def _first_block_weights_key(decoder: nn.Module) -> tuple:
    first = decoder.transformer.layers[0]
    t2i, i2t = first.cross_attn_token_to_image, first.cross_attn_image_to_token
    return tuple((id(t), t._version, t.data_ptr()) for m in (t2i.k_proj, t2i.v_proj, i2t.q_proj) for t in (m.weight, m.bias))


def prepare_mask_side(decoder: nn.Module, image_embeddings: torch.Tensor, image_pe: torch.Tensor, dense: torch.Tensor) -> None:
    """Compute the first block's image side for a mask prompt ahead of the click that will use it.

    A corrective click feeds the previous logits back as a mask prompt, so its image side (embedding + the
    mask's dense embedding, and the first block's projections of it) is known as soon as the previous mask
    is. The annotator calls this between clicks; the next :func:`fast_transformer` call with the same
    embedding and the same ``dense`` tensor then starts from it, as a box click starts from the per-image
    cache. One entry (the latest mask) is kept, beside the per-image one.
    """
    if not fast_transformer_applies(decoder, dense) or dense.shape[0] != 1 or image_embeddings.shape[0] != 1:
        return
    key = _side_key(decoder, image_embeddings, image_pe, dense)
    cached = decoder.__dict__.get("_mask_side_cache")
    if key is None or (cached is not None and cached["key"] == key):
        return
    with torch.no_grad():
        side = _compute_image_side(decoder, image_embeddings + dense, image_pe)
    side["key"] = key
    side["_alive"] = (image_embeddings, dense, image_pe)
    decoder.__dict__["_mask_side_cache"] = side


def _prepared_mask_side(decoder: nn.Module, image_embeddings: torch.Tensor, image_pe: torch.Tensor, dense: torch.Tensor):
    cached = decoder.__dict__.get("_mask_side_cache")
    if cached is None or dense.shape[0] != 1 or image_embeddings.shape[0] != 1:
        return None
    key = _side_key(decoder, image_embeddings, image_pe, dense)
    return cached if key is not None and cached["key"] == key else None


def _token_major_pe(decoder: nn.Module, image_pe: torch.Tensor) -> torch.Tensor:
    """The dense positional encoding in token-major layout, kept on the decoder (it is the same every call)."""
    if torch.is_grad_enabled() and image_pe.requires_grad:
        return image_pe.flatten(2).permute(0, 2, 1).contiguous()
    key = (id(image_pe), image_pe.data_ptr(), image_pe._version, tuple(image_pe.shape), image_pe.dtype, image_pe.device)
    cached = decoder.__dict__.get("_token_major_pe")
    if cached is None or cached[0] != key:
        # the source tensor is kept alive with the entry, so its id/data_ptr cannot be reused by another tensor
        cached = (key, image_pe.flatten(2).permute(0, 2, 1).contiguous(), image_pe)
        decoder.__dict__["_token_major_pe"] = cached
    return cached[1]


def _compute_image_side(decoder: nn.Module, src: torch.Tensor, image_pe: torch.Tensor, project: bool = True) -> dict:
    """Token-major image inputs of the first block; with ``project`` also its image-side projections."""
    first = decoder.transformer.layers[0]
    t2i, i2t = first.cross_attn_token_to_image, first.cross_attn_image_to_token
    b, c, h, w = src.shape
    # token-major and contiguous once per image: every per-click add and projection then streams memory
    keys = src.flatten(2).permute(0, 2, 1).contiguous()
    key_pe = _token_major_pe(decoder, image_pe)
    k = keys + key_pe
    side = {"shape": (b, c, h, w), "keys": keys, "key_pe": key_pe, "k": k}
    if project:
        side["t2i_k"] = _heads(t2i.k_proj(k), t2i.num_heads)
        side["t2i_v"] = _heads(t2i.v_proj(keys), t2i.num_heads)
        side["i2t_q"] = _heads(i2t.q_proj(k), i2t.num_heads)
    return side


def fast_transformer(
    decoder: nn.Module,
    image_embeddings: torch.Tensor,
    image_pe: torch.Tensor,
    dense: torch.Tensor,
    sparse: torch.Tensor,
    output_tokens: torch.Tensor,
    cache: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int, int, int]]:
    """SAM's two-way transformer for N prompt sets: (output tokens (N, T_out, C), image side (N, HW, C), shape).

    ``dense``: the dense prompt embedding. Without a mask prompt it is the no-mask embedding broadcast over
    the grid, and the image side of the first block is cached per image; with a mask prompt (corrective
    clicks feeding back the previous logits) it is computed for this call. ``output_tokens``: the decoder's
    output tokens (SAM: IoU + mask tokens; RobustSAM: IoU + robust tokens). ``cache=False`` (training, where
    the projections carry gradients and change every step) computes the image side for this call only.
    """
    transformer = decoder.transformer
    n = sparse.shape[0]
    if image_embeddings.shape[0] not in (1, n) or dense.shape[0] not in (1, n):
        raise ValueError(f"image_embeddings batch {image_embeddings.shape[0]} / dense batch {dense.shape[0]} "
                         f"does not match {n} prompts")
    tokens = torch.cat((output_tokens.unsqueeze(0).expand(n, -1, -1), sparse), dim=1)
    first = transformer.layers[0]
    t2i, i2t = first.cross_attn_token_to_image, first.cross_attn_image_to_token
    if cache and _dense_is_constant(dense):
        side = _image_side(decoder, image_embeddings, image_pe, dense[:1, :, :1, :1])
    elif cache and (prepared := _prepared_mask_side(decoder, image_embeddings, image_pe, dense)) is not None:
        side = prepared  # a mask prompt prepared between clicks (prepare_mask_side)
    else:  # per call: the absorbed forms need no image-side projections
        side = _compute_image_side(decoder, image_embeddings + dense, image_pe,
                                   project=not _absorb_applies(t2i, tokens.shape[1]))

    query_pe = tokens
    keys, key_pe = side["keys"], side["key_pe"]

    # first block: the image side from the cache, or absorbed
    if first.skip_first_layer_pe:
        queries = first.self_attn(q=tokens, k=tokens, v=tokens)
    else:
        q = tokens + query_pe
        queries = tokens + first.self_attn(q=q, k=q, v=tokens)
    queries = first.norm1(queries)
    if "t2i_k" in side:
        q = _heads(t2i.q_proj(queries + query_pe), t2i.num_heads)
        queries = first.norm2(queries + _attend(t2i, q, side["t2i_k"], side["t2i_v"]))
    else:
        queries = first.norm2(queries + _tokens_attend_image(t2i, queries + query_pe, side["k"], keys))
    queries = first.norm3(queries + first.mlp(queries))
    # (n, HW, C): the image side broadcast over the prompts
    keys = first.norm4(_image_attends_tokens(i2t, keys, side["k"], queries + query_pe, queries,
                                             q_projected=side.get("i2t_q")))

    for layer in transformer.layers[1:]:
        queries, keys = _two_way_block(layer, queries, keys, query_pe, key_pe)
    # the final attention updates each token on its own: only the output tokens are read afterwards (the
    # prompt tokens' outputs are discarded by every decoder), so only they are computed
    n_out = output_tokens.shape[0]
    queries, query_pe = queries[:, :n_out], query_pe[:, :n_out]
    q = queries + query_pe
    k = keys + key_pe
    queries = transformer.norm_final_attn(queries + _tokens_attend_image(transformer.final_attn_token_to_image, q, k, keys))
    if keys.shape[0] != n:
        keys = keys.expand(n, -1, -1)
    return queries, keys, side["shape"]


def fast_plain_decode(
    model: nn.Module,
    image_embeddings: torch.Tensor,
    image_pe: torch.Tensor,
    sparse: torch.Tensor,
    dense: torch.Tensor,
    multimask_output: bool,
    cache: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain decoder's masks and scores for ``model`` (a :class:`.segmenter.PromptableSegmenter`: its mask
    decoder, and its per-image cache when ``cache``)."""
    decoder = model.mask_decoder
    n = sparse.shape[0]
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    queries, keys, (b, c, h, w) = fast_transformer(decoder, image_embeddings, image_pe, dense, sparse, output_tokens,
                                                   cache=cache)

    iou_token_out = queries[:, 0, :]
    mask_tokens_out = queries[:, 1 : 1 + decoder.num_mask_tokens, :]
    indices = list(range(1, decoder.num_mask_tokens)) if multimask_output else [0]
    hyper_in = torch.stack([decoder.output_hypernetworks_mlps[i](mask_tokens_out[:, i, :]) for i in indices], dim=1)
    if upscaling_is_pixelwise(decoder.output_upscaling):
        masks = upscale_and_project(decoder.output_upscaling, keys, hyper_in, h, w)
    else:
        src = keys.transpose(1, 2).reshape(n, c, h, w)
        upscaled = decoder.output_upscaling(src)
        _, uc, uh, uw = upscaled.shape
        masks = (hyper_in @ upscaled.reshape(n, uc, uh * uw)).reshape(n, -1, uh, uw)
    iou_pred = decoder.iou_prediction_head(iou_token_out)
    iou_pred = iou_pred[:, 1:] if multimask_output else iou_pred[:, 0:1]
    return masks, iou_pred


# ------------------------------------------------------------------------------------------------------
# output upscaling as per-pixel linear maps
# ------------------------------------------------------------------------------------------------------
def _is_2x2_stride2(conv: nn.Module) -> bool:
    return (
        type(conv) is nn.ConvTranspose2d
        and conv.kernel_size == (2, 2)
        and conv.stride == (2, 2)
        and conv.padding == (0, 0)
        and conv.output_padding == (0, 0)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.bias is not None
    )


def upscaling_is_pixelwise(up: nn.Module) -> bool:
    """SAM's ``output_upscaling``: ConvT(2, 2), LayerNorm2d, activation, ConvT(2, 2), activation."""
    from segment_anything.modeling.common import LayerNorm2d

    return (
        isinstance(up, nn.Sequential)
        and len(up) == 5
        and _is_2x2_stride2(up[0])
        and type(up[1]) is LayerNorm2d
        and _is_2x2_stride2(up[3])
        and all(type(up[i]) in (nn.GELU, nn.ReLU, nn.SiLU) for i in (2, 4))
    )


def _pixel_linear(conv: nn.ConvTranspose2d) -> tuple[torch.Tensor, torch.Tensor]:
    """ConvTranspose2d(k=2, s=2) as (C_in, 4 * C_out) weight and bias, output columns in (dy, dx, c) order."""
    c_in, c_out = conv.weight.shape[:2]
    weight = conv.weight.permute(0, 2, 3, 1).reshape(c_in, 4 * c_out)
    return weight, conv.bias.repeat(4)


def _upscaled_tokens(up: nn.Sequential, keys: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``up(keys as an image)`` in token order: (B, h*w*16, C_out), row (y, x, a, b, a2, b2) holding output pixel
    (4y + 2a + a2, 4x + 2b + b2) (first-stage offset (a, b), second-stage offset (a2, b2))."""
    conv1, norm, act1, conv2, act2 = up
    w1, b1 = _pixel_linear(conv1)
    w2, b2 = _pixel_linear(conv2)
    c1, c2 = conv1.out_channels, conv2.out_channels
    x = torch.addmm(b1, keys.reshape(-1, keys.shape[-1]), w1) if keys.shape[0] == 1 else keys @ w1 + b1
    x = x.reshape(keys.shape[0], h * w * 4, c1)
    # LayerNorm2d normalises over channels with a biased variance: exactly layer_norm over the last axis
    x = act1(F.layer_norm(x, (c1,), norm.weight, norm.bias, norm.eps))
    return act2(torch.addmm(b2, x.reshape(-1, c1), w2)).reshape(keys.shape[0], h * w * 16, c2)


def upscale_and_project(up: nn.Sequential, keys: torch.Tensor, hyper_in: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``hyper_in @ up(keys as an image)`` for keys (B, h*w, C) in token order -> masks (N, M, 4h, 4w).

    B is 1 (shared by all N prompts) or N. The masks are formed in token order and reshuffled into image
    order once (see :func:`_upscaled_tokens`), with no (N, C_out, 4h, 4w) intermediate.
    """
    n, m = hyper_in.shape[:2]
    masks = _upscaled_tokens(up, keys, h, w) @ hyper_in.transpose(1, 2)  # (B or N, h*w*16, M)
    if masks.shape[0] != n:
        masks = masks.expand(n, -1, -1)
    masks = masks.reshape(n, h, w, 2, 2, 2, 2, m).permute(0, 7, 1, 3, 5, 2, 4, 6)
    return masks.reshape(n, m, 4 * h, 4 * w)


def upscale_channels_last(up: nn.Sequential, keys: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``up(keys as an image)`` for keys (B, h*w, C) in token order -> (B, C_out, 4h, 4w) in channels-last
    memory, the layout the robust mask path convolves fastest in (:mod:`.fast_robust_mask`)."""
    x = _upscaled_tokens(up, keys, h, w)
    b, c = x.shape[0], x.shape[-1]
    x = x.reshape(b, h, w, 2, 2, 2, 2, c).permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(b, 4 * h, 4 * w, c)
    return x.permute(0, 3, 1, 2)
