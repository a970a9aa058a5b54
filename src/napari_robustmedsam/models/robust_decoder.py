"""RobustSAM mask decoder as a subclass of SAM's :class:`MaskDecoder`.

:class:`RobustMaskDecoder` keeps every SAM decoder parameter (same names, so SAM /
MedSAM / LiteMedSAM decoder weights load into it) and adds the RobustSAM parts under
the key names of the released RobustSAM checkpoints:

==================================  =====================================================
``custom_robust_token``             robust output tokens (ROT), ``(num_mask_tokens, dim)``
``robust_mlp``                      hypernetwork MLP of the robust mask (dim -> dim -> dim/8)
``custom_token_block``              AOTG: instance norms + MLP refining an output token
``fourier_first_layer_features``    AMFG on the early encoder features (``vit_dim`` ch.)
``fourier_last_layer_features``     AMFG on the 256-channel image embedding
``fourier_mask_features``           AMFG on the 32-channel upscaled mask features
==================================  =====================================================

Computation (robust path)
-------------------------
1. Image level (depends only on the image, see :meth:`RobustMaskDecoder.image_level_features`):
   ``F_img = AMFG_first(early) + AMFG_last(embedding)``, ``(B, dim/8, 256, 256)``.
2. Prompt level: SAM's two-way transformer runs with the IoU token and the *robust*
   output tokens; SAM's ``output_upscaling`` gives mask features ``U``.
   Robust mask features ``R = AMFG_mask(U) + F_img`` (``+ U`` in residual mode).
3. Robust mask = ``robust_mlp(AOTG(t_0)) . R`` where ``t_0`` is the first output token.
4. IoU prediction: SAM's IoU head on the IoU token of this (robust-token) pass.

``robust=False`` is SAM's plain decoder, bit for bit (reference ``clear=True``).

Differences from the reference implementation (PyPI ``robust-segment-anything`` 1.0.0)
--------------------------------------------------------------------------------------
* Several prompts per call work: the reference's token block reshapes the whole batch
  (``view(4, -1)``), mixing prompts, so only one prompt per call is correct there.  Here
  every prompt is processed exactly as the reference processes a single prompt, so the
  single-prompt outputs agree with the reference and N prompts equal N separate calls.
* The AOTG of the released code maps, for a single prompt, the first
  ``dim / num_mask_tokens`` (= 64) entries of the twice instance-normalised token
  through its MLP (64 -> 256); the released weights were trained with exactly that,
  and this implementation computes exactly that.
* ``multimask_output=True`` on the robust path is defined (the reference returns 15
  channels of which only the first three mean anything); see "Multimask" below.
* No ``opt`` argument and no ``encoder_features`` list: early features are passed
  directly, or the image-level features are passed pre-computed (cached).

Multimask on the robust path
----------------------------
Only one robust output was ever trained: RobustSAM and RobustMedSAM train with
``multimask_output=False``, i.e. ``robust_mlp``/AOTG only ever saw output token 0.
The other robust tokens are trained only through the token-consistency loss to stay
close to SAM's clean multimask tokens, and the shared ``robust_mlp`` was never trained
to decode them.  So with ``robust=True, multimask_output=True`` this decoder returns

    channel 0: the robust mask (identical to the single-mask robust output),
    channels 1..M-1: SAM's multimask candidates 2..M (``output_hypernetworks_mlps[i]``
        applied to output token ``i`` of the same robust-token transformer pass, on
        SAM's own upscaled mask features ``U``),

with IoU predictions ``[iou_0, iou_2, ..., iou_M]`` of that pass (M = 3 for SAM).
SAM's first multimask candidate (token 1) is the one replaced by the robust mask.
Every returned channel therefore comes from a trained path, no extra transformer pass
is needed, and for the identity-initialised lite decoder the result equals the base
model's ``[single mask, multimask 2, multimask 3]`` exactly.  Consumers that pick the
channel with the highest IoU prediction keep working.

Residual mode (lite decoders)
-----------------------------
``residual=True`` (used by :mod:`.lite_robust_decoder`) changes two fusions so that a
decoder whose robust parts are initialised as "identity" reproduces its base SAM
decoder exactly: ``R = U + AMFG_mask(U) + F_img`` and ``AOTG(t) = t + MLP(...)``.  The
released RobustSAM structure is ``residual=False``.  A residual decoder carries an
extra persistent buffer ``residual_fusion`` so that its checkpoints cannot be loaded
silently into a non-residual decoder (and vice versa), and so that
:func:`robust_decoder_from_state_dict_shapes` can tell the two apart.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from segment_anything.modeling import MaskDecoder, TwoWayTransformer
from segment_anything.modeling.mask_decoder import MLP
from torch import Tensor, nn

from .amfg import EarlyFeatureAMFG, EmbeddingAMFG, FourierModulation, MaskFeatureAMFG, check_fgm_mode
from .fast_plain_decoder import fast_transformer, fast_transformer_applies, upscale_channels_last, upscaling_is_pixelwise
from .fast_robust_mask import fast_robust_mask, fast_robust_mask_applies

__all__ = [
    "IMAGE_FEATURES_KEY",
    "ROBUST_KEY_PREFIXES",
    "RobustMaskDecoder",
    "TokenRefiner",
    "is_robust_decoder_state_dict",
    "robust_decoder_from_state_dict_shapes",
]

#: Key of the (single) tensor returned by :meth:`RobustMaskDecoder.image_level_features`.
IMAGE_FEATURES_KEY = "robust_image_features"

#: Top-level names of the parameters RobustSAM adds to SAM's decoder.
ROBUST_KEY_PREFIXES: tuple[str, ...] = (
    "custom_robust_token",
    "robust_mlp",
    "custom_token_block",
    "fourier_first_layer_features",
    "fourier_last_layer_features",
    "fourier_mask_features",
)

_RESIDUAL_BUFFER = "residual_fusion"


class TokenRefiner(nn.Module):
    """AOTG: anti-degradation output-token generation.

    The token is instance-normalised twice (over its feature dimension, without
    affine parameters, eps 1e-5), its first ``token_dim // num_tokens`` entries go
    through a two-layer MLP back to ``token_dim``.  This is the per-prompt computation
    of the released RobustSAM code.  With ``residual=True`` the MLP output is added to
    the input token (so a zero last layer makes the block the identity).
    """

    def __init__(self, num_tokens: int, token_dim: int, residual: bool = False) -> None:
        super().__init__()
        self.chunk = token_dim // num_tokens
        self.residual = residual
        self.eps = 1e-5
        self.mlp = nn.Sequential(
            nn.Linear(self.chunk, self.chunk),
            nn.ReLU(),
            nn.Linear(self.chunk, self.chunk * num_tokens),
        )

    def forward(self, token: Tensor) -> Tensor:
        normalised = token
        for _ in range(2):  # two parameter-free instance norms, as in the paper / release
            normalised = F.layer_norm(normalised, normalised.shape[-1:], eps=self.eps)
        refined = self.mlp(normalised[..., : self.chunk])
        return token + refined if self.residual else refined


def _match_batch(tensor: Tensor, n: int, what: str) -> Tensor:
    """Broadcast a per-image tensor (batch 1, or n, or n/k images) to n prompts."""
    b = tensor.shape[0]
    if b == n:
        return tensor
    if b == 1:
        return tensor.expand(n, *tensor.shape[1:])
    if b > 0 and n % b == 0:
        return tensor.repeat_interleave(n // b, dim=0)
    raise ValueError(f"{what} has batch {b}, which cannot be broadcast to {n} prompts")


class RobustMaskDecoder(MaskDecoder):
    """SAM mask decoder plus RobustSAM's robust output token, AOTG and AMFG modules.

    Arguments are those of SAM's ``MaskDecoder`` plus:

    vit_dim: channels of the early encoder features (768 for ViT-B, 1024 ViT-L,
        1280 ViT-H, 160 for LiteMedSAM's TinyViT, see :mod:`.early_features`).
    fgm_mode: ``"released"`` (identity FGM, matches released weights) or
        ``"paper"``; see :mod:`.amfg`.
    residual: residual fusions for identity initialisation (lite decoders); see the
        module docstring.  ``False`` for RobustSAM / RobustMedSAM checkpoints.
    transformer: SAM's two-way transformer; if ``None`` one is built from
        ``transformer_depth``, ``transformer_mlp_dim`` and ``transformer_num_heads``
        (SAM's defaults 2, 2048, 8).
    """

    def __init__(
        self,
        *,
        transformer_dim: int = 256,
        transformer: nn.Module | None = None,
        num_multimask_outputs: int = 3,
        activation: type[nn.Module] = nn.GELU,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
        vit_dim: int = 768,
        fgm_mode: str = "released",
        residual: bool = False,
        transformer_depth: int = 2,
        transformer_mlp_dim: int = 2048,
        transformer_num_heads: int = 8,
    ) -> None:
        if transformer is None:
            transformer = TwoWayTransformer(
                depth=transformer_depth,
                embedding_dim=transformer_dim,
                mlp_dim=transformer_mlp_dim,
                num_heads=transformer_num_heads,
            )
        super().__init__(
            transformer_dim=transformer_dim,
            transformer=transformer,
            num_multimask_outputs=num_multimask_outputs,
            activation=activation,
            iou_head_depth=iou_head_depth,
            iou_head_hidden_dim=iou_head_hidden_dim,
        )
        check_fgm_mode(fgm_mode)
        self.vit_dim = vit_dim
        self.residual = residual
        mask_dim = transformer_dim // 8

        # Registration order follows the released checkpoints' key order.
        self.custom_robust_token = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.robust_mlp = MLP(transformer_dim, transformer_dim, mask_dim, 3)
        self.fourier_mask_features = MaskFeatureAMFG(transformer_dim, fgm_mode=fgm_mode)
        self.fourier_first_layer_features = EarlyFeatureAMFG(vit_dim, transformer_dim, fgm_mode=fgm_mode)
        self.fourier_last_layer_features = EmbeddingAMFG(transformer_dim, fgm_mode=fgm_mode)
        self.custom_token_block = TokenRefiner(self.num_mask_tokens, transformer_dim, residual=residual)
        if residual:
            self.register_buffer(_RESIDUAL_BUFFER, torch.ones(()), persistent=True)

    # ------------------------------------------------------------------ configuration
    @property
    def fgm_mode(self) -> str:
        modes = {m.mode for m in self.modules() if isinstance(m, FourierModulation)}
        return modes.pop() if len(modes) == 1 else "mixed"

    def set_fgm_mode(self, mode: str) -> None:
        """Switch every FGM of the decoder to ``mode`` (``"released"`` or ``"paper"``)."""
        check_fgm_mode(mode)
        for module in self.modules():
            if isinstance(module, FourierModulation):
                module.mode = mode

    def robust_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The parameters RobustSAM adds on top of SAM's decoder (what RobustSAM trains)."""
        return [(n, p) for n, p in self.named_parameters() if n.split(".")[0] in ROBUST_KEY_PREFIXES]

    def robust_parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.robust_named_parameters()]

    # ------------------------------------------------------------------ image level
    def _early_channels_first(self, early_features: Tensor) -> Tensor:
        if early_features.dim() != 4:
            raise ValueError(f"early features must be 4-D, got shape {tuple(early_features.shape)}")
        if early_features.shape[-1] == self.vit_dim:  # channels-last (B, H, W, C), as captured
            return early_features.permute(0, 3, 1, 2)
        if early_features.shape[1] == self.vit_dim:  # already (B, C, H, W)
            return early_features
        raise ValueError(
            f"early features of shape {tuple(early_features.shape)} do not have vit_dim={self.vit_dim} "
            "channels: the decoder does not fit this encoder"
        )

    def image_level_features(
        self, image_embeddings: Tensor, early_features: Tensor | None, refine: bool = True
    ) -> dict[str, Tensor]:
        """Robust-path features that depend only on the image (cache these per image).

        Args:
            image_embeddings: ``(B, 256, 64, 64)`` image embeddings.
            early_features: ``(B, 64, 64, vit_dim)`` channels-last early features (the
                output of :class:`~.early_features.EarlyFeatureCapture`); ``(B, vit_dim,
                64, 64)`` is accepted too.
            refine: ``False`` skips the DNC/FGM trunk (RobustSAM's "clean" branch, used
                only as a training target).

        Returns:
            ``{IMAGE_FEATURES_KEY: AMFG_first(early) + AMFG_last(embeddings)}``, shape
            ``(B, transformer_dim // 8, 256, 256)``.  This includes the ~53 M-parameter
            first-layer AMFG (ViT-B), i.e. most of the robust decoder's cost.
        """
        if early_features is None:
            raise ValueError(
                "the robust decoder needs the encoder's early features (or cached image_features); "
                "capture them with EarlyFeatureCapture"
            )
        early = self._early_channels_first(early_features).to(image_embeddings.dtype)
        if early.shape[0] != image_embeddings.shape[0]:
            raise ValueError(
                f"batch of early features ({early.shape[0]}) differs from image embeddings "
                f"({image_embeddings.shape[0]})"
            )
        fused = self.fourier_first_layer_features(early, refine=refine) + self.fourier_last_layer_features(
            image_embeddings, refine=refine
        )
        return {IMAGE_FEATURES_KEY: fused}

    # ------------------------------------------------------------------ prompt level
    def _run_transformer(
        self,
        image_embeddings: Tensor,
        image_pe: Tensor,
        sparse_prompt_embeddings: Tensor,
        dense_prompt_embeddings: Tensor,
        output_tokens: Tensor,
        fast: bool = False,
        channels_last: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """SAM's token/image transformer; returns (iou token, mask tokens, upscaled features).

        ``fast=True`` (the robust path) takes the fast path of the plain decoder (:mod:`.fast_plain_decoder`:
        same results up to float rounding; at inference the image-side inputs are cached per image, in
        training they are computed per call so gradients flow); the plain path (``robust=False``) stays SAM's
        computation exactly. ``channels_last=True`` (with ``fast``; for :func:`.fast_robust_mask`) returns the
        upscaled features NHWC in memory, built in token order.
        """
        n = sparse_prompt_embeddings.shape[0]
        if fast and image_pe.shape[0] == 1 and fast_transformer_applies(self, dense_prompt_embeddings):
            grad = torch.is_grad_enabled()
            if grad:  # training: prompts grouped per image; no per-image cache (the projections are trained)
                image_embeddings = _match_batch(image_embeddings, n, "image_embeddings")
            if image_embeddings.shape[0] in (1, n) and dense_prompt_embeddings.shape[0] in (1, n):
                hidden, keys, (_, c, h, w) = fast_transformer(
                    self, image_embeddings, image_pe, dense_prompt_embeddings, sparse_prompt_embeddings,
                    output_tokens, cache=not grad,
                )
                if channels_last and upscaling_is_pixelwise(self.output_upscaling):
                    upscaled = upscale_channels_last(self.output_upscaling, keys, h, w)
                else:
                    upscaled = self.output_upscaling(keys.transpose(1, 2).reshape(n, c, h, w))
                return hidden[:, 0, :], hidden[:, 1 : 1 + self.num_mask_tokens, :], upscaled
        prompt_tokens = torch.cat(
            (output_tokens.unsqueeze(0).expand(n, -1, -1), sparse_prompt_embeddings), dim=1
        )
        image = _match_batch(image_embeddings, n, "image_embeddings") + dense_prompt_embeddings
        positions = _match_batch(image_pe, n, "image_pe")
        b, c, h, w = image.shape
        hidden, image = self.transformer(image, positions, prompt_tokens)
        iou_token = hidden[:, 0, :]
        mask_tokens = hidden[:, 1 : 1 + self.num_mask_tokens, :]
        upscaled = self.output_upscaling(image.transpose(1, 2).reshape(b, c, h, w))
        return iou_token, mask_tokens, upscaled

    def _sam_masks(self, mask_tokens: Tensor, upscaled: Tensor, indices: list[int]) -> Tensor:
        """SAM's hypernetwork masks for the given output-token indices."""
        weights = torch.stack(
            [self.output_hypernetworks_mlps[i](mask_tokens[:, i, :]) for i in indices], dim=1
        )
        b, c, h, w = upscaled.shape
        return (weights @ upscaled.reshape(b, c, h * w)).reshape(b, -1, h, w)

    def _robust_mask_folded(self, upscaled: Tensor, img: Tensor, weights: Tensor) -> Tensor:
        """``weights . R`` without forming the 32-channel robust features R (inference).

        The mask AMFG ends in a 3x3 convolution (64 -> 32 channels at 256 x 256) and the robust mask is a linear
        combination of its output channels, so the combination is folded into that convolution: one output
        channel per prompt (a grouped convolution over the prompts) instead of 32. Same values up to float
        rounding; it removes about a quarter of the block's per-click convolution work (one of its five 3x3
        convolutions at 256 x 256; docs/benchmarks.md has the per-click timings).
        """
        amfg = self.fourier_mask_features
        head = amfg.head
        last = head[-1]
        z = head[:-1](amfg.refine(upscaled))  # (n, 64, H, W)
        n, cz, h, w = z.shape
        kernel = torch.einsum("nc,cikl->nikl", weights, last.weight)  # (n, 64, 3, 3): one output channel each
        bias = weights @ last.bias if last.bias is not None else None
        mask = F.conv2d(z.reshape(1, n * cz, h, w), kernel, bias, stride=last.stride, padding=last.padding,
                        dilation=last.dilation, groups=n).reshape(n, 1, h, w)
        rest = img + upscaled if self.residual else img
        return mask + torch.einsum("nc,nchw->nhw", weights, rest).unsqueeze(1)

    def _resolve_image_features(
        self,
        image_embeddings: Tensor,
        image_features: Mapping[str, Tensor] | None,
        early_features: Tensor | None,
    ) -> Tensor:
        if image_features is not None:
            try:
                return image_features[IMAGE_FEATURES_KEY]
            except KeyError:
                raise KeyError(
                    f"image_features must contain {IMAGE_FEATURES_KEY!r} (from image_level_features); "
                    f"got keys {sorted(image_features)}"
                ) from None
        return self.image_level_features(image_embeddings, early_features)[IMAGE_FEATURES_KEY]

    def _decode(
        self,
        image_embeddings: Tensor,
        image_pe: Tensor,
        sparse_prompt_embeddings: Tensor,
        dense_prompt_embeddings: Tensor,
        multimask_output: bool,
        image_features: Mapping[str, Tensor] | None,
        early_features: Tensor | None,
        robust: bool,
        aux: bool,
    ) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        if not robust:
            tokens = torch.cat((self.iou_token.weight, self.mask_tokens.weight), dim=0)
            iou_token, mask_tokens, upscaled = self._run_transformer(
                image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, tokens
            )
            masks = self._sam_masks(mask_tokens, upscaled, list(range(self.num_mask_tokens)))
            iou = self.iou_prediction_head(iou_token)
            keep = slice(1, None) if multimask_output else slice(0, 1)
            out["masks"], out["iou_predictions"] = masks[:, keep], iou[:, keep]
            if aux:  # clean-branch targets of RobustSAM's training (reference clear=True)
                n = mask_tokens.shape[0]
                clean = self.image_level_features(image_embeddings, early_features, refine=False)
                fused = self.fourier_mask_features(upscaled, refine=False) + _match_batch(
                    clean[IMAGE_FEATURES_KEY].to(upscaled.dtype), n, "image features"
                )
                out["mask_features"] = upscaled + fused if self.residual else fused
                out["mask_tokens"] = mask_tokens
            return out

        tokens = torch.cat((self.iou_token.weight, self.custom_robust_token.weight), dim=0)
        fast_mask = not aux and fast_robust_mask_applies(self.fourier_mask_features)
        iou_token, mask_tokens, upscaled = self._run_transformer(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, tokens, fast=True,
            channels_last=fast_mask,
        )
        n = mask_tokens.shape[0]
        img = self._resolve_image_features(image_embeddings, image_features, early_features)
        img = img.to(device=upscaled.device, dtype=upscaled.dtype)
        refined = self.custom_token_block(mask_tokens[:, 0, :])
        weights = self.robust_mlp(refined).unsqueeze(1)  # (n, 1, c)
        b, c, h, w = upscaled.shape
        if fast_mask and img.shape[0] in (1, n):
            robust_mask = fast_robust_mask(self.fourier_mask_features, upscaled, img, weights[:, 0], self.residual)
        else:
            img = _match_batch(img, n, "image_features")
            # the folded form needs RobustSAM's mask AMFG itself (training may swap in a stand-in module)
            if aux or torch.is_grad_enabled() or type(self.fourier_mask_features) is not MaskFeatureAMFG:
                robust_features = self.fourier_mask_features(upscaled, refine=True) + img
                if self.residual:
                    robust_features = robust_features + upscaled
                robust_mask = (weights @ robust_features.reshape(b, c, h * w)).reshape(b, 1, h, w)
            else:
                robust_mask = self._robust_mask_folded(upscaled, img, weights[:, 0])
        iou = self.iou_prediction_head(iou_token)
        if multimask_output:
            others = list(range(2, self.num_mask_tokens))
            masks = torch.cat((robust_mask, self._sam_masks(mask_tokens, upscaled, others)), dim=1)
            iou = iou[:, [0, *others]]
        else:
            masks, iou = robust_mask, iou[:, 0:1]
        out["masks"], out["iou_predictions"] = masks, iou
        if aux:
            out["mask_features"] = robust_features
            out["mask_tokens"] = mask_tokens
            out["refined_token"] = refined
        return out

    def forward(
        self,
        image_embeddings: Tensor,
        image_pe: Tensor,
        sparse_prompt_embeddings: Tensor,
        dense_prompt_embeddings: Tensor,
        multimask_output: bool,
        image_features: Mapping[str, Tensor] | None = None,
        early_features: Tensor | None = None,
        robust: bool = True,
    ) -> tuple[Tensor, Tensor]:
        """Predict masks; same inputs and outputs as SAM's ``MaskDecoder.forward``.

        Args:
            image_embeddings: ``(B, 256, 64, 64)``; B is 1 (broadcast to all prompts),
                N, or a divisor of N (prompts grouped per image, in order).
            image_pe: ``(1, 256, 64, 64)`` dense positional encoding.
            sparse_prompt_embeddings: ``(N, k, 256)``, one row per object / prompt set.
            dense_prompt_embeddings: ``(N, 256, 64, 64)``.
            multimask_output: 3 outputs instead of 1 (see the module docstring for the
                robust path).
            image_features: cached output of :meth:`image_level_features` (batch like
                ``image_embeddings``); takes precedence over ``early_features``.
            early_features: ``(B, 64, 64, vit_dim)`` early encoder features, used when
                ``image_features`` is not given.
            robust: ``False`` gives SAM's plain decoder output exactly.

        Returns:
            low-res mask logits ``(N, 1 or 3, 256, 256)`` and IoU predictions ``(N, 1 or 3)``.
        """
        out = self._decode(image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings,
                           multimask_output, image_features, early_features, robust, aux=False)
        return out["masks"], out["iou_predictions"]

    def forward_with_aux(
        self,
        image_embeddings: Tensor,
        image_pe: Tensor,
        sparse_prompt_embeddings: Tensor,
        dense_prompt_embeddings: Tensor,
        multimask_output: bool = False,
        image_features: Mapping[str, Tensor] | None = None,
        early_features: Tensor | None = None,
        robust: bool = True,
    ) -> dict[str, Tensor]:
        """Like :meth:`forward`, plus the tensors RobustSAM's consistency losses use.

        Returns a dict with ``masks``, ``iou_predictions`` and

        * ``mask_features`` ``(N, 32, 256, 256)``: the fused mask features (robust path:
          the robust mask features; ``robust=False``: the same fusion with the AMFG
          trunks skipped, i.e. the reference's ``clear=True`` ``robust_embeddings``;
          this needs ``early_features``);
        * ``mask_tokens`` ``(N, num_mask_tokens, 256)``: output tokens of the transformer
          before AOTG (the reference's ``robust_token``);
        * ``refined_token`` ``(N, 256)`` (robust path only): AOTG output for token 0.
        """
        return self._decode(image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings,
                            multimask_output, image_features, early_features, robust, aux=True)


# ---------------------------------------------------------------------- state-dict helpers
def _find_prefix(state_dict: Mapping[str, Any], suffix: str) -> str | None:
    for key in state_dict:
        if key == suffix or key.endswith("." + suffix):
            return key[: len(key) - len(suffix)]
    return None


def is_robust_decoder_state_dict(state_dict: Mapping[str, Any]) -> bool:
    """True if the (decoder or full-model) state dict holds RobustSAM decoder keys."""
    return _find_prefix(state_dict, "custom_robust_token.weight") is not None


def robust_decoder_from_state_dict_shapes(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Constructor kwargs of :class:`RobustMaskDecoder` inferred from tensor shapes.

    Works on a decoder state dict or a full model state dict (any key prefix such as
    ``mask_decoder.`` or ``module.mask_decoder.``).  Returns ``transformer_dim``,
    ``num_multimask_outputs``, ``iou_head_depth``, ``iou_head_hidden_dim``,
    ``vit_dim``, ``residual``, ``transformer_depth`` and ``transformer_mlp_dim``, so
    ``RobustMaskDecoder(**kwargs)`` builds a fitting decoder.  The number of attention
    heads cannot be inferred from shapes (SAM's 8 is the default).  ``vit_dim`` is the
    channel count the decoder expects from the encoder's early features: compare it
    with :func:`~.early_features.early_feature_spec` to check that a decoder fits an
    encoder.

    Raises ``ValueError`` if the robust keys are missing or inconsistent.
    """
    prefix = _find_prefix(state_dict, "custom_robust_token.weight")
    if prefix is None:
        raise ValueError("state dict has no RobustSAM decoder keys (custom_robust_token.weight)")

    def shape(name: str) -> tuple[int, ...]:
        key = prefix + name
        if key not in state_dict:
            raise ValueError(f"state dict lacks {key!r}")
        return tuple(state_dict[key].shape)

    transformer_dim = shape("iou_token.weight")[1]
    num_mask_tokens = shape("mask_tokens.weight")[0]
    iou_layers = sorted(
        {
            int(k[len(prefix) :].split(".")[2])
            for k in state_dict
            if k.startswith(prefix + "iou_prediction_head.layers.")
        }
    )
    transformer_layers = {
        int(k[len(prefix) :].split(".")[2])
        for k in state_dict
        if k.startswith(prefix + "transformer.layers.")
    }
    vit_dim = shape("fourier_first_layer_features.upsample_layer.0.weight")[0]
    kwargs: dict[str, Any] = {
        "transformer_dim": transformer_dim,
        "num_multimask_outputs": num_mask_tokens - 1,
        "iou_head_depth": len(iou_layers),
        "iou_head_hidden_dim": shape("iou_prediction_head.layers.0.weight")[0],
        "vit_dim": vit_dim,
        "residual": (prefix + _RESIDUAL_BUFFER) in state_dict,
        "transformer_depth": len(transformer_layers),
        "transformer_mlp_dim": shape("transformer.layers.0.mlp.lin1.weight")[0],
    }
    expected = {
        "custom_robust_token.weight": (num_mask_tokens, transformer_dim),
        "robust_mlp.layers.2.weight": (transformer_dim // 8, transformer_dim),
        "fourier_first_layer_features.conv_layer.weight": (vit_dim, 2 * vit_dim, 3, 3),
        "fourier_last_layer_features.conv_layer.weight": (transformer_dim, 2 * transformer_dim, 3, 3),
        "fourier_mask_features.conv_layer.weight": (transformer_dim // 8, transformer_dim // 4, 3, 3),
        "custom_token_block.mlp.2.weight": (transformer_dim, transformer_dim // num_mask_tokens),
    }
    for name, want in expected.items():
        got = shape(name)
        if got != want:
            raise ValueError(f"inconsistent robust decoder: {prefix + name} has shape {got}, expected {want}")
    return kwargs
