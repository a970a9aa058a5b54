"""End-to-end fine-tuning on tiny phantoms: checkpoints that load_model / Predictor use, exact resume, Ctrl-C,
NaN stop. Kept cheap: 96 px images, 1 object, 1 corrective click, frozen (skipped) AMFG blocks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from napari_robustmedsam.sample_data import mri_phantom
from training.finetune import PromptConfig, TrainConfig, Trainer, items_from_arrays, split_items


@pytest.fixture(scope="module")
def phantom_items():
    imgs, labs = [], []
    for s in range(3):
        img, lab = mri_phantom(96, seed=s)
        imgs.append(img)
        labs.append(lab)
    items = items_from_arrays(imgs, labs, names=[f"ph{s}" for s in range(3)], modality="mri")
    return split_items(items, 0.34, seed=0)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("features"))


def tiny_config(cache_dir: str, **kw) -> TrainConfig:
    base = dict(epochs=2, steps_per_epoch=2, batch_size=1, objects_per_image=1, variants=1, train_amfg=False,
                prompts=PromptConfig(n_steps=1, point_counts=(1, 3)), cache_dir=cache_dir, progress_bar=False,
                val_max_objects=1, seed=3)
    base.update(kw)
    return TrainConfig(**base)


def decoder_tensors(path: Path) -> dict:
    obj = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v for k, v in obj["state_dict"].items() if k.startswith("mask_decoder.")}


@pytest.fixture(scope="module")
def full_run(phantom_items, cache_dir, tmp_path_factory):
    train, val = phantom_items
    out = tmp_path_factory.mktemp("full")
    result = Trainer(tiny_config(cache_dir), out, train, val).run()
    return out, result


def test_fit_writes_checkpoints_that_the_predictor_uses(full_run, phantom_items):
    from napari_robustmedsam.checkpoints import load_model
    from napari_robustmedsam.engine.predictor import Predictor

    out, result = full_run
    assert result.stopped == "completed"
    for name in ("last.pth", "best.pth", "train_state.pt", "log.csv", "log.json", "training.png"):
        assert (out / name).is_file(), name
    assert [r["epoch"] for r in result.history] == [0, 1, 2]
    assert "val_dice_degraded_points3" in result.history[-1]
    loaded = load_model(out / "last.pth", device="cpu")
    assert loaded.decoder == "robust" and loaded.preprocessing == "litemedsam"
    training = loaded.metadata["extra"]["training"]
    assert training["hyperparameters"]["weights"]["feature"] == 100.0
    assert loaded.metadata["provenance"]["base_model"]["sha256"]
    assert training["data"]["train"]["n_planes"] == 2
    item = phantom_items[1][0]
    pred = Predictor.from_loaded(loaded)
    pred.set_image(item.image)
    ys, xs = np.nonzero(item.labels == item.object_ids[0])
    res = pred.predict(boxes=[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    assert res.masks.shape == (1, *item.labels.shape) and res.masks.any()
    # the robust decoder changed, the frozen encoder did not
    base = load_model("litemedsam_robust", device="cpu").model.state_dict()
    tuned = loaded.model.state_dict()
    assert torch.equal(base["image_encoder.neck.0.weight"], tuned["image_encoder.neck.0.weight"])
    assert not torch.equal(base["mask_decoder.robust_mlp.layers.0.weight"], tuned["mask_decoder.robust_mlp.layers.0.weight"])
    assert torch.equal(base["mask_decoder.fourier_mask_features.downsample_layer.3.weight"],
                       tuned["mask_decoder.fourier_mask_features.downsample_layer.3.weight"])


def test_interrupt_and_resume_continue_exactly(full_run, phantom_items, cache_dir, tmp_path):
    """Ctrl-C after the first iteration (mid-epoch), resume to the end: same weights as the uninterrupted run."""
    train, val = phantom_items
    out_full, _ = full_run
    cfg = tiny_config(cache_dir)
    first = Trainer(cfg, tmp_path, train, val, on_step=lambda info: None)
    first.on_step = lambda info: first.request_stop("interrupted")  # what the SIGINT handler / cancel does
    result = first.run()
    assert result.stopped == "interrupted" and "--resume" in result.message
    assert first.global_step == 1
    second = Trainer(cfg, tmp_path, train, val)
    result = second.run(resume=True)
    assert result.stopped == "completed"
    assert second.global_step == 4
    a, b = decoder_tensors(out_full / "last.pth"), decoder_tensors(tmp_path / "last.pth")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # resuming a finished run with more epochs continues; other settings must match
    from training.finetune import TrainingError

    with pytest.raises(TrainingError, match="settings differ"):
        Trainer(tiny_config(cache_dir, objects_per_image=2), tmp_path, train, val).run(resume=True)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(phantom_items, cache_dir, tmp_path, monkeypatch):
    import training.finetune.robust_step as step_mod

    train, val = phantom_items
    real = step_mod.robust_loss
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        total, terms = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] > 2:  # the first iteration (2 predictions) is fine, then NaN
            total = total * float("nan")
        return total, terms

    monkeypatch.setattr(step_mod, "robust_loss", flaky)
    cfg = tiny_config(cache_dir, epochs=1, steps_per_epoch=3, save_every_steps=1)
    tr = Trainer(cfg, tmp_path, train, val)
    result = tr.run()
    assert result.stopped == "nan"
    assert "NaN" in result.message and "last good checkpoint" in result.message
    state = torch.load(tmp_path / "train_state.pt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 1  # saved after the good iteration, not after the NaN one
    from napari_robustmedsam.checkpoints import load_model

    loaded = load_model(tmp_path / "last.pth", device="cpu")
    assert all(torch.isfinite(v).all() for v in loaded.model.state_dict().values() if v.is_floating_point())
    assert "nan" in (tmp_path / "log.json").read_text()


@pytest.mark.slow
def test_svd_neck_option_trains_singular_values_and_saves_a_plain_checkpoint(phantom_items, cache_dir, tmp_path):
    from napari_robustmedsam.checkpoints import load_model

    train, val = phantom_items
    cfg = tiny_config(cache_dir, epochs=1, steps_per_epoch=1, svd_neck=True, prompts=PromptConfig(n_steps=0))
    result = Trainer(cfg, tmp_path, train, val).run()
    assert result.stopped == "completed"
    loaded = load_model(tmp_path / "last.pth", device="cpu")
    base = load_model("litemedsam_robust", device="cpu").model.state_dict()
    tuned = loaded.model.state_dict()
    assert set(base) == set(tuned)
    assert not torch.equal(base["image_encoder.neck.2.weight"], tuned["image_encoder.neck.2.weight"])
    assert torch.equal(base["image_encoder.layers.0.blocks.0.conv1.c.weight"],
                       tuned["image_encoder.layers.0.blocks.0.conv1.c.weight"])
    assert "singular values" in " ".join(loaded.metadata["provenance"]["trained"])


def test_fall_penalty_runs_in_the_robust_decoder_step(phantom_items, cache_dir, tmp_path):
    """--w-fall: the robust decoder's iterations charge each corrective click's drop in soft Dice and log it."""
    from training.finetune import LossWeights

    train, val = phantom_items
    cfg = tiny_config(cache_dir, epochs=1, prompts=PromptConfig(n_steps=2, point_counts=(1,), p_mask=1.0, click_guard="always"),
                      weights=LossWeights(fall=2.0))
    trainer = Trainer(cfg, tmp_path, train, val)
    assert trainer.run().stopped == "completed"
    assert trainer.step_log and all(np.isfinite(s["fall"]) and s["fall"] >= 0 for s in trainer.step_log)


def test_training_plot_without_a_validation_split_says_so_and_shows_the_fall_term(tmp_path, monkeypatch):
    """--val-fraction 0 leaves the validation panel empty: the plot says so instead of warning about a legend, and the
    fall penalty's term (--w-fall) is drawn with the other loss terms."""
    import warnings

    from matplotlib.figure import Figure

    from training.finetune.run_io import plot_history

    drawn = {}
    real_savefig = Figure.savefig

    def spy(fig, path, **kw):
        ax1, ax2 = fig.axes
        drawn["terms"] = [line.get_label() for line in ax1.get_lines()]
        drawn["texts"] = [t.get_text() for t in ax2.texts]
        return real_savefig(fig, path, **kw)

    monkeypatch.setattr(Figure, "savefig", spy)
    steps = [{"global_step": i, "loss": 1.0 / (i + 1), "dice": 0.5, "fall": 0.01 * (i % 2)} for i in range(6)]
    history = [{"epoch": 0}, {"epoch": 1}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plot_history(history, steps, tmp_path / "training.png")
    assert (tmp_path / "training.png").is_file()
    assert "fall (unweighted)" in drawn["terms"] and "dice (unweighted)" in drawn["terms"]
    assert drawn["texts"] == ["no validation split"]
