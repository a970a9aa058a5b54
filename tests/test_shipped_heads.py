"""The shipped heads: a short run of their recipe loads under the same registry name, the shipped files match their
manifest, their licence and provenance are shown, and the empty-mask fallback answers where a head is empty."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from napari_robustmedsam import heads
from napari_robustmedsam.checkpoints import load_model
from napari_robustmedsam.checkpoints.head_delta import save_head_delta
from napari_robustmedsam.checkpoints.loading import base_state
from napari_robustmedsam.checkpoints.project_format import make_metadata
from napari_robustmedsam.checkpoints.safe_load import file_sha256
from napari_robustmedsam.engine.predictor import Predictor
from napari_robustmedsam.errors import CheckpointError
from napari_robustmedsam.models import registry
from training import ship_heads

SHIPPED = tuple(heads.manifest())  # the heads this package ships (pge-lite-fast can be built, see docs/models.md)


def _tiny_medseg(shared_data, dst, per_dataset=3, datasets=("dsb2018_nuclei", "hc18_fetal_head_us")):
    src = shared_data / "medseg"
    for name in datasets:
        for kind in ("images", "masks"):
            (dst / name / kind).mkdir(parents=True)
        for image in sorted((src / name / "images").iterdir())[:per_dataset]:
            shutil.copy(image, dst / name / "images" / image.name)
            shutil.copy(src / name / "masks" / image.name, dst / name / "masks" / image.name)
    shutil.copy(src / "MANIFEST.json", dst / "MANIFEST.json")
    return dst


def _use_heads_dir(monkeypatch, folder):
    monkeypatch.setattr(heads, "HEADS_DIR", folder)
    monkeypatch.setattr(heads, "MANIFEST_PATH", folder / "MANIFEST.json")
    monkeypatch.setattr(heads, "LICENCE_PATH", folder / "LICENSE-WEIGHTS.md")
    heads.manifest.cache_clear()
    for name in heads.manifest():
        monkeypatch.setitem(registry.MODELS, name, registry._shipped(name, *registry.SHIPPED_HEADS[name]))


def test_a_short_run_of_the_recipe_loads_under_its_registry_name(shared_data, tmp_path, monkeypatch):
    data = _tiny_medseg(shared_data, tmp_path / "data")
    out, installed = tmp_path / "ship", tmp_path / "heads"
    monkeypatch.setattr(ship_heads, "HEADS_DIR", installed)
    args = ["robust-lite-permissive", "--data", str(data), "--out", str(out), "--epochs", "1", "--time-budget", "0.3",
            "--threads", "1", "--no-evaluate", "--install"]
    original_install = ship_heads.install
    monkeypatch.setattr(ship_heads, "install", lambda head, shipped, entry: original_install(head, shipped, entry, installed))
    assert ship_heads.main(args) == 0
    try:
        _use_heads_dir(monkeypatch, installed)
        entry = heads.entry("robust-lite-permissive")
        shipped = installed / entry["file"]
        assert entry["sha256"] == file_sha256(shipped)
        assert entry["command"] == "python -m training.ship_heads " + " ".join(args)
        assert entry["fit_command"].startswith("python -m training.fit ") and "--datasets dsb2018_nuclei,hc18_fetal_head_us" in entry["fit_command"]
        assert [d["dataset"] for d in entry["training_data"]] == ["dsb2018_nuclei", "hc18_fetal_head_us"]
        assert "CC BY 4.0" in entry["licence"] and "CC BY 4.0" in (installed / "LICENSE-WEIGHTS.md").read_text()
        loaded = load_model("robust-lite-permissive", device="cpu")
        assert loaded.decoder == "robust" and loaded.model.empty_mask_fallback is not None
        assert loaded.sha256 == entry["sha256"]
        # the delta holds what training changed, nothing of the frozen encoder
        stored = torch.load(shipped, weights_only=True)["state_dict"]
        assert stored and not any(k.startswith("image_encoder.") for k in stored)
        # a damaged file is refused by its recorded hash
        shipped.write_bytes(shipped.read_bytes()[:-10] + b"0123456789")
        with pytest.raises(CheckpointError, match="damaged"):
            load_model("robust-lite-permissive", device="cpu")
    finally:
        heads.manifest.cache_clear()


@pytest.mark.parametrize("name", SHIPPED)
def test_each_shipped_head_matches_its_manifest_entry(name):
    entry = heads.entry(name)
    assert entry, f"{name} is not in {heads.MANIFEST_PATH}"
    path = heads.HEADS_DIR / entry["file"]
    assert file_sha256(path) == entry["sha256"] and path.stat().st_size == entry["size_bytes"]
    assert entry["command"].startswith(f"python -m training.ship_heads {name}")
    assert entry["fit_command"].startswith("python -m training.fit ")
    assert entry["licence"] and entry["training_data"] and re.match(r"\d{4}-\d\d-\d\dT", entry["created_utc"])
    assert entry["heldout"], "the held-out figures are recorded"
    assert registry.MODELS[name].known_hash == f"sha256:{entry['sha256']}"
    assert name in heads.LICENCE_PATH.read_text()


def test_the_package_ships_the_default_head_and_its_permissive_variant():
    assert {"robust-lite", "robust-lite-permissive"} <= set(SHIPPED) <= set(registry.SHIPPED_HEADS)


def test_the_shipped_files_stay_small():
    total = sum((heads.HEADS_DIR / heads.entry(name)["file"]).stat().st_size for name in SHIPPED)
    assert total <= 40 * 2**20


def test_the_shipped_default_head_loads_offline_and_segments(shared_data):
    loaded = load_model("robust-lite", device="cpu")
    assert loaded.model.empty_mask_fallback is not None and not loaded.box_primary
    image = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(
        sorted((shared_data / "medseg" / "ph2_dermoscopy" / "images").iterdir())[0]))
    predictor = Predictor.from_loaded(loaded)
    predictor.set_image(image)
    h, w = image.shape[:2]
    result = predictor.predict(points=np.array([[w / 2, h / 2]]), point_labels=np.array([1]))
    assert result.masks[0].sum() > 0


def test_info_prints_the_licence_and_provenance():
    out = subprocess.run([sys.executable, "-m", "napari_robustmedsam", "info", "robust-lite"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    entry = heads.entry("robust-lite")
    assert "licence: Research and non-commercial use" in out.stdout
    assert entry["command"] in out.stdout and "trained on:" in out.stdout and "ph2_dermoscopy" in out.stdout
    assert "held-out" in out.stdout


def _empty_head(tmp_path):
    """A head whose masks are always empty (its hypernetworks output zeros), stored as a delta."""
    reference, sha = base_state("litemedsam_robust")
    state = dict(reference)
    changed = [k for k in state if re.search(r"(hypernetworks_mlps\.\d+|robust_mlp)\.layers\.2\.", k)]
    for key in changed:
        state[key] = torch.zeros_like(state[key])
    meta_changed = len(changed)
    meta = make_metadata(architecture="tiny_vit", decoder="robust", preprocessing="litemedsam",
                         empty_mask_fallback="litemedsam")
    path = tmp_path / "empty.pt"
    stored = save_head_delta(path, state, meta, base="litemedsam_robust", reference=reference, base_sha256=sha, half=True)
    stored["changed"] = meta_changed
    return path, meta, state, stored


def test_a_delta_stores_only_what_changed_and_rebuilds_the_model(tmp_path):
    path, _meta, state, stored = _empty_head(tmp_path)
    # the changed layers only: the untrained robust parts start from one seed, so they match the base's
    assert stored["tensors"] == stored["changed"] == 10
    loaded = load_model(str(path), device="cpu")
    full = loaded.model.state_dict()
    stored_keys = set(torch.load(path, weights_only=True)["state_dict"])
    for key, value in state.items():
        expected = value.half().float() if key in stored_keys else value  # stored in half precision
        assert torch.equal(full[key].float(), expected.float()), key


def test_the_empty_mask_fallback_answers_with_the_base_model_and_says_so(tmp_path, litemedsam):
    path, meta, state, _ = _empty_head(tmp_path)
    image = np.zeros((120, 140), np.uint8)
    image[30:90, 40:100] = 200
    box = np.array([[35, 25, 105, 95]])
    head = Predictor.from_loaded(load_model(str(path), device="cpu"))
    head.set_image(image)
    result = head.predict(boxes=box)
    base = Predictor.from_loaded(litemedsam)
    base.set_image(image)
    expected = base.predict(boxes=box)
    assert result.fell_back.tolist() == [True] and expected.masks.sum() > 0
    assert np.array_equal(result.masks, expected.masks)
    # without the fallback the same head returns the empty mask
    no_fallback = {k: v for k, v in meta.items() if k != "empty_mask_fallback"}
    reference, sha = base_state("litemedsam_robust")
    save_head_delta(tmp_path / "plain.pt", state, no_fallback, base="litemedsam_robust", reference=reference,
                    base_sha256=sha, half=True)
    plain = Predictor.from_loaded(load_model(str(tmp_path / "plain.pt"), device="cpu"))
    plain.set_image(image)
    empty = plain.predict(boxes=box)
    assert empty.masks.sum() == 0 and empty.fell_back.tolist() == [False]


def test_a_delta_on_another_base_file_is_refused(tmp_path):
    path, *_ = _empty_head(tmp_path)
    obj = torch.load(path, weights_only=True)
    obj["metadata"]["delta_of"]["sha256"] = "0" * 64
    torch.save(obj, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="trained on a 'litemedsam_robust' file"):
        load_model(str(tmp_path / "other.pt"), device="cpu")


def test_the_model_panel_choices_say_when_to_use_each_model():
    for name in ("litemedsam", *SHIPPED):
        assert registry.MODELS[name].use
    assert json.loads(heads.MANIFEST_PATH.read_text())["heads"].keys() >= set(SHIPPED)


def test_the_robust_head_is_suggested_for_the_base_model_only_with_its_measured_figures():
    from napari_robustmedsam.annotation.model_choice import robust_head_suggestion

    figures = heads.entry("robust-lite")["heldout"]["annotator"]
    text = robust_head_suggestion("litemedsam")
    assert f"box Dice {figures['robust-lite']['LQ-3']['box']:.2f} vs {figures['litemedsam']['LQ-3']['box']:.2f}" in text
    assert robust_head_suggestion(None) == text  # nothing loaded yet: the default will be LiteMedSAM
    assert robust_head_suggestion("robust-lite") == "" and robust_head_suggestion("pge-lite-fast") == ""


def test_the_annotator_says_when_the_fallback_answered(tmp_path):
    from napari_robustmedsam.annotation.prompt_decoding import segment_slice
    from napari_robustmedsam.annotation.session import SlicePrompts

    path, *_ = _empty_head(tmp_path)
    image = np.zeros((120, 140), np.uint8)
    image[30:90, 40:100] = 200
    head = Predictor.from_loaded(load_model(str(path), device="cpu"))
    embedding = head.compute_embedding(image)
    prompts = SlicePrompts(np.zeros((0, 2)), np.zeros(0, int), np.array([35.0, 25, 105, 95]), "user")
    result = segment_slice(head, embedding, prompts, model_name="empty-head")
    assert result.mask.any() and "empty-head returned an empty mask" in result.hint and "LiteMedSAM" in result.hint


def _measurements(folder, sha_by_label, dice_by_label):
    """A minimal training.evaluate --out folder: runs.jsonl with the models' sha256 and one row per prompt."""
    import pandas as pd

    folder.mkdir(parents=True)
    (folder / "runs.jsonl").write_text(json.dumps({
        "command": "python -m training.evaluate --policy annotator", "click_policy": "zoom=on",
        "config": {"focus_crop": True}, "models": [{"label": k, "sha256": v} for k, v in sha_by_label.items()]}) + "\n")
    rows = []
    for label, dice in dice_by_label.items():
        for condition in ("clean", "LQ-3"):
            for prompt, step in (("box", 0), ("points3", 0), ("iter_box", 0), ("iter_box", 5)):
                rows.append(dict(model=label, dataset="d1", condition=condition, prompt=prompt, step=step,
                                 dice=dice + 0.01 * step, pred_px=10))
    pd.DataFrame(rows).to_csv(folder / "measurements.csv", index=False)


def test_refreshing_the_figures_replaces_one_policy_of_the_installed_head_only(tmp_path):
    """After the annotator's defaults change, ``--figures-from`` puts a new evaluation's figures into the manifest
    (the other policy, the file and its hash stay); an evaluation of another file than the shipped one is refused."""
    from napari_robustmedsam.errors import UserFacingError

    head = ship_heads.HEADS["robust-lite"]
    old = {"sha256": "a" * 64, "file": head.filename, "licence": "L", "training_data": [], "command": "c",
           "created_utc": "t", "heldout": {"annotator": {"litemedsam": {}}, "papers": {"kept": True}}}
    (tmp_path / "MANIFEST.json").write_text(json.dumps({"heads": {"robust-lite": old}}))
    good = tmp_path / "eval"
    _measurements(good, {"litemedsam": "b" * 64, "robust-lite": "a" * 64, "pge-lite-fast": "c" * 64},
                  {"litemedsam": 0.5, "robust-lite": 0.6, "pge-lite-fast": 0.7})
    figures = ship_heads.refresh_figures(head, good, "annotator", "python -m training.ship_heads x", tmp_path)
    entry = json.loads((tmp_path / "MANIFEST.json").read_text())["heads"]["robust-lite"]
    assert set(entry["heldout"]["annotator"]) == {"litemedsam", "robust-lite"} == set(figures)
    assert entry["heldout"]["annotator"]["robust-lite"]["LQ-3"]["box"] == pytest.approx(0.6)
    assert entry["heldout"]["annotator"]["robust-lite"]["LQ-3"]["clicks5"] == pytest.approx(0.65)
    assert entry["heldout"]["papers"] == {"kept": True} and entry["sha256"] == "a" * 64
    assert entry["heldout_sources"]["annotator"]["click_policy"] == "zoom=on"
    assert (tmp_path / "LICENSE-WEIGHTS.md").is_file()
    other = tmp_path / "other"
    _measurements(other, {"litemedsam": "b" * 64, "robust-lite": "d" * 64}, {"litemedsam": 0.5, "robust-lite": 0.9})
    with pytest.raises(UserFacingError, match="did not measure the shipped robust-lite"):
        ship_heads.refresh_figures(head, other, "annotator", "x", tmp_path)
    assert json.loads((tmp_path / "MANIFEST.json").read_text())["heads"]["robust-lite"] == entry


def test_zoom_on_small_objects_is_off_by_default_only_for_the_head_that_measured_worse_with_it():
    """docs/results/focus-crop/heads.md: on the validation images the crop lowered pge-lite-fast's Dice by up to
    0.084 and raised the robust heads'; the annotator and ``training.evaluate --policy annotator`` follow this."""
    from napari_robustmedsam.annotation.prompt_decoding import DEFAULT_ZOOM_SMALL_OBJECTS, zoom_default

    assert zoom_default("pge-lite-fast") is False and zoom_default("pge_lite_fast") is False
    for name in ("litemedsam", "robust-lite", "robust-lite-permissive"):
        assert zoom_default(name) is DEFAULT_ZOOM_SMALL_OBJECTS


def test_the_permissive_head_keeps_the_epochs_it_was_measured_with():
    from argparse import Namespace

    from pathlib import Path

    from training.ship_heads import HEADS, fit_command

    plain = Namespace(time_budget=None, epochs=None, threads=None)
    assert fit_command(HEADS["robust-lite-permissive"], Path("runs/ship"), plain)[-2:] == ["--epochs", "6"]
    assert "--epochs" not in fit_command(HEADS["robust-lite"], Path("runs/ship"), plain)
    override = Namespace(time_budget=None, epochs=1, threads=None)
    assert fit_command(HEADS["robust-lite-permissive"], Path("runs/ship"), override)[-2:] == ["--epochs", "1"]
