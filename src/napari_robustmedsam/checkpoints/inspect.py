"""``describe_checkpoint``: what a checkpoint is, without building a model.

Layout, architecture, decoder kind, preprocessing (and whether it was recorded or guessed), parameter
counts per module (and of the robust part of the decoder), provenance when the file carries it, sha256.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from ..errors import CheckpointError
from .layouts import Checkpoint, early_feature_width, expected_shapes
from .loading import (
    Source,
    check_state_dict_fits,
    count_parameters,
    infer_box_primary,
    infer_preprocessing,
    resolve_source,
    split_enhancer,
)

_MODEL_PARTS = ("image_encoder", "prompt_encoder", "mask_decoder")


def load_problem(src: Source) -> str | None:
    """Why a complete checkpoint would not load as a model (a missing, extra or mis-shaped tensor), else None.

    The same checks as :func:`~.loading.load_model` against the model's expected shapes; a partial file (a
    decoder alone, a fusion source) is not a model by itself and gives None.
    """
    ckpt = src.checkpoint
    layout = ckpt.layout
    if not layout.parts or not set(_MODEL_PARTS) <= set(layout.parts):
        return None
    where = str(src.path or src.label)
    try:
        state, _enhancer = split_enhancer(ckpt.state_dict, ckpt.metadata, where)
        expected = expected_shapes(layout.architecture, layout.decoder)
        if expected is not None:
            check_state_dict_fits(state, expected, where, f"the {layout.architecture} model with a {layout.decoder} decoder")
    except CheckpointError as err:
        return str(err)
    return None


def describe_checkpoint(
    source: str | os.PathLike | Mapping | Checkpoint | Source,
    *,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict:
    """A plain dict (JSON-serialisable) describing a checkpoint file, registry model or loaded dict."""
    src = resolve_source(source, cache_dir=cache_dir, progress=progress)
    ckpt = src.checkpoint
    layout = ckpt.layout
    state = ckpt.state_dict
    tensors = {part: 0 for part in ("image_encoder", "prompt_encoder", "mask_decoder")}
    dtypes: dict[str, int] = {}
    for key, value in state.items():
        part = key.split(".", 1)[0]
        tensors[part] = tensors.get(part, 0) + 1
        name = str(value.dtype).replace("torch.", "")
        dtypes[name] = dtypes.get(name, 0) + 1
    info: dict = {
        "source": src.label,
        "path": str(src.path) if src.path else None,
        "registry_name": src.spec.name if src.spec else None,
        "registry_match": src.spec_match or None,
        "sha256": src.sha256,
        "size_bytes": src.size_bytes,
        "layout": layout.name,
        "layout_description": layout.description,
        "container": layout.container_key,
        "stripped_prefix": layout.stripped_prefix or None,
        "ignored_entries": list(layout.ignored),
        "parts": list(layout.parts),
        "architecture": layout.architecture,
        "decoder": layout.decoder,
        "early_feature_width": early_feature_width(state) if layout.decoder == "robust" else None,
        "parameters": count_parameters(state),
        "tensors": tensors,
        "dtypes": dtypes,
        "notices": list(layout.notices),
        "load_problem": load_problem(src),
    }
    if layout.parts and "image_encoder" in layout.parts:
        prep, reason, guessed = infer_preprocessing(src)
        info.update(
            preprocessing=prep,
            preprocessing_reason=reason,
            preprocessing_guessed=guessed,
            box_primary=infer_box_primary(src, prep),
        )
    else:
        info.update(preprocessing=None, preprocessing_reason="no image encoder", preprocessing_guessed=False,
                    box_primary=None)
    metadata = dict(ckpt.metadata)
    head = metadata.get("head") if isinstance(metadata.get("head"), Mapping) else None
    info["head"] = "pge" if head and head.get("kind") == "pge" else ("robust" if layout.decoder == "robust" else "none")
    info["head_config"] = dict(head.get("config") or {}) if head else None
    info["provenance"] = metadata.pop("provenance", None)
    info["metadata"] = metadata
    info.update(registry_terms(src))
    if not info.get("licence"):
        from ..models.registry import source_licences

        info["source_licences"] = [{"role": r, "model": n, "licence": lic} for r, n, lic in source_licences(info["provenance"])]
    return info


def registry_terms(src: Source) -> dict:
    """What the registry says of a model: when to use it, its licence, and for a shipped head its manifest entry."""
    if src.spec is None:
        return {}
    from .. import heads

    terms = {"use": src.spec.use or None, "licence": src.spec.license or None}
    if src.spec.box_check is not None:
        terms["box_check"] = src.spec.box_check
    entry = heads.entry(src.spec.name)
    if entry:
        terms.update(shipped=entry, licence_file=str(heads.LICENCE_PATH))
    return terms


def _heldout_line(entry: Mapping) -> list[str]:
    """One line per policy: the head's held-out figures next to LiteMedSAM's (mean of datasets)."""
    lines = []
    for policy, models in sorted((entry.get("heldout") or {}).items()):
        head = models.get(entry.get("name", ""), {}) or next(
            (v for k, v in models.items() if k not in ("litemedsam",) and not k.endswith("-no-fallback")), {})
        base = models.get("litemedsam", {})
        for condition in ("LQ-3", "clean"):
            if condition in head:
                h, b = head[condition], base.get(condition, {})
                lines.append(
                    f"    {condition}, {policy} clicks: box {h['box']:.3f} (LiteMedSAM {b.get('box', float('nan')):.3f}), "
                    f"3 points {h['points3']:.3f} ({b.get('points3', float('nan')):.3f}), 5 clicks {h['clicks5']:.3f} "
                    f"({b.get('clicks5', float('nan')):.3f}), empty box masks {h['box_empty']}/{h['box_prompts']} "
                    f"({b.get('box_empty', '?')})")
    return lines


def _millions(value: int) -> str:
    return f"{value / 1e6:.2f} M" if value >= 10_000 else str(value)


def _provenance_lines(sources) -> list[str]:
    """The provenance part of :func:`render_description`: each source a fused checkpoint was made from."""
    lines = ["  provenance:"]
    for src in sources:
        name = src.get("filename") or src.get("given")
        if src.get("registry_name"):
            how = src.get("registry_match")
            name = f"registry model {src['registry_name']}" if how == "name" else (
                f"{name} (registry model {src['registry_name']}, matched by {how})"
            )
        lines.append(
            f"    {src.get('role', '?')}: {name} [{', '.join(src.get('prefixes', []))}] layout {src.get('layout')}"
        )
        lines.append(f"      sha256 {src.get('sha256') or '-'}, {src.get('size_bytes') or '-'} bytes")
    return lines


def render_description(info: Mapping) -> str:
    """Human-readable text of :func:`describe_checkpoint`'s result."""
    lines = [f"checkpoint: {info.get('path') or info.get('source')}"]
    if info.get("registry_name"):
        lines.append(f"  registry model: {info['registry_name']} (matched by {info.get('registry_match')})")
    if info.get("use"):
        lines.append(f"  use it for: {info['use']}")
    if info.get("licence"):
        lines.append(f"  licence: {info['licence']}")
    lines += [f"  licence of its {p['role']} ({p['model']}): {p['licence']}" for p in info.get("source_licences") or []]
    if info.get("box_check") is not None:
        lines.append(f"  box check: on, margin {info['box_check']:g} (for a box alone, LiteMedSAM's mask where it scores "
                     "its own mask higher by more than that; docs/results/shipped-heads/box-check.md)")
    shipped = info.get("shipped")
    if shipped:
        lines.append(f"  licence file: {info.get('licence_file')}")
        lines.append("  trained on: " + ", ".join(
            f"{d['dataset']} ({d['train_images']} images; terms: {d['licence']})" for d in shipped.get("training_data", [])))
        lines.append(f"  built by: {shipped.get('command')} ({shipped.get('created_utc')})")
        lines.append(f"  training run: {shipped.get('fit_command')}")
        held = _heldout_line({**shipped, "name": info.get("registry_name")})
        if held:
            lines.append("  held-out figures (development data, mean of datasets):")
            lines += held
    if info.get("size_bytes") is not None:
        lines.append(f"  size: {info['size_bytes']} bytes")
    if info.get("sha256"):
        lines.append(f"  sha256: {info['sha256']}")
    layout = f"  layout: {info['layout']} - {info['layout_description']}"
    lines.append(layout)
    if info.get("stripped_prefix"):
        lines.append(f"  key prefix removed: {info['stripped_prefix']!r}")
    if info.get("ignored_entries"):
        lines.append(f"  other entries (not weights, ignored): {', '.join(info['ignored_entries'])}")
    lines.append(f"  architecture: {info.get('architecture') or '-'}")
    decoder = info.get("decoder") or "-"
    if info.get("early_feature_width"):
        decoder += f" (reads {info['early_feature_width']}-channel early encoder features)"
    lines.append(f"  decoder: {decoder}")
    head = info.get("head")
    if head == "pge":
        from ..models.pge_enhancer import EnhancerConfig

        cfg = info.get("head_config") or {}
        try:
            shape = EnhancerConfig.from_dict(cfg).summary()
        except (TypeError, ValueError):
            shape = f"{cfg.get('blocks_per_stage', '?')} EBlock(s) per stage"
        lines.append(f"  robust head: pge (PGE-SAM prompt-guided feature enhancer, {shape}; runs on every click)")
    elif head:
        lines.append(f"  robust head: {head}")
    if info.get("preprocessing"):
        lines.append(f"  preprocessing: {info['preprocessing']} ({info.get('preprocessing_reason')})")
        lines.append(f"  box-primary: {'yes (trained with boxes only)' if info.get('box_primary') else 'no'}")
    params = info.get("parameters", {})
    tensors = info.get("tensors", {})
    lines.append("  parameters:")
    for part in ("image_encoder", "prompt_encoder", "mask_decoder", "feature_enhancer"):
        if part == "feature_enhancer" and not params.get(part):
            continue
        lines.append(f"    {part:<16} {_millions(params.get(part, 0)):>10}  ({tensors.get(part, 0)} tensors)")
    if params.get("mask_decoder_robust"):
        lines.append(f"      of which robust {_millions(params['mask_decoder_robust']):>10}")
    lines.append(f"    {'total':<16} {_millions(params.get('total', 0)):>10}")
    if info.get("dtypes"):
        lines.append("  dtypes: " + ", ".join(f"{k} x{v}" for k, v in sorted(info["dtypes"].items())))
    meta = info.get("metadata") or {}
    for key in ("created_utc", "package_version", "description", "box_primary_reason"):
        if meta.get(key):
            lines.append(f"  {key.replace('_', ' ')}: {meta[key]}")
    if meta.get("extra"):
        lines.append(f"  extra: {meta['extra']}")
    provenance = info.get("provenance")
    if isinstance(provenance, Mapping) and provenance.get("sources"):
        lines += _provenance_lines(provenance["sources"])
    for text in info.get("notices", []):
        lines.append(f"  notice: {text}")
    if info.get("load_problem"):
        lines.append("  loads as a model: NO (see the error below)")
    return "\n".join(lines)
