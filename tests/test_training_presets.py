"""Training settings declared once (training/finetune/config.py, options.py, presets.py): the command line,
the presets, the widget's recipe and the resume fingerprint all come from the fields."""

from __future__ import annotations

import dataclasses

import pytest

from training.finetune.config import TrainConfig
from training.finetune.data import TrainingError
from training.finetune.losses import LossWeights
from training.finetune.options import NEVER, field_default
from training.finetune.presets import PRESETS, build_config, preset_config
from training.finetune.prompt_simulation import PromptConfig
from training.fit import build_parser, config_from_args


def _flagged_fields():
    for cls in (TrainConfig, PromptConfig, LossWeights):
        for f in dataclasses.fields(cls):
            if f.metadata.get("flag") or f.metadata.get("off_flag"):
                yield f


def test_every_option_help_shows_the_default_declared_with_its_field():
    helps = {a.dest: a.help for a in build_parser()._actions}
    for f in _flagged_fields():
        default = field_default(f)
        if isinstance(default, bool):
            continue
        shown = f.metadata.get("shown") or default
        assert helps[f.name].endswith(f"(default {shown})"), f.name


def test_no_option_means_the_fields_default():
    cfg, val_fraction = config_from_args(build_parser().parse_args(["--data", "x"]))
    assert cfg.to_dict() == TrainConfig().to_dict() and val_fraction == 0.2


def test_presets_name_real_settings_say_when_to_use_them_and_options_override_them():
    for name, recipe in PRESETS.items():
        assert recipe.use.endswith(".") and len(recipe.use.split(". ")) == 1, name  # one sentence
        build_config(recipe.settings)  # every name is a field, every value valid
    cfg, val_fraction = config_from_args(build_parser().parse_args(["--data", "x", "--preset", "robust-lite"]))
    assert (cfg.epochs, cfg.lr, cfg.time_budget_s, cfg.train_amfg, cfg.consistency_steps, val_fraction) == (
        10, 2e-4, 3600.0, False, "first", 0.1)
    # the PGE presets keep the run length they were measured with
    assert PRESETS["pge-lite-fast"].settings["epochs"] == 6
    cfg, _ = config_from_args(build_parser().parse_args(
        ["--data", "x", "--preset", "robust-lite", "--epochs", "2", "--train-amfg", "--points", "3"]))
    assert (cfg.epochs, cfg.train_amfg, cfg.prompts.point_counts) == (2, True, (3,))
    with pytest.raises(TrainingError, match="unknown training settings: epoch"):
        build_config({"epoch": 3})


def test_the_widget_recipe_is_the_quick_preset():
    cfg = preset_config("quick", epochs=1)
    assert (cfg.batch_size, cfg.prompts.n_steps, cfg.train_amfg, cfg.progress_bar, cfg.epochs) == (1, 2, False, False, 1)
    assert cfg.model == "litemedsam_robust" and cfg.weights.feature == LossWeights().feature


def test_the_pge_head_starts_from_litemedsam_without_consistency_terms():
    cfg = build_config({"head": "pge"})
    assert cfg.model == "litemedsam" and (cfg.weights.feature, cfg.weights.token) == (0.0, 0.0)


def test_one_clicker_option_in_both_command_lines():
    parse = build_parser().parse_args
    assert config_from_args(parse(["--data", "x", "--click-strategy", "micro_sam"]))[0].prompts.click_mode == "micro_sam"
    assert config_from_args(parse(["--data", "x", "--clicks", "micro_sam"]))[0].prompts.click_mode == "micro_sam"
    from training.evaluate import build_parser as evaluate_parser

    assert any("--click-strategy" in a.option_strings for a in evaluate_parser()._actions)


def test_settings_that_may_change_on_resume_stay_out_of_the_fingerprint():
    base = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        if f.metadata.get("fingerprint") == NEVER:
            value = {bool: lambda v: not v, int: lambda v: v + 1, float: lambda v: v * 2 + 1, str: lambda v: v + "x",
                     type(None): lambda v: 7}[type(field_default(f))](field_default(f))
            assert dataclasses.replace(base, **{f.name: value}).fingerprint() == base.fingerprint(), f.name
    assert dataclasses.replace(base, batch_size=3).fingerprint() != base.fingerprint()


def test_the_loop_names_no_head_and_each_head_brings_its_parts():
    """The heads (training/finetune/heads.py) are the trainer's extension point: the loop and the run's files
    never branch on a head's name."""
    from pathlib import Path

    from training.finetune import heads

    root = Path(heads.__file__).parent
    for module in ("trainer.py", "run_io.py", "validation.py", "step_tools.py"):
        text = (root / module).read_text()
        assert '"pge"' not in text and '"robust"' not in text and "cfg.head ==" not in text, module
    assert set(heads.HEADS) == {"robust", "pge"}
    assert heads.head_for("pge").base_model == "litemedsam" and not heads.head_for("pge").consistency_terms
    with pytest.raises(TrainingError, match="unknown head"):
        heads.head_for("unet")
