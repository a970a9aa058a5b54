"""Named training recipes (``python -m training.fit --preset NAME`` and the "Fine-tune on my labels" widget) and
the one function that turns settings into a :class:`~.config.TrainConfig`.

A preset names only the settings it changes, by their :class:`~.config.TrainConfig`, :class:`~.prompt_simulation.
PromptConfig` or :class:`~.losses.LossWeights` field name; every other setting keeps the default declared with its
field. Options given on the command line override the preset. The figures behind each recipe are in
docs/training.md and docs/benchmarks.md.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .config import TrainConfig
from .data import TrainingError
from .heads import head_for
from .losses import LossWeights
from .prompt_simulation import PromptConfig

#: the share of a run's images held out for validation when neither the preset nor the user says otherwise
VAL_FRACTION = 0.2



@dataclass(frozen=True)
class Preset:
    use: str  # one sentence: when to choose this recipe
    settings: dict = field(default_factory=dict)  # field name -> value
    val_fraction: float = VAL_FRACTION


_CPU_RUN = dict(epochs=6, batch_size=2, lr=2e-4, p_box=0.5, point_counts=(1, 3), variants=2, p_identity=0.2,
                time_budget_s=40 * 60.0)

PRESETS: dict[str, Preset] = {
    "robust-lite": Preset(
        "A robust decoder for LiteMedSAM trained on a CPU in under an hour: the benchmark recipe of "
        "benchmarks/train_lite.py (frozen AMFG blocks, consistency losses on the first prediction only).",
        # Ten epochs, not six: resumed past six, the run kept improving on its validation images
        # (docs/results/shipped-heads/longer-run.md); the budget lets ten finish with the features computed once.
        dict(_CPU_RUN, model="litemedsam_robust", objects_per_image=2, n_steps=3, p_mask=0.5, train_amfg=False,
             consistency_steps="first", epochs=10, time_budget_s=60 * 60.0), val_fraction=0.1),
    "pge-lite": Preset(
        "A PGE-SAM head (one EBlock per stage) for LiteMedSAM on the same data and budget as robust-lite, with five "
        "supervised interactions per sample (the first prompt and four corrections).",
        dict(_CPU_RUN, model="litemedsam", head="pge", enhancer_blocks=1, objects_per_image=1, n_steps=4,
             p_mask=1.0), val_fraction=0.1),
    "pge-lite-fast": Preset(
        "pge-lite on a coarser, narrower working grid (32 x 32, 96 channels, 1.05 M parameters) when each click must "
        "answer within the annotator's latency target on a CPU (docs/benchmarks.md, section 5b).",
        dict(_CPU_RUN, model="litemedsam", head="pge", enhancer_blocks=1, enhancer_work_stride=2, enhancer_width=96,
             enhancer_gate_channels=32, objects_per_image=1, n_steps=4, p_mask=1.0), val_fraction=0.1),
    "quick": Preset(
        "A first fine-tune from inside napari on a few labelled images: one image per iteration, two corrective "
        "clicks, frozen AMFG blocks; the Fine-tune tab's default.",
        dict(model="litemedsam_robust", epochs=3, batch_size=1, objects_per_image=2, variants=2, n_steps=2,
             train_amfg=False, progress_bar=False)),
}

_PROMPT_FIELDS = {f.name for f in dataclasses.fields(PromptConfig)}
_LOSS_FIELDS = {f.name for f in dataclasses.fields(LossWeights)}
_RUN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)} - {"prompts", "weights"}


def preset(name: str | None) -> Preset:
    """The preset called ``name`` (``None``: no preset, every field's default)."""
    if name is None:
        return Preset("every setting at its default")
    if name not in PRESETS:
        raise TrainingError(f"unknown preset {name!r}; valid: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


def build_config(settings: dict) -> TrainConfig:
    """A :class:`TrainConfig` from flat settings (field names of TrainConfig, PromptConfig and LossWeights).

    The two rules that tie settings together come from the head (:mod:`.heads`): without a model, the head's base
    model; a head without consistency terms trains with feature and token weights 0."""
    unknown = set(settings) - _PROMPT_FIELDS - _LOSS_FIELDS - _RUN_FIELDS
    if unknown:
        raise TrainingError(f"unknown training settings: {', '.join(sorted(unknown))}")
    run = {k: v for k, v in settings.items() if k in _RUN_FIELDS}
    loss = {k: v for k, v in settings.items() if k in _LOSS_FIELDS}
    head = head_for(run.get("head", "robust"))
    run.setdefault("model", head.base_model)
    if not head.consistency_terms:
        loss.update(feature=0.0, token=0.0)
    try:
        prompts = PromptConfig(**{k: v for k, v in settings.items() if k in _PROMPT_FIELDS})
    except ValueError as err:
        raise TrainingError(str(err)) from None
    return TrainConfig(weights=LossWeights(**loss), prompts=prompts, **run)


def preset_config(name: str | None, **overrides) -> TrainConfig:
    """The preset's settings with ``overrides`` (flat field names) on top."""
    return build_config({**preset(name).settings, **overrides})


def setting_help(name: str, preset_name: str | None = None) -> str:
    """One line of help for a setting (a TrainConfig, PromptConfig or LossWeights field): the help text declared
    with its field, its default, and the value ``preset_name`` gives it. The widget's tooltips come from here."""
    for cls in (TrainConfig, PromptConfig, LossWeights):
        for f in dataclasses.fields(cls):
            if f.name != name or not f.metadata.get("help"):
                continue
            text = f.metadata["help"]
            shown = f.metadata.get("shown")
            default = shown if shown is not None else (f.default if f.default is not dataclasses.MISSING else None)
            if default is not None:
                text += f" (default {default}"
                if preset_name is not None and name in preset(preset_name).settings:
                    text += f"; preset {preset_name}: {preset(preset_name).settings[name]}"
                text += ")"
            return text[:1].upper() + text[1:]
    raise KeyError(f"no training setting called {name!r}")
