"""The learned click refiner: its input, its file (safe, checked), its use in the click path, and its training."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from napari_robustmedsam.engine import learned_refinement as lr
from napari_robustmedsam.engine.click_refinement import RefinementSettings, click_window, refine_clicks
from napari_robustmedsam.errors import CheckpointError
from napari_robustmedsam.models.click_refiner import INPUT_CHANNELS, INPUT_SIZE, build_click_refiner
from test_click_refinement import _FakePredictor, dice, disk_scene


def _untrained_file(tmp_path, name="refiner.pt"):
    """A refiner whose own output is zero: it keeps the mask it is given."""
    net = build_click_refiner(width=4)
    with torch.no_grad():
        net.head.weight.zero_()
        net.head.bias.zero_()
    path = tmp_path / name
    torch.save(lr.refiner_state(net), path)
    return path


def test_window_inputs_carry_image_mask_disk_and_clicks():
    image, truth, model = disk_scene()
    (y0, y1, x0, x1), disk, _ = click_window(model, 64, 84, 1, RefinementSettings())
    x = lr.window_inputs(image[y0:y1, x0:x1], model[y0:y1, x0:x1], disk, [(64 - y0, 84 - x0, 1)], INPUT_SIZE)
    assert x.shape == (INPUT_CHANNELS, INPUT_SIZE, INPUT_SIZE) and x.dtype == np.float32
    assert abs(float(x[:3].mean())) < 0.2  # standardised over the window
    assert set(np.unique(np.round(x[3], 3))) <= {-1.0, 1.0} or (x[3].min() >= -1 and x[3].max() <= 1)
    assert x[4].max() == 1.0 and x[5].sum() > 0 and x[6].sum() == 0  # one positive click, no negative one


def test_a_refiner_that_learned_nothing_keeps_the_mask_but_the_click_is_honoured(tmp_path, monkeypatch):
    monkeypatch.setenv("ROBUSTMEDSAM_CLICK_REFINER", str(_untrained_file(tmp_path)))
    image, truth, model = disk_scene()
    out = refine_clicks(image, model, [(84, 64)], [1], 1, "learned")
    assert out[64, 84]  # the click's pixel always takes its label
    assert (out ^ model).sum() <= 9  # and nothing else moves (the click's mark only)


def test_refiner_files_are_checked(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        lr.refiner_for(tmp_path / "missing.pt")
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="not a click refiner file"):
        lr.load_refiner(foreign)
    bad = tmp_path / "bad.pt"
    state = lr.refiner_state(build_click_refiner(width=4))
    state["width"] = 8
    torch.save(state, bad)
    with pytest.raises(CheckpointError, match="does not fit") as err:
        lr.load_refiner(bad)
    assert "\n" not in str(err.value)


def test_a_missing_refiner_falls_back_to_the_models_mask_with_a_notice(tmp_path, monkeypatch):
    from napari_robustmedsam.annotation.prompt_decoding import segment_slice
    from napari_robustmedsam.annotation.session import SlicePrompts

    monkeypatch.setenv("ROBUSTMEDSAM_CLICK_REFINER", str(tmp_path / "gone.pt"))
    image, _, _ = disk_scene()
    fake = _FakePredictor(128)
    emb = type("Emb", (), {"frame": fake.frame})()
    box = np.array([30.0, 30.0, 98.0, 98.0])
    first = segment_slice(fake, emb, SlicePrompts(box=box), image=image)
    click = SlicePrompts(points=np.array([[84.0, 64.0]]), labels=np.array([1]), box=box)
    out = segment_slice(fake, emb, click, previous_prompts=first.prompts, previous_logits=first.logits,
                        previous_mask=first.mask, image=image, click_refinement="learned")
    assert np.array_equal(out.mask, first.mask)
    assert "click refinement skipped" in out.hint and "not found" in out.hint


def test_the_shipped_refiner_loads_and_honours_clicks():
    refiner = lr.refiner_for()
    assert refiner.size == INPUT_SIZE
    image, truth, model = disk_scene()
    out = refine_clicks(image, model, [(84, 64)], [1], 1, "learned-directed")
    assert out[64, 84] and not (model & ~out).any()  # directed: a positive click only adds
    assert dice(out, truth) >= dice(model, truth)
    provenance = json.loads(lr.SHIPPED_REFINER.with_suffix(".json").read_text())
    from napari_robustmedsam.checkpoints.safe_load import file_sha256

    assert provenance["sha256"] == file_sha256(lr.SHIPPED_REFINER)
    assert provenance["command"].startswith("python -m training.fit_refiner ") and "Research" in provenance["licence"]


def test_simulated_clicks_sit_on_errors_with_the_ground_truths_label():
    from training.refiner_samples import SCENARIOS, error_click, simulate_shown

    _, truth, _ = disk_scene()
    rng = np.random.default_rng(0)
    for k in range(30):
        shown = simulate_shown(truth, rng, SCENARIOS[k % 3])
        click = error_click(shown, truth)
        if click is not None:
            row, col, label = click
            assert shown[row, col] != truth[row, col] and label == int(truth[row, col])
    assert error_click(truth, truth) is None


def test_fit_refiner_trains_resumes_and_writes_a_loadable_file(tmp_path, shared_data):
    from test_shipped_heads import _tiny_medseg
    from training import fit_refiner

    data = _tiny_medseg(shared_data, tmp_path / "data", per_dataset=2)
    out = tmp_path / "run"
    args = ["--data", str(data), "--out", str(out), "--variants", "2", "--per-object", "2", "--batch", "16",
            "--threads", "1"]
    assert fit_refiner.main(args + ["--epochs", "1"]) == 0
    first = json.loads((out / "log.json").read_text())
    assert len(first["epochs"]) == 1 and first["samples"] > 0 and first["held_back"] > 0
    assert fit_refiner.main(args + ["--epochs", "2", "--resume"]) == 0
    log = json.loads((out / "log.json").read_text())
    assert [e["epoch"] for e in log["epochs"]] == [1, 2] and log["epochs"][0] == first["epochs"][0]
    refiner = lr.load_refiner(out / "best.pt")
    assert refiner.size == INPUT_SIZE and refiner.net.width == 16
    with pytest.raises(SystemExit, match="--width 16"):
        fit_refiner.main(args + ["--epochs", "3", "--resume", "--width", "8"])


def test_fit_refiner_trains_a_refiner_of_another_width(tmp_path, shared_data):
    from test_shipped_heads import _tiny_medseg
    from training import fit_refiner

    data = _tiny_medseg(shared_data, tmp_path / "data", per_dataset=1)
    out = tmp_path / "run"
    assert fit_refiner.main(["--data", str(data), "--out", str(out), "--variants", "1", "--per-object", "2",
                             "--batch", "16", "--threads", "1", "--epochs", "1", "--width", "8"]) == 0
    refiner = lr.load_refiner(out / "best.pt")
    assert refiner.net.width == 8 and refiner.net.enc1[0].out_channels == 8
