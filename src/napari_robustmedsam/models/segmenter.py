"""The one model container every engine, widget and training loop talks to.

A :class:`PromptableSegmenter` holds SAM's three parts under SAM's attribute names
(``image_encoder``, ``prompt_encoder``, ``mask_decoder``), so its state dict uses SAM's key names and
loads SAM, MedSAM, LiteMedSAM and RobustSAM weights directly. It adds the two things SAM's own ``Sam``
class does not know: a robust decoder that also needs early encoder features, and the split of the
decoder's work into an image-level part (cached once per image) and a prompt-level part (per click).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .fast_plain_decoder import fast_plain_decode, fast_plain_decoder_applies


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
    def encode(self, images: torch.Tensor, keep_early: bool = False) -> dict[str, torch.Tensor]:
        """Run the image encoder on preprocessed images (B, 3, S, S).

        Returns ``{"image_embeddings": (B, 256, 64, 64)}`` plus, for a robust decoder, the
        image-level robust features it precomputes (see :meth:`image_features`). Everything returned
        depends on the image only, so the embedding engine can cache all of it. ``keep_early`` (robust
        decoders) also returns the early encoder features as ``"early_features"``, from which another
        decoder on the same encoder can compute its own image-level features without the encoder.
        """
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
        elif not torch.is_grad_enabled() and fast_plain_decoder_applies(self.mask_decoder, dense):
            return fast_plain_decode(self, features["image_embeddings"], kwargs["image_pe"], sparse, dense, multimask_output)
        return self.mask_decoder(**kwargs)
