"""The exported decoder: `robustmedsam segment` on a cached image decodes without torch and writes the torch path's
masks; a changed checkpoint or a broken graph falls back to torch."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO

from napari_robustmedsam.cli import main
from napari_robustmedsam.engine import exported_decoder as exported
from napari_robustmedsam.io import read_image


def _disk(tmp_path, shape=(150, 110)):
    import imageio.v3 as iio

    image = np.full(shape, 20, np.uint8)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    image[(yy - 70) ** 2 + (xx - 55) ** 2 < 30**2] = 200
    path = tmp_path / "disk.png"
    iio.imwrite(path, image)
    return path


def _segment(image, cache, out, *prompts):
    return main(["segment", str(image), "--device", "cpu", "--cache", str(cache), "--overwrite", "--allow-empty",
                 "-o", str(out), *prompts])


@pytest.mark.parametrize(
    ("size_in", "size_out"),
    [((256, 256), (1024, 1024)), ((170, 256), (540, 800)), ((256, 200), (101, 77)), ((64, 64), (65, 63))],
)
def test_the_bilinear_resize_is_torchs(size_in, size_out):
    x = np.random.default_rng(0).normal(size=(2, *size_in)).astype(np.float32) * 10
    want = F.interpolate(torch.from_numpy(x)[:, None], size_out, mode="bilinear", align_corners=False)[:, 0].numpy()
    got = exported.resize_bilinear(x, size_out)
    assert got.shape == want.shape
    assert np.abs(got - want).max() < 1e-4  # float32 rounding; the source positions and weights are torch's


@pytest.mark.parametrize("preprocessing", ["litemedsam", "sam", "medsam"])
@pytest.mark.parametrize("shape", [(346, 512), (600, 401), (64, 64)])
def test_logits_become_the_predictors_masks_for_every_preprocessing(preprocessing, shape):
    """The 1024 px models (SAM, MedSAM) upsample the logits to the model size before the crop; LiteMedSAM does not."""
    from napari_robustmedsam.engine.predictor import masks_at_original
    from napari_robustmedsam.engine.preprocessing import frame_for

    frame = frame_for(shape, preprocessing)
    logits = np.random.default_rng(1).normal(size=(3, 1, 256, 256)).astype(np.float32) * 4
    want = masks_at_original(frame, torch.from_numpy(logits))
    got = exported.logits_to_masks(frame, logits)
    assert got.shape == want.shape == (3, *shape)
    assert (got != want).sum() <= 2  # float32 rounding can flip a pixel whose logit is within 1e-5 of 0


PROMPTS = {  # name: (arguments, the graph that decodes them)
    "box": (["--box", "25", "40", "90", "110"], "box"),
    "two boxes": (["--box", "25", "40", "90", "110", "--box", "5", "5", "40", "30"], "box"),
    "points": (["--point", "55", "70", "--point", "50", "80", "--negative", "5", "5"], "points"),
    "points and a box": (["--box", "25", "40", "90", "110", "--point", "55", "70"], "points+box"),
    "one point": (["--point", "55", "70"], "point-multimask"),
}


def test_a_cached_image_is_decoded_without_torch_to_the_same_masks(tmp_path, use_session_model, capsys):
    import shutil

    image = _disk(tmp_path)
    cache = tmp_path / "cache"
    for name, (prompts, setup) in PROMPTS.items():
        # without an exported decoder the model decodes the cached embedding, then exports; then the graph decodes
        shutil.rmtree(cache / exported.DECODERS_DIR, ignore_errors=True)
        first, second = tmp_path / "first.png", tmp_path / "second.png"
        assert _segment(image, cache, first, *prompts) == 0
        torch_run = capsys.readouterr()
        assert "exporting the decoder of litemedsam" in torch_run.err, (name, torch_run.err)
        record = json.loads(next((cache / exported.DECODERS_DIR).glob("*.json")).read_text())
        assert list(record["graphs"]) == [setup]
        assert _segment(image, cache, second, *prompts) == 0
        onnx_run = capsys.readouterr()
        assert "decoding with the exported decoder of litemedsam" in onnx_run.err, (name, onnx_run.err)
        assert "loading model" not in onnx_run.err
        assert np.array_equal(read_image(first), read_image(second)), name
        # the same pixel counts and predicted IoU per object (points alone give this box-trained model an empty mask)
        objects = [line for line in torch_run.out.splitlines() if line.startswith("object")]
        assert objects and objects == [line for line in onnx_run.out.splitlines() if line.startswith("object")]
        if "box" in setup:
            assert read_image(first).any(), name


def test_a_graph_that_does_not_reproduce_the_model_is_not_recorded(tmp_path, litemedsam, monkeypatch):
    """segment_anything's point embedding assigns through boolean masks; traced as it is, the graph keeps the traced
    number of points and fails on another: the check before recording catches it."""
    from napari_robustmedsam.engine import decoder_export

    monkeypatch.setattr(decoder_export._PromptDecoder, "forward", decoder_export._PromptDecoder.reference)
    with pytest.raises(decoder_export.ExportError):
        decoder_export.export_graph(litemedsam.model, "points", tmp_path / "points.onnx", 256)
    assert not (tmp_path / "points.onnx").exists()


def test_real_images_give_the_same_masks_both_ways(tmp_path, use_session_model, shared_data):
    """The first image of each dataset, a box around its label: the exported decoder's mask is the torch path's."""
    cache = tmp_path / "cache"
    for folder in [p for p in sorted((shared_data / "medseg").iterdir()) if p.is_dir()]:
        image_path = sorted((folder / "images").glob("*.png"))[0]
        label = read_image(sorted((folder / "masks").glob("*.png"))[0]) > 0
        ys, xs = np.nonzero(label)
        box = [str(v) for v in (xs.min(), ys.min(), xs.max(), ys.max())]
        outs = [tmp_path / f"{folder.name}-{i}.png" for i in range(2)]
        for out in outs:
            assert _segment(image_path, cache, out, "--box", *box) == 0
        assert np.array_equal(read_image(outs[0]), read_image(outs[1])), folder.name


def test_a_changed_checkpoint_or_a_broken_graph_decodes_with_torch(tmp_path, use_session_model, capsys):
    image, cache, out = _disk(tmp_path), tmp_path / "cache", tmp_path / "m.png"
    assert _segment(image, cache, out, *PROMPTS["box"][0]) == 0
    want = read_image(out).copy()
    capsys.readouterr()
    record_file = next((cache / exported.DECODERS_DIR).glob("*.json"))
    record = json.loads(record_file.read_text())
    # the checkpoint on disk is not the one the graph came from: the record is not used, and is made again
    record["checkpoint"]["mtime_ns"] += 1
    record_file.write_text(json.dumps(record))
    assert _segment(image, cache, out, *PROMPTS["box"][0]) == 0
    err = capsys.readouterr().err
    assert "exported decoder" not in err and "loading model" in err and "exporting the decoder" in err
    assert np.array_equal(read_image(out), want)
    # flipped bytes in the graph: a note, then the model decodes
    graph = cache / exported.DECODERS_DIR / json.loads(record_file.read_text())["graphs"]["box"]["file"]
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF
    graph.write_bytes(bytes(data))
    assert _segment(image, cache, out, *PROMPTS["box"][0]) == 0
    err = capsys.readouterr().err
    assert "the exported decoder could not be used (exported decoder" in err and "loading model" in err
    assert np.array_equal(read_image(out), want)


def test_no_cache_exports_nothing(tmp_path, use_session_model):
    image, out = _disk(tmp_path), tmp_path / "m.png"
    assert main(["segment", str(image), "--device", "cpu", "--no-cache", "--cache", str(tmp_path / "cache"),
                 "-o", str(out), *PROMPTS["box"][0]]) == 0
    assert not (tmp_path / "cache" / exported.DECODERS_DIR).exists()


def test_only_plain_decoders_are_exported(litemedsam):
    from napari_robustmedsam.checkpoints import load_model
    from napari_robustmedsam.engine.decoder_export import exportable

    assert exportable(litemedsam.model)
    head = load_model("robust-lite", device="cpu", image_encoder=False)
    assert not exportable(head.model)  # a robust decoder with LiteMedSAM's empty-mask fallback decodes with torch


def test_the_command_line_parser_imports_no_torch():
    code = ("import sys; import napari_robustmedsam.cli as cli; cli.build_parser(); "
            "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**__import__("os").environ, "PYTHONPATH": str(REPO / "src")})
    assert result.stdout.strip() == "False", result.stderr
