"""``load_model``: a registry name or a checkpoint file -> a ready :class:`PromptableSegmenter`.

A registry name goes through :func:`fetch_weights`; a path goes through layout detection. The model is
built with :func:`models.build.build_segmenter` for the architecture and decoder the tensors show, the
weights are loaded with ``strict=True`` (missing, unexpected or mis-shaped tensors are reported by name,
never dropped), and the model is put in eval mode on the chosen device and dtype.

Preprocessing must match what the weights were trained with (SAM, MedSAM and LiteMedSAM differ and a
mismatch silently ruins masks). It comes from the registry, else the checkpoint's metadata, else a
registry entry with the same sha256 or file name, else the layout (TinyViT -> litemedsam, MedSAM's
training layout -> medsam, otherwise sam) with a notice that it was guessed and how to override it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..device import inference_dtype, resolve_device
from ..errors import CheckpointError, UserFacingError
from .fusion import fuse_checkpoints
from .layouts import expected_shapes, is_robust_key, shapes_of
from .project_format import PREPROCESSING_CHOICES
from .safe_load import notice
from .sources import (  # noqa: F401  (also the loader's public names, as before sources.py)
    Source,
    base_state,
    check_state_dict_fits,
    infer_box_primary,
    infer_preprocessing,
    read_model_file,
    resolve_source,
    with_identity_robust_decoder,
)

HEAD_DESCRIPTIONS = {
    "pge": "PGE-SAM prompt-guided feature enhancer (runs per click)",
    "robust": "RobustSAM robust mask decoder (image-level features cached)",
    "none": "none (plain SAM decoder)",
}


# --------------------------------------------------------------------------------------------------
# strict loading
# --------------------------------------------------------------------------------------------------


def load_state_dict_strict(model, state_dict: Mapping, where: str) -> None:
    """``model.load_state_dict(state_dict, strict=True)`` with errors that name the tensors."""
    what = f"the {model.architecture.name} model with a {model.architecture.decoder} decoder"
    check_state_dict_fits(state_dict, shapes_of(model), where, what)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{where} does not fit {what}: {err}") from None


def check_weights_finite(model, where: str) -> None:
    """Raise a CheckpointError naming the first tensor with NaN/inf values (after the cast to the inference dtype,
    where a float16 overflow would appear): such weights give empty masks with NaN scores, silently."""
    import torch

    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(
                f"{where} has {bad} NaN/inf values in its weights ({name}, {tuple(tensor.shape)}): the file is "
                "corrupt or its training diverged; use another checkpoint (or an earlier one of the run)"
            )


def _meta_leftovers(model) -> list[str]:
    """Names of tensors still on the meta device (parameters, buffers or plain tensor attributes)."""
    import torch

    left = [name for name, t in model.named_parameters() if t.is_meta]
    left += [name for name, t in model.named_buffers() if t.is_meta]
    for module_name, module in model.named_modules():
        for attr, value in vars(module).items():
            if isinstance(value, torch.Tensor) and value.is_meta:
                left.append(f"{module_name}.{attr}" if module_name else attr)
    return left


def build_and_load(architecture: str, decoder: str, state: Mapping, where: str, *, encoder_hash: str | None = None):
    """Build ``build_segmenter(architecture, decoder)`` and load ``state`` strictly.

    ``encoder_hash``: build no image encoder (its tensors in ``state`` are left out); see
    :class:`~napari_robustmedsam.models.segmenter.EncoderNotLoaded`.

    The model is first built on the meta device and the checkpoint tensors are assigned to it (no random
    initialisation, no copy). If some tensor is not covered by the state dict (a non-persistent buffer),
    or the architecture cannot be built on the meta device (TinyViT), it is built normally instead.
    Every missing, unexpected or mis-shaped tensor is named in the error.
    """
    import torch

    from ..models.build import VIT_CONFIGS, build_segmenter

    what = f"the {architecture} model with a {decoder} decoder"
    if encoder_hash is not None:
        state = without_image_encoder(state)
        what += " (without its image encoder)"
    model = None
    # Only a ViT encoder is worth building on the meta device: random initialisation there goes through torch's
    # reference ops, whose first use imports torch._dynamo (about a second), more than the prompt encoder and mask
    # decoder take to initialise (TinyViT cannot be built there at all)
    if encoder_hash is None and architecture in VIT_CONFIGS:
        try:
            with torch.device("meta"):
                model = build_segmenter(architecture, decoder)
        except ImportError as err:
            raise CheckpointError(f"cannot build {what} for {where}: {err}") from err
        except (RuntimeError, NotImplementedError, TypeError):
            model = None
    if model is not None:
        check_state_dict_fits(state, shapes_of(model), where, what)
        try:
            model.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as err:
            raise CheckpointError(f"{where} does not fit {what}: {err}") from None
        if not _meta_leftovers(model):
            return model
    try:
        model = build_segmenter(architecture, decoder, encoder_hash=encoder_hash)
    except ImportError as err:
        raise CheckpointError(f"cannot build {what} for {where}: {err}") from err
    load_state_dict_strict(model, state, where)
    return model


ENCODER_PREFIX = "image_encoder."


def without_image_encoder(state: Mapping) -> dict:
    return {key: value for key, value in state.items() if not key.startswith(ENCODER_PREFIX)}


def image_encoder_hash(state: Mapping, dtype) -> str:
    """The hash the image encoder loaded from ``state`` and converted to ``dtype`` would have (its cache key)."""
    from ..models.weights_hash import hash_state

    return hash_state({key[len(ENCODER_PREFIX):]: value for key, value in state.items()
                       if key.startswith(ENCODER_PREFIX)}, dtype=dtype)


#: the encoder hash of a build whose encoder is never used (only its prompt encoder and mask decoder are kept)
PARTS_ONLY = "none: only the prompt encoder and mask decoder are kept"

#: checkpoint metadata naming the registry model whose plain decoder answers where this model's mask is empty
EMPTY_MASK_FALLBACK_KEY = "empty_mask_fallback"


def attach_empty_mask_fallback(model, base: str, where: str, *, cache_dir=None) -> None:
    """Attach registry model ``base``'s plain prompt encoder and mask decoder as ``model``'s empty-mask fallback."""
    try:
        state, _sha = base_state(base, cache_dir=cache_dir, progress=False)
    except CheckpointError as err:
        raise CheckpointError(f"{where} falls back on model '{base}' for empty masks, which cannot be loaded: {err}") from None
    state = {key: value for key, value in state.items() if not is_robust_key(key)}
    # only its prompt encoder and decoder are used (on the model's own image encoder): no encoder is built
    parts = build_and_load(model.architecture.name, "sam", state, f"registry model '{base}'",
                           encoder_hash=PARTS_ONLY)
    model.attach_empty_mask_fallback(parts.prompt_encoder, parts.mask_decoder)


def _attach_base_model(model, metadata: dict, source: Source, where: str, notices: list, cache_dir) -> None:
    """The base model a head's checkpoint names (its empty-mask fallback), and the box check its registry entry
    sets (``ModelSpec.box_check``; a head loaded from a file of the user's own keeps it off)."""
    fallback = metadata.get(EMPTY_MASK_FALLBACK_KEY)
    if not (isinstance(fallback, str) and fallback):
        return
    attach_empty_mask_fallback(model, fallback, where, cache_dir=cache_dir)
    notices.append(notice(f"where this model's mask is empty, the mask of '{fallback}' is used instead, with "
                          "a notice (the head's empty-mask fallback)"))
    margin = getattr(source.spec, "box_check", None) if source.spec_match == "name" else None
    if margin is not None:
        model.set_box_check(margin)


# --------------------------------------------------------------------------------------------------
# load_model
# --------------------------------------------------------------------------------------------------
def count_parameters(state_dict: Mapping) -> dict[str, int]:
    """Trainable-parameter counts per module from a state dict (BatchNorm statistics excluded)."""
    counts = {"image_encoder": 0, "prompt_encoder": 0, "mask_decoder": 0, "mask_decoder_robust": 0,
              "feature_enhancer": 0}
    for key, value in state_dict.items():
        if key.endswith(("running_mean", "running_var", "num_batches_tracked")):
            continue
        if key == "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix":
            continue  # a fixed random buffer, not a parameter
        part = key.split(".", 1)[0]
        numel = int(value.numel()) if hasattr(value, "numel") else 0
        if part in counts:
            counts[part] += numel
        if is_robust_key(key):
            counts["mask_decoder_robust"] += numel
    counts["total"] = (counts["image_encoder"] + counts["prompt_encoder"] + counts["mask_decoder"]
                       + counts["feature_enhancer"])
    if not counts["feature_enhancer"]:  # only models with a PGE head list it
        del counts["feature_enhancer"]
    return counts


def split_enhancer(state: Mapping, metadata: Mapping, where: str):
    """(state without the PGE head, the head built and loaded strictly, or None)."""
    from ..models.pge_enhancer import ENHANCER_PREFIX, EnhancerConfig, PromptGuidedEnhancer

    head = metadata.get("head") if isinstance(metadata.get("head"), Mapping) else {}
    if head.get("kind") != "pge":
        return state, None
    sub = {k[len(ENHANCER_PREFIX):]: v for k, v in state.items() if k.startswith(ENHANCER_PREFIX)}
    if not sub:
        raise CheckpointError(f"{where}: its metadata names a PGE feature-enhancer head but it holds no "
                              f"{ENHANCER_PREFIX}* tensors; the file is incomplete")
    try:
        config = EnhancerConfig.from_dict(dict(head.get("config") or {}))  # "parameters" is informational
        enhancer = PromptGuidedEnhancer(config)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{where}: cannot build its PGE feature-enhancer head: {err}") from None
    check_state_dict_fits(sub, shapes_of(enhancer), where, "its PGE feature enhancer (as its metadata describes it)")
    try:
        enhancer.load_state_dict(sub, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{where}: its PGE feature-enhancer tensors do not fit: {err}") from None
    return {k: v for k, v in state.items() if not k.startswith(ENHANCER_PREFIX)}, enhancer


def attach_enhancer_checked(model, enhancer, where: str) -> None:
    try:
        model.attach_enhancer(enhancer)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{where}: its PGE head does not match its image encoder: {err}") from None


@dataclass
class LoadedModel:
    model: Any  # PromptableSegmenter, eval mode, on ``device``
    name: str
    architecture: str
    decoder: str
    preprocessing: str
    box_primary: bool
    checkpoint_path: Path | None
    sha256: str | None
    layout: str
    metadata: dict = field(default_factory=dict)
    preprocessing_reason: str = ""
    notices: list[str] = field(default_factory=list)

    @property
    def device(self):
        return self.model.device

    @property
    def dtype(self):
        return next(self.model.parameters()).dtype

    def summary(self) -> str:
        counts = count_parameters(self.model.state_dict())
        lines = [
            f"model: {self.name}",
            f"  checkpoint: {self.checkpoint_path or '(in memory)'}",
            f"  sha256: {self.sha256 or '-'}",
            f"  layout: {self.layout}",
            f"  architecture: {self.architecture}, decoder: {self.decoder}",
            f"  robust head: {HEAD_DESCRIPTIONS.get(getattr(self.model, 'head', 'none'), '-')}",
            f"  preprocessing: {self.preprocessing} ({self.preprocessing_reason})",
            f"  prompts: {'boxes (trained with boxes only; points alone give poor masks)' if self.box_primary else 'points and boxes'}",
            f"  device: {self.device}, dtype: {str(self.dtype).replace('torch.', '')}",
            "  parameters: " + ", ".join(f"{k} {v / 1e6:.2f} M" for k, v in counts.items() if v or k == "total"),
        ]
        provenance = self.metadata.get("provenance") or {}
        for src in provenance.get("sources", []) if isinstance(provenance, dict) else []:
            lines.append(
                f"  from {src.get('role', '?')}: {src.get('registry_name') or src.get('filename') or src.get('given')}"
                f" ({', '.join(src.get('prefixes', []))}) sha256 {str(src.get('sha256'))[:12]}"
            )
        lines += [f"  notice: {text}" for text in self.notices]
        return "\n".join(lines)


def _builtin_decoder(override: str, state: Mapping, decoder: str, architecture: str, where: str,
                     notices: list) -> tuple[Mapping, str]:
    """``decoder_override`` "sam" (the plain part of a robust decoder) or "robust" (a lite robust decoder built
    from a plain one, identity-initialised): the state and decoder kind to build, with a notice of the change."""
    if override == "sam":
        if decoder == "robust":
            dropped = [key for key in state if is_robust_key(key)]
            state = {key: value for key, value in state.items() if not is_robust_key(key)}
            decoder = "sam"
            notices.append(notice(
                f"decoder_override='sam': using the plain SAM part of the robust decoder of {where}; "
                f"its {len(dropped)} robust tensors are not loaded"
            ))
    elif decoder != "robust" and architecture == "tiny_vit":
        state = with_identity_robust_decoder(state, where)
        decoder = "robust"
        notices.append(notice(
            f"decoder_override='robust': {where} has a plain decoder, so a lite robust decoder was built from it "
            "with untrained (identity-initialised) robust parts: masks equal the plain decoder's until it is fine-tuned"
        ))
    elif decoder != "robust":
        raise CheckpointError(
            f"decoder_override='robust' but {where} has no robust decoder weights; give a checkpoint with a "
            "robust decoder as decoder_override (e.g. 'robustsam_vit_b'), or build one with `robustmedsam fuse`"
        )
    return state, decoder


def _preprocessing(source: Source, preprocessing: str | None, where: str, notices: list) -> tuple[str, str, bool]:
    """(preprocessing, why, box-primary) of an unfused checkpoint: the caller's choice or what it records or
    suggests (a guess is noticed)."""
    prep, reason, guessed = infer_preprocessing(source)
    if preprocessing is not None:
        if preprocessing != prep:
            reason = f"set by the caller (the checkpoint suggests {prep!r}: {reason})"
        else:
            reason = f"set by the caller ({reason})"
        prep, guessed = preprocessing, False
    if guessed:
        notices.append(notice(
            f"preprocessing of {where} is not recorded; {reason}: {prep!r}. If masks look wrong, pass "
            "preprocessing='sam' | 'medsam' | 'litemedsam' (robustmedsam segment / embed: --preprocessing)"
        ))
    box_primary = infer_box_primary(source, prep)
    return prep, reason, box_primary


def load_model(
    name_or_path: str | os.PathLike = "litemedsam",
    device: str = "auto",
    half: bool | None = None,
    decoder_override: str | os.PathLike | None = None,
    *,
    preprocessing: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    image_encoder: bool = True,
) -> LoadedModel:
    """Load a registry model or a checkpoint file, ready for inference.

    ``decoder_override``: ``"sam"`` uses SAM's plain decoder of a robust checkpoint (the robust tensors are
    left out explicitly, with a notice); any other value is a registry name or file whose mask decoder
    replaces this checkpoint's (an in-memory fusion, validated like ``robustmedsam fuse``).
    ``preprocessing``: override the preprocessing (``"sam"``, ``"medsam"`` or ``"litemedsam"``).
    ``image_encoder=False``: build no encoder, to decode cached embeddings; the model carries the encoder's
    weights hash for the cache. A PGE model needs its encoder's layout and is loaded whole.
    """
    if preprocessing is not None and preprocessing not in PREPROCESSING_CHOICES:
        raise UserFacingError(
            f"unknown preprocessing {preprocessing!r}; expected one of {', '.join(PREPROCESSING_CHOICES)}"
        )
    target_device = resolve_device(device)
    dtype = inference_dtype(target_device, half)
    source = resolve_source(name_or_path, cache_dir=cache_dir, progress=progress)
    ckpt = source.checkpoint
    where = str(source.path) if source.path else source.label
    notices = list(ckpt.notices)
    state = ckpt.state_dict
    metadata = dict(ckpt.metadata)
    name = source.spec.name if (source.spec and source.spec_match == "name") else (
        source.path.name if source.path else source.label
    )
    if not ckpt.layout.complete:
        missing = [part for part in ("image_encoder", "prompt_encoder", "mask_decoder") if part not in ckpt.layout.parts]
        raise CheckpointError(
            f"{where} holds no {', '.join(missing)} weights, so it cannot be used as a model on its own; "
            "combine it with another checkpoint using `robustmedsam fuse`"
        )
    architecture, decoder = ckpt.architecture, ckpt.decoder

    if source.spec is not None and source.spec.robust_init and decoder == "sam":
        decoder_override = "robust"
    fused = False
    if decoder_override is not None:
        override = os.fspath(decoder_override)
        if override in ("sam", "robust"):
            state, decoder = _builtin_decoder(override, state, decoder, architecture, where, notices)
        else:
            state, metadata = fuse_checkpoints(
                source, override, preprocessing=preprocessing, cache_dir=cache_dir, progress=progress
            )
            decoder = metadata["decoder"]
            fused = True
            notices.append(notice(f"mask decoder taken from {override} (in-memory fusion, nothing written)"))

    if fused:
        prep, reason = metadata["preprocessing"], metadata.get("preprocessing_reason", "")
        box_primary = bool(metadata.get("box_primary"))
    else:
        prep, reason, box_primary = _preprocessing(source, preprocessing, where, notices)

    state, enhancer = split_enhancer(state, metadata, where)
    encoder_hash = None if image_encoder or enhancer is not None else image_encoder_hash(state, dtype)
    model = build_and_load(architecture, decoder, state, where, encoder_hash=encoder_hash)
    if enhancer is not None:
        attach_enhancer_checked(model, enhancer, where)
    _attach_base_model(model, metadata, source, where, notices, cache_dir)
    model.eval()
    model.to(device=target_device, dtype=dtype)
    check_weights_finite(model, where)
    return LoadedModel(model=model, name=name, architecture=architecture, decoder=decoder, preprocessing=prep,
                       box_primary=bool(box_primary), checkpoint_path=source.path, sha256=source.sha256,
                       layout=ckpt.layout.name, metadata=metadata, preprocessing_reason=reason, notices=notices)


__all__ = [
    "LoadedModel",
    "Source",
    "count_parameters",
    "expected_shapes",
    "infer_box_primary",
    "infer_preprocessing",
    "load_model",
    "load_state_dict_strict",
    "resolve_source",
]
