"""Data-parallel fine-tuning: ``torchrun --nproc_per_node=2 -m training.fit`` with gloo on the CPU (tiny run)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_phantoms(root: Path, n: int = 3) -> None:
    from PIL import Image

    from napari_robustmedsam.sample_data import mri_phantom

    for kind in ("images", "masks"):
        (root / "phantom" / kind).mkdir(parents=True, exist_ok=True)
    for k in range(n):
        img, lab = mri_phantom(80, seed=k)
        img8 = (255 * (img - img.min()) / max(float(np.ptp(img)), 1e-6)).astype(np.uint8)
        Image.fromarray(img8).save(root / "phantom" / "images" / f"p{k}.png")
        Image.fromarray(lab.astype(np.uint8)).save(root / "phantom" / "masks" / f"p{k}.png")


@pytest.mark.slow
def test_torchrun_two_cpu_processes(tmp_path):
    data = tmp_path / "data"
    _write_phantoms(data)
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "src")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "-m", "training.fit", "--data", str(data), "--out", str(out), "--cache", str(tmp_path / "cache"),
           "--epochs", "1", "--steps", "1", "--batch-size", "1", "--objects", "1", "--variants", "1",
           "--n-steps", "1", "--frozen-amfg", "--val-fraction", "0.34", "--min-object-px", "1", "--threads", "1",
           "--no-progress"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 processes (gloo)" in proc.stderr
    log = json.loads((out / "log.json").read_text())
    assert log["world_size"] == 2
    assert log["planes_seen"] == 2  # one image per process and iteration
    assert (out / "last.pth").is_file() and (out / "best.pth").is_file()
    from napari_robustmedsam.checkpoints import load_model

    loaded = load_model(out / "last.pth", device="cpu")
    assert loaded.metadata["extra"]["training"]["world_size"] == 2
    assert all(torch.isfinite(v).all() for v in loaded.model.state_dict().values() if v.is_floating_point())
