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

from .fast_plain_decoder import fast_plain_decode, fast_plain_decoder_applies, prepare_mask_side, tensor_key
from .robust_decoder import IMAGE_FEATURES_KEY


@dataclass(frozen=True)
class ArchitectureInfo:
    """What the rest of the code needs to know about an architecture without inspecting modules."""

    name: str  # "vit_b", "vit_l", "vit_h" or "tiny_vit"
    image_size: int  # encoder input side in pixels (1024 for ViT, 256 for TinyViT)
    embedding_size: int  # side of the image embedding grid (64 for all supported encoders)
    embed_dim: int  # channels of the image embedding (256)
    decoder: str  # "sam" or "robust"


class EncoderNotLoaded(nn.Module):
    """Stands in for an image encoder that was not loaded (``load_model(..., image_encoder=False)``).

    Why: decoding a cached embedding needs only the prompt encoder and the mask decoder; building LiteMedSAM's
    TinyViT imports timm and torchvision, which costs a command-line call more than the decode itself.
    ``weights_hash`` is the hash the loaded encoder's weights would have, so cache signatures stay exact."""

    def __init__(self, weights_hash: str) -> None:
        super().__init__()
        self.weights_hash = weights_hash

    def forward(self, *args, **kwargs):
        raise RuntimeError(
            "this model was loaded without its image encoder (image_encoder=False), so it can only decode cached "
            "embeddings; load it with the encoder to compute one"
        )


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
        self.feature_enhancer: nn.Module | None = None  # PGE-SAM head (attach_enhancer)
        # Kept outside the module tree, so it is neither in the state dict nor trained (attach_empty_mask_fallback)
        self.__dict__["_empty_mask_fallback"] = None
        self.__dict__["_box_check_margin"] = None

    def attach_empty_mask_fallback(self, prompt_encoder: nn.Module | None, mask_decoder: nn.Module | None) -> None:
        """Give the model a base model's plain prompt encoder and decoder (on the same image encoder), used for
        the prompts whose mask comes out empty (:class:`~napari_robustmedsam.engine.predictor.Predictor`).

        Why: a fine-tuned head can return nothing where the base model finds the object (thin vessel trees,
        small multi-part lesions); then the base model's mask, with a notice, is better than a silent empty mask.
        The fallback moves with the model (``.to``, ``.half``) but is not part of its state dict."""
        if prompt_encoder is None or mask_decoder is None:
            self.__dict__["_empty_mask_fallback"] = None
            return
        info = ArchitectureInfo(**{**self.architecture.__dict__, "decoder": "sam"})
        fallback = PromptableSegmenter(self.image_encoder, prompt_encoder, mask_decoder, info).eval()
        for parameter in fallback.parameters():
            parameter.requires_grad_(False)
        self.__dict__["_empty_mask_fallback"] = fallback

    def set_box_check(self, margin: float | None) -> None:
        """For a box alone, show the base model's mask (the empty-mask fallback's) where its predicted IoU is higher
        than this model's by more than ``margin``; None: off (only empty masks fall back).

        Why: a head fine-tuned on a few hundred images can answer a box worse than the base model on kinds of
        objects the base model knows well, and both decoders score their own masks
        (docs/results/shipped-heads/rule-box-check.md). Needs the fallback; the clicks that follow are decoded by
        this model as before."""
        if margin is not None and (not math.isfinite(margin) or margin < 0):
            raise ValueError(f"box check margin must be a number >= 0 or None, got {margin!r}")
        self.__dict__["_box_check_margin"] = None if margin is None else float(margin)

    @property
    def box_check_margin(self) -> float | None:
        """The box check's margin (:meth:`set_box_check`); None when off or when there is no base model."""
        if self.__dict__.get("_empty_mask_fallback") is None:
            return None
        return self.__dict__.get("_box_check_margin")

    @property
    def has_image_encoder(self) -> bool:
        return not isinstance(self.image_encoder, EncoderNotLoaded)

    @property
    def empty_mask_fallback(self) -> "PromptableSegmenter | None":
        return self.__dict__.get("_empty_mask_fallback")

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        fallback = self.__dict__.get("_empty_mask_fallback")
        if fallback is not None:  # the image encoder is shared and already converted
            fallback.prompt_encoder._apply(fn, *args, **kwargs)
            fallback.mask_decoder._apply(fn, *args, **kwargs)
        return out

    def attach_enhancer(self, enhancer: nn.Module | None) -> None:
        """Add (or remove, with None) a prompt-guided feature enhancer between the encoder and the decoder."""
        if enhancer is None:
            self.feature_enhancer = None
            return
        from .intermediate_features import intermediate_spec

        _, channels, strides = intermediate_spec(self.image_encoder)
        cfg = enhancer.config
        if tuple(cfg.feature_channels) != tuple(channels) or tuple(cfg.feature_strides) != tuple(strides):
            raise ValueError(
                f"the feature enhancer expects intermediate features of {list(cfg.feature_channels)} channels "
                f"(strides {list(cfg.feature_strides)}) but this {self.architecture.name} encoder gives "
                f"{list(channels)} (strides {list(strides)}): the head was trained on another encoder"
            )
        if cfg.image_size != self.architecture.image_size:
            raise ValueError(f"the feature enhancer was built for {cfg.image_size} px inputs, this encoder takes "
                             f"{self.architecture.image_size} px")
        self.feature_enhancer = enhancer

    @property
    def head(self) -> str:
        """Which robust head the model has: ``"pge"`` (feature enhancer), ``"robust"`` (decoder) or ``"none"``."""
        if self.feature_enhancer is not None:
            return "pge"
        return "robust" if self.is_robust else "none"

    @property
    def is_robust(self) -> bool:
        return hasattr(self.mask_decoder, "image_level_features")

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @torch.no_grad()
    def encode(self, images: torch.Tensor, keep_early: bool = False) -> dict[str, torch.Tensor]:
        """Run the image encoder on preprocessed images (B, 3, S, S).

        Returns ``{"image_embeddings": (B, 256, 64, 64)}`` plus, for a robust decoder, the
        image-level robust features it precomputes (see :meth:`image_features`). Everything returned
        depends on the image only, so the embedding engine can cache all of it. ``keep_early`` (robust
        decoders) also returns the early encoder features as ``"early_features"``, from which another
        decoder on the same encoder can compute its own image-level features without the encoder.
        """
        if not self.has_image_encoder:
            self.image_encoder()  # raises, saying that this model can only decode cached embeddings
        if self.feature_enhancer is not None:  # + the enhancer's intermediate features (pge_feature_*)
            from .intermediate_features import IntermediateFeatureCapture

            with IntermediateFeatureCapture(self.image_encoder) as inter:
                features = self._encode_base(images, keep_early)
            features.update(inter.features)
            return features
        return self._encode_base(images, keep_early)

    def _encode_base(self, images: torch.Tensor, keep_early: bool) -> dict[str, torch.Tensor]:
        if not self.is_robust:
            return {"image_embeddings": self.image_encoder(images)}
        from .early_features import EarlyFeatureCapture

        with EarlyFeatureCapture(self.image_encoder) as capture:
            embeddings = self.image_encoder(images)
        features = {"image_embeddings": embeddings}
        features.update(self.image_features(embeddings, capture.features))
        if keep_early:
            features["early_features"] = capture.features
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
        """Prompts already in the model's input frame -> (sparse, dense) prompt embeddings.

        A mask prepared by :meth:`prepare_mask_prompt` reuses its dense embedding (the same tensor, which the
        fast decoder recognises), when points or a box fix the batch size.
        """
        prepared = self._prepared_dense(masks)
        if prepared is not None and (points is not None or boxes is not None):
            sparse, _ = self.prompt_encoder(points=points, boxes=boxes, masks=None)
            if sparse.shape[0] == 1:
                return sparse, prepared
        return self.prompt_encoder(points=points, boxes=boxes, masks=masks)

    def _mask_key(self, masks: torch.Tensor) -> tuple | None:
        key = tensor_key(masks)
        if key is None:
            return None
        mask_path = getattr(self.prompt_encoder, "mask_downscaling", None)
        return (key,) + tuple((id(p), p._version) for p in (mask_path.parameters() if mask_path is not None else ()))

    def _prepared_dense(self, masks: torch.Tensor | None) -> torch.Tensor | None:
        cached = self.__dict__.get("_prepared_mask")
        if masks is None or cached is None or torch.is_grad_enabled() or masks.shape[0] != 1:
            return None
        key = self._mask_key(masks)
        return cached[1] if key is not None and cached[0] == key else None

    @torch.no_grad()
    def prepare_mask_prompt(self, features: dict[str, torch.Tensor], masks: torch.Tensor) -> None:
        """Do a corrective click's mask-prompt work before the click: the mask's dense embedding and, for the
        fast plain decoder, the first attention block's image side for it.

        ``masks``: the previous low-resolution logits (1, 1, 256, 256) in the model's device/dtype, the very
        tensor the next :meth:`embed_prompts` will get. Why: an annotator knows the next mask prompt as soon as
        a mask is shown, and the user's pause before the next click is idle time. One mask is kept (the latest).
        """
        if masks.dim() != 4 or masks.shape[0] != 1 or not hasattr(self.prompt_encoder, "_embed_masks"):
            return
        key = self._mask_key(masks)
        if key is None:
            return
        dense = self._prepared_dense(masks)
        if dense is None:
            dense = self.prompt_encoder._embed_masks(masks)
            self.__dict__["_prepared_mask"] = (key, dense, masks)  # keeps ``masks`` alive
        if self.feature_enhancer is None and fast_plain_decoder_applies(self.mask_decoder, dense):
            prepare_mask_side(self.mask_decoder, features["image_embeddings"], self.dense_pe(), dense)

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
        prompts: tuple | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt-level decoding: returns low-resolution logits (N, C, 256, 256) and IoU predictions.

        ``prompts`` = (points, boxes) in the model frame, as given to :meth:`embed_prompts`; a model with a
        feature enhancer needs them (its guidance maps are drawn from the raw prompts).
        """
        embeddings = features["image_embeddings"]
        if self.feature_enhancer is not None:
            if prompts is None:
                raise ValueError("this model has a prompt-guided feature enhancer: decode() needs prompts=(points, boxes)")
            embeddings = self.enhance(features, prompts[0], prompts[1], dense)
            # enhanced embeddings are new on every click: caching their image side would only cost
            return self.decode_embeddings(embeddings, features, sparse, dense, multimask_output, per_image_cache=False)
        return self.decode_embeddings(embeddings, features, sparse, dense, multimask_output)

    def decode_embeddings(
        self,
        embeddings: torch.Tensor,
        features: dict[str, torch.Tensor],
        sparse: torch.Tensor,
        dense: torch.Tensor,
        multimask_output: bool,
        per_image_cache: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The mask decoder on given image embeddings: (1, C, g, g) shared by the N prompt sets, or (N, C, g, g)
        one per prompt set (the feature enhancer's output). ``features`` supplies a robust decoder's cached
        image-level features. ``per_image_cache=False``: the embeddings are new on every call (enhanced), so
        the fast decoder computes their image side for this call only."""
        n = sparse.shape[0]
        per_prompt = embeddings.shape[0] > 1 and embeddings.shape[0] == n
        kwargs = dict(
            image_embeddings=embeddings,
            image_pe=self.dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
        )
        if self.is_robust:
            kwargs["image_features"] = {k: v for k, v in features.items() if k == IMAGE_FEATURES_KEY}
            return self.mask_decoder(**kwargs)
        if fast_plain_decoder_applies(self.mask_decoder, dense) and (per_prompt or not torch.is_grad_enabled()):
            # per-prompt embeddings change on every call: no per-image cache (and gradients may flow)
            return fast_plain_decode(self, embeddings, kwargs["image_pe"], sparse, dense, multimask_output,
                                     cache=per_image_cache and not per_prompt and not torch.is_grad_enabled())
        if per_prompt:  # SAM's decoder repeats its image batch per prompt: one prompt set at a time
            outs = [self.mask_decoder(embeddings[i : i + 1], kwargs["image_pe"], sparse[i : i + 1],
                                      dense[i : i + 1] if dense.shape[0] == n else dense, multimask_output)
                    for i in range(n)]
            return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])
        return self.mask_decoder(**kwargs)

    def enhancer_image_side(self, features: dict[str, torch.Tensor]) -> list:
        """The enhancer's per-image part, computed once per image and kept for the following clicks."""
        return self._enhancer_image_parts(features)[0]

    def _enhancer_image_parts(self, features: dict[str, torch.Tensor]) -> tuple[list, tuple | None]:
        """(the enhancer's image side, its embedding side), cached per image: the gates' projections of the
        intermediate features, the embedding in channels-last memory and the stages' input computed from it
        (converting and pooling the embedding again on every click would add to each click's latency)."""
        from .intermediate_features import INTERMEDIATE_KEYS, stack_intermediates

        enhancer = self.feature_enhancer
        first = features.get(INTERMEDIATE_KEYS[0])
        embeddings = features["image_embeddings"]
        if torch.is_grad_enabled() and any(p.requires_grad for p in enhancer.parameters()):
            return enhancer.image_side(stack_intermediates(features)), None  # training: gradients flow, no cache
        keys = (tensor_key(first) if first is not None else None, tensor_key(embeddings))
        key = None if None in keys else keys + (tuple((id(p), p._version) for p in enhancer.parameters()),)
        cached = self.__dict__.get("_enhancer_side")
        if cached is not None and key is not None and cached[0] == key:
            return cached[1], cached[2]
        with torch.no_grad():
            side = enhancer.image_side(stack_intermediates(features))
            embedding_side = enhancer.embedding_side(embeddings)
        # keep ``first`` and ``embeddings`` alive: their ids stay unique while the entry exists
        self.__dict__["_enhancer_side"] = (key, side, embedding_side, first, embeddings)
        return side, embedding_side

    def enhance(self, features: dict[str, torch.Tensor], points, boxes, dense: torch.Tensor) -> torch.Tensor:
        """Enhanced image embeddings (N, 256, 64, 64) for N prompt sets."""
        side, embedding_side = self._enhancer_image_parts(features)
        return self.feature_enhancer(features["image_embeddings"], side, points, boxes, dense, embedding_side)
