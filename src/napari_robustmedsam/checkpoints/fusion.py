"""Module-wise checkpoint fusion: the image encoder from one checkpoint, the mask decoder from another.

This is how RobustMedSAM is initialised (MedSAM's image and prompt encoders + RobustSAM's robust mask
decoder), generalised to any supported layouts on both sides. Everything is validated before anything
is written:

* the encoder's embedding channels (neck output), the prompt embedding and the decoder's transformer
  width must all be 256, and the encoder's embedding grid must be 64 x 64;
* the prompt encoder's source must use the same input size as the encoder (1024 px ViT, 256 px TinyViT);
* a robust decoder reads early encoder features: its first AMFG block's input width must equal the
  encoder's (768 for ViT-B, 1024 ViT-L, 1280 ViT-H; TinyViT needs the lite robust decoder);
* the fused state dict is compared, tensor by tensor, with the model :func:`build_segmenter` builds.

The result records its preprocessing (from the encoder's source unless overridden, and why), and its
provenance: sha256 and size of each source file, which tensor prefixes came from where, and when.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from ..errors import CheckpointError
from .layouts import (
    ARCH_IMAGE_SIZE,
    Checkpoint,
    decoder_transformer_dim,
    early_feature_width,
    embedding_grid,
    expected_shapes,
    neck_channels,
    prompt_embed_dim,
)
from .sources import Source, check_state_dict_fits, infer_box_primary, infer_preprocessing, resolve_source
from ..io.output_paths import check_output
from .project_format import PREPROCESSING_CHOICES, check_destination, make_metadata, save_checkpoint
from .safe_load import notice

SEED_NOTE = (
    "note: the seed RobustMedSAM eval.py used SAM preprocessing for its fused MedSAM-encoder + "
    "RobustSAM-decoder model; pass preprocessing='sam' to reproduce that setup"
)


def _tiny_vit_early_width() -> int | None:
    try:
        from ..models.build import encoder_width

        return int(encoder_width("tiny_vit"))
    except (ImportError, AttributeError):
        pass
    try:
        from ..models.lite_robust_decoder import LITE_EARLY_FEATURE_DIM

        return int(LITE_EARLY_FEATURE_DIM)
    except (ImportError, AttributeError):
        return None


def expected_early_width(architecture: str) -> int | None:
    """Early-feature channels a robust decoder must read for this encoder architecture."""
    from ..models.build import VIT_CONFIGS

    if architecture in VIT_CONFIGS:
        return int(VIT_CONFIGS[architecture]["embed_dim"])
    return _tiny_vit_early_width()


def _name(source: Source) -> str:
    if source.spec is not None and source.spec_match == "name":
        return f"'{source.spec.name}'"
    return str(source.path) if source.path else source.label


def _validate(enc: Source, prm: Source, dec: Source) -> list[str]:
    """Problems that make the parts not fit together (empty list: they fit)."""
    from ..models.build import EMBEDDING_SIZE, PROMPT_EMBED_DIM, VIT_CONFIGS

    problems: list[str] = []
    enc_sd, prm_sd, dec_sd = enc.checkpoint.state_dict, prm.checkpoint.state_dict, dec.checkpoint.state_dict
    arch = enc.checkpoint.architecture
    if not enc.checkpoint.has_part("image_encoder") or arch is None:
        problems.append(f"{_name(enc)} holds no image encoder weights")
    if not prm.checkpoint.has_part("prompt_encoder"):
        problems.append(f"{_name(prm)} holds no prompt encoder weights (choose the other source for it)")
    if not dec.checkpoint.has_part("mask_decoder"):
        problems.append(f"{_name(dec)} holds no mask decoder weights")
    if problems:
        return problems

    # embedding channels: encoder neck -> prompt embeddings -> decoder transformer, all 256
    dims = {
        f"image embedding channels of {_name(enc)} (image_encoder.neck.0.weight)": neck_channels(enc_sd),
        f"prompt embedding dim of {_name(prm)} (prompt_encoder.point_embeddings.0.weight)": prompt_embed_dim(prm_sd),
        f"decoder transformer dim of {_name(dec)} (mask_decoder.iou_token.weight)": decoder_transformer_dim(dec_sd),
    }
    for what, value in dims.items():
        if value is not None and value != PROMPT_EMBED_DIM:
            problems.append(f"{what} is {value}, but every part must use {PROMPT_EMBED_DIM}")
    grid = embedding_grid(enc_sd, arch)
    if grid is not None and grid != EMBEDDING_SIZE:
        problems.append(
            f"the image embedding of {_name(enc)} is {grid} x {grid}, but the prompt encoder and mask decoder "
            f"work on {EMBEDDING_SIZE} x {EMBEDDING_SIZE}"
        )

    # prompt encoder input size vs encoder image size
    prm_arch = prm.checkpoint.architecture
    if prm is not enc and prm_arch is not None and ARCH_IMAGE_SIZE[prm_arch] != ARCH_IMAGE_SIZE[arch]:
        problems.append(
            f"the prompt encoder of {_name(prm)} comes from a {prm_arch} model with {ARCH_IMAGE_SIZE[prm_arch]} px "
            f"input, but the image encoder ({arch}) takes {ARCH_IMAGE_SIZE[arch]} px: prompts would be placed in "
            "the wrong frame; take the prompt encoder from the encoder's checkpoint (--prompt-encoder encoder)"
        )

    # robust decoder: early-feature width vs encoder width
    if dec.checkpoint.decoder == "robust":
        width = early_feature_width(dec_sd)
        want = expected_early_width(arch)
        vit_widths = {cfg["embed_dim"]: name for name, cfg in VIT_CONFIGS.items()}
        if arch == "tiny_vit" and width in vit_widths:
            problems.append(
                f"the mask decoder of {_name(dec)} is a {vit_widths[width]} robust decoder: its first-layer AMFG "
                f"block reads {width}-channel early features of a ViT (block {VIT_CONFIGS[vit_widths[width]]['global_attn_indexes'][0]}), "
                f"but the image encoder of {_name(enc)} is LiteMedSAM's TinyViT"
                + (f", whose early features have {want} channels" if want else "")
                + ". A ViT robust decoder cannot run on TinyViT: use a lite robust decoder trained for TinyViT, or "
                "a ViT encoder of the same width (e.g. medsam_vit_b for a ViT-B robust decoder)"
            )
        elif width is not None and want is not None and width != want:
            problems.append(
                f"the robust mask decoder of {_name(dec)} reads {width}-channel early encoder features "
                f"(mask_decoder.fourier_first_layer_features input), but the {arch} image encoder of {_name(enc)} "
                f"gives {want} channels: the decoder was trained for a different encoder size"
                + (f" ({vit_widths[width]})" if width in vit_widths else "")
            )
        elif width is None:
            problems.append(
                f"the robust mask decoder of {_name(dec)} has no mask_decoder.fourier_first_layer_features weights, "
                "so its early-feature width cannot be checked: the file is incomplete"
            )
    return problems


def _choose_preprocessing(enc: Source, dec: Source, override: str | None) -> tuple[str, str]:
    suggested, why, guessed = infer_preprocessing(enc)
    base = f"from the image encoder's source {_name(enc)}: {why}"
    seed = dec.checkpoint.decoder == "robust" and enc.checkpoint.architecture == "vit_b"
    if override is None:
        reason = base + "; the encoder's features were computed on images prepared that way"
        if seed and suggested != "sam":
            reason += "; " + SEED_NOTE
        if guessed:
            notice(
                f"the preprocessing of the fused model ({suggested!r}) is a guess: {why}. Pass "
                "preprocessing=... (robustmedsam fuse: --preprocessing sam|medsam|litemedsam) to set it"
            )
        return suggested, reason
    if override not in PREPROCESSING_CHOICES:
        raise CheckpointError(
            f"unknown preprocessing {override!r}; expected one of {', '.join(PREPROCESSING_CHOICES)}"
        )
    reason = f"set explicitly to {override!r}; the encoder's source suggests {suggested!r} ({base})"
    if seed and override == "sam" and suggested != "sam":
        reason += "; as in the seed RobustMedSAM eval.py, which used SAM preprocessing for its fused model"
    return override, reason


def _check_fits(state: Mapping, architecture: str, decoder_kind: str, where: str) -> None:
    """Refuse a fused state dict that does not fit the model it is for (a notice when that cannot be checked)."""
    try:
        expected = expected_shapes(architecture, decoder_kind)
    except ImportError as err:
        notice(f"{where} could not be checked against the {architecture} {decoder_kind} model: {err}")
        return
    check_state_dict_fits(state, expected, where, f"the {architecture} model with a {decoder_kind} decoder")


def _provenance(parts, state: Mapping, prompt_encoder_from: str) -> dict:
    """Where each part of a fusion came from: every source once, with its roles, parts and tensor count."""
    sources = []
    roles: dict[int, list[str]] = {}
    for part, source, role in parts:
        roles.setdefault(id(source), [])
        if role not in roles[id(source)]:
            roles[id(source)].append(role)
    seen = set()
    for part, source, role in parts:
        if id(source) in seen:
            continue
        seen.add(id(source))
        taken = [p for p, s, _ in parts if s is source]
        entry = source.provenance()
        entry.update(
            role="+".join(roles[id(source)]),
            parts=taken,
            prefixes=[p + "." for p in taken],
            tensors=sum(1 for key in state if key.split(".", 1)[0] in taken),
        )
        sources.append(entry)
    return {
        "method": "fuse_checkpoints",
        "sources": sources,
        "tensor_sources": {part + ".": role for part, _source, role in parts},
        "prompt_encoder_from": prompt_encoder_from,
    }


def fuse_checkpoints(
    encoder: str | os.PathLike | Mapping | Checkpoint | Source,
    decoder: str | os.PathLike | Mapping | Checkpoint | Source,
    prompt_encoder_from: str = "encoder",
    out: str | os.PathLike | None = None,
    preprocessing: str | None = None,
    *,
    extra: Mapping | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> tuple[dict, dict]:
    """Image encoder (+ prompt encoder) from ``encoder``, mask decoder from ``decoder``.

    ``encoder`` / ``decoder``: registry names, checkpoint files (any supported layout) or loaded dicts.
    ``prompt_encoder_from``: ``"encoder"`` (default, as RobustMedSAM does) or ``"decoder"``.
    ``out``: if given, the result is written there in the project format (atomically, after validation); never
    over a source checkpoint, and over another existing file only with ``overwrite=True``.
    Returns ``(state_dict, metadata)``.
    """
    if prompt_encoder_from not in ("encoder", "decoder"):
        raise CheckpointError(f"prompt_encoder_from must be 'encoder' or 'decoder', not {prompt_encoder_from!r}")
    path_inputs = [v for v in (encoder, decoder) if isinstance(v, (str, os.PathLike))]
    if out is not None:  # fail before reading (or downloading) anything
        check_output(out, inputs=path_inputs, overwrite=overwrite)
        check_destination(out)
    enc = resolve_source(encoder, cache_dir=cache_dir, progress=progress)
    same = not isinstance(decoder, (Mapping, Checkpoint, Source)) and not isinstance(encoder, (Mapping, Checkpoint, Source)) \
        and os.fspath(decoder) == os.fspath(encoder)
    dec = enc if same else resolve_source(decoder, cache_dir=cache_dir, progress=progress)
    prm = enc if prompt_encoder_from == "encoder" else dec

    problems = _validate(enc, prm, dec)
    if problems:
        raise CheckpointError(
            f"cannot fuse the image encoder of {_name(enc)} with the mask decoder of {_name(dec)}:\n  - "
            + "\n  - ".join(problems)
        )

    architecture = enc.checkpoint.architecture
    decoder_kind = dec.checkpoint.decoder
    parts = (("image_encoder", enc, "encoder"), ("prompt_encoder", prm, prompt_encoder_from), ("mask_decoder", dec, "decoder"))
    state: dict = {}
    for part, source, _role in parts:
        state.update(source.checkpoint.part(part))

    where = f"the fusion of {_name(enc)} (encoder) and {_name(dec)} (decoder)"
    _check_fits(state, architecture, decoder_kind, where)

    prep, reason = _choose_preprocessing(enc, dec, preprocessing)
    # Prompts are interpreted by the prompt encoder and the decoder: if either was trained with boxes
    # only, points alone are not promised to work.
    box_sources = [src for src in {id(prm): prm, id(dec): dec}.values() if infer_box_primary(src, infer_preprocessing(src)[0])]
    box_primary = bool(box_sources)

    provenance = _provenance(parts, state, prompt_encoder_from)
    box_reason = (
        "trained with boxes only: " + ", ".join(_name(s) for s in box_sources)
        if box_sources
        else "neither the prompt encoder's nor the decoder's source is box-only"
    )
    metadata = make_metadata(
        architecture=architecture,
        decoder=decoder_kind,
        preprocessing=prep,
        preprocessing_reason=reason,
        box_primary=box_primary,
        box_primary_reason=box_reason,
        provenance=provenance,
        extra=extra,
        description=f"image encoder from {_name(enc)}, prompt encoder from {_name(prm)}, mask decoder from {_name(dec)}",
    )
    if out is not None:
        # a registry name resolves to a file only now: the encoder's or decoder's file is never written over
        check_output(out, inputs=[s.path for s in (enc, dec)], overwrite=overwrite)
        save_checkpoint(Path(out), state, metadata)
    return state, metadata
