"""Fault injection, image reading: a file that is not what its name says, a truncated file, an empty file, an
image too large for the memory - every one is the project's one-line ImageInputError (exit 2 in the CLI), never
a decoder's traceback. Large images within the memory bound are read, beyond PIL's fixed pixel cap."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from faults_helpers import one_error_line, write_png

from napari_robustmedsam.cli import main
from napari_robustmedsam.errors import ImageInputError
from napari_robustmedsam.io import read_image
from napari_robustmedsam.io import images as images_module

pytestmark = pytest.mark.faults


@pytest.mark.parametrize("name", ["t.png", "t.jpg", "t.jpeg", "t.bmp", "t.tif", "t.npy", "t.nii.gz", "t.nrrd", "t.mha"])
def test_a_text_file_with_an_image_name_is_a_one_line_error(name, tmp_path):
    path = tmp_path / name
    path.write_text("this is not an image\n" * 3)
    with pytest.raises(ImageInputError, match="cannot read") as info:
        read_image(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("cut", [8, 12, 20, 33, 40, "half"])
def test_a_truncated_png_is_a_one_line_error(cut, tmp_path):
    full = write_png(tmp_path / "full.png", size=96).read_bytes()
    n = len(full) // 2 if cut == "half" else cut
    path = tmp_path / "cut.png"
    path.write_bytes(full[:n])
    with pytest.raises(ImageInputError, match="cannot read"):
        read_image(path)


def test_an_empty_file_is_a_one_line_error(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ImageInputError, match="empty"):
        read_image(path)


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header announces width x height gray pixels, with a few bytes of data (a decompression bomb's
    header: PIL refuses it from the header alone)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
                     + chunk(b"IEND", b""))
    return path


def test_a_huge_png_beyond_the_memory_is_refused_naming_its_size(tmp_path, monkeypatch):
    path = _png_header_only(tmp_path / "bomb.png", 20000, 20000)
    monkeypatch.setattr(images_module, "available_memory", lambda: 512 * 1024**2)
    with pytest.raises(ImageInputError, match=r"20000 x 20000 \(400,000,000 pixels") as info:
        read_image(path)
    assert "memory" in str(info.value)


def test_a_huge_png_within_the_memory_is_not_refused_by_pils_pixel_cap(tmp_path):
    # 20000 x 20000 fits this machine's memory: the file is then decoded (and found truncated), where PIL alone
    # raises DecompressionBombError from the header.
    path = _png_header_only(tmp_path / "bomb.png", 20000, 20000)
    with pytest.raises(ImageInputError) as info:
        read_image(path)
    assert "DecompressionBomb" not in str(info.value)


def test_pils_pixel_cap_does_not_apply_and_is_restored(tmp_path, monkeypatch):
    from PIL import Image

    path = write_png(tmp_path / "big.png", size=64)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # stands for PIL's 89 M pixel cap
    assert read_image(path).shape == (64, 64)
    assert Image.MAX_IMAGE_PIXELS == 1000


def test_the_pixel_limit_can_be_set_and_is_named(tmp_path, monkeypatch):
    path = write_png(tmp_path / "a.png", size=64)
    monkeypatch.setenv("ROBUSTMEDSAM_MAX_IMAGE_PIXELS", "1000")
    with pytest.raises(ImageInputError, match="4,096 pixels.*1,000 pixels"):
        read_image(path)


def test_a_large_npy_beyond_the_memory_is_refused_before_reading(tmp_path, monkeypatch):
    path = tmp_path / "big.npy"
    np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(4000, 4000)).flush()
    monkeypatch.setattr(images_module, "available_memory", lambda: 16 * 1024**2)
    with pytest.raises(ImageInputError, match="4000 x 4000"):
        read_image(path)


@pytest.mark.parametrize("command", ["segment", "degrade", "embed"])
@pytest.mark.parametrize("fault", ["text", "truncated"])
def test_cli_commands_give_one_error_line_for_a_damaged_image(command, fault, tmp_path, capsys):
    path = tmp_path / "bad.png"
    if fault == "text":
        path.write_text("not an image")
    else:
        path.write_bytes(write_png(tmp_path / "ok.png").read_bytes()[:40])
    argv = {
        "segment": ["segment", str(path), "--box", "1", "1", "9", "9", "-o", str(tmp_path / "m.png")],
        "degrade": ["degrade", str(path), "--type", "gaussian_noise", "-o", str(tmp_path / "d.png")],
        "embed": ["embed", str(path), "--cache", str(tmp_path / "cache")],
    }[command]
    assert main(argv) == 2
    assert str(path) in one_error_line(capsys.readouterr().err, command)


@pytest.mark.parametrize("fault", ["text", "empty", "header-cut"])
def test_embed_names_a_damaged_file_of_a_folder_before_loading_the_model(fault, tmp_path, monkeypatch, capsys):
    import napari_robustmedsam.checkpoints as checkpoints

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the folder was checked")

    monkeypatch.setattr(checkpoints, "load_model", refuse)
    folder = tmp_path / "series"
    folder.mkdir()
    write_png(folder / "a.png")
    bad = folder / "b.png"
    if fault == "text":
        bad.write_text("not an image")
    elif fault == "empty":
        bad.write_bytes(b"")
    else:
        bad.write_bytes((folder / "a.png").read_bytes()[:20])
    assert main(["embed", str(folder), "--cache", str(tmp_path / "cache")]) == 2
    assert str(bad) in one_error_line(capsys.readouterr().err, "embed")
