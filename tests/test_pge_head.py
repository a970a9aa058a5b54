"""PGE-SAM head (docs/training.md): the enhancer's pieces, its place in the segmenter / predictor / cache / checkpoints,
and a short training run. Uses the embedded LiteMedSAM and small synthetic images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_robustmedsam.checkpoints import load_model, make_metadata, save_checkpoint
from napari_robustmedsam.engine.predictor import Predictor
from napari_robustmedsam.errors import CheckpointError
from napari_robustmedsam.models.intermediate_features import INTERMEDIATE_KEYS
from napari_robustmedsam.models.pge_enhancer import (
    EnhancerConfig,
    PromptGuidedEnhancer,
    enhancer_for,
    head_metadata,
    lite_config,
    render_prompt_maps,
)


def disc_image(size=(120, 150), centre=(60, 70), radius=30, seed=0) -> np.ndarray:
    yy, xx = np.mgrid[: size[0], : size[1]]
    img = 40 + 150 * (((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) < radius**2)
    img = img + np.random.default_rng(seed).normal(0, 8, size)
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def lite():
    return load_model("litemedsam", device="cpu", progress=False)


def perturbed(enhancer: PromptGuidedEnhancer, seed: int = 0) -> PromptGuidedEnhancer:
    """Give the zero-initialised residual parts values, so the enhancer is no longer the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in enhancer.named_parameters():
            if name.endswith(("beta", "gamma")) or name.startswith("out_proj"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return enhancer


# ---------------------------------------------------------------------------------------------- pieces
def test_prompt_maps_put_clicks_and_box_where_they_are():
    coords = torch.tensor([[[42.0, 202.0], [182.0, 22.0], [0.0, 0.0]]])  # (x, y) in a 256 frame, cell centres
    labels = torch.tensor([[1, 0, -1]])  # -1: SAM's padding point, ignored
    maps = render_prompt_maps((coords, labels), torch.tensor([[102.0, 62.0, 222.0, 142.0]]), 1, 64, 256,
                              1.5, 0.5, torch.device("cpu"), torch.float32)
    assert maps.shape == (1, 3, 64, 64)
    pos, neg, box = maps[0]
    assert np.unravel_index(int(pos.argmax()), pos.shape) == (50, 10)  # cell = coordinate / 4 - 0.5
    assert np.unravel_index(int(neg.argmax()), neg.shape) == (5, 45)
    assert float(pos[0, 0]) < 1e-6 and float(neg[0, 0]) < 1e-6  # the padding point drew nothing
    assert np.unravel_index(int(box.argmax()), box.shape) == (25, 40)  # box centre (162, 102)
    assert float(box.max()) == pytest.approx(1.0, abs=0.02)


def test_untrained_enhancer_is_the_identity_and_a_trained_one_follows_the_prompts():
    torch.manual_seed(0)
    enh = PromptGuidedEnhancer(lite_config()).eval()
    assert 3.5e6 < enh.parameter_count() < 4.5e6  # PGE-SAM's lite head: about 4 M
    emb = torch.randn(1, 256, 64, 64)
    inter = [torch.randn(1, 320, 64, 64), torch.randn(1, 160, 64, 64), torch.randn(1, 128, 128, 128)]
    dense = torch.randn(1, 256, 64, 64)
    click = (torch.tensor([[[100.0, 120.0]]]), torch.tensor([[1]]))
    with torch.no_grad():
        side = enh.image_side(inter)
        assert torch.equal(enh(emb, side, click, None, dense), emb)
        perturbed(enh)
        a = enh(emb, side, click, None, dense)
        b = enh(emb, side, (torch.tensor([[[20.0, 30.0]]]), torch.tensor([[1]])), None, dense)
        c = enh(emb, enh.image_side([f * 2 for f in inter]), click, None, dense)
    assert not torch.equal(a, emb)
    assert (a - b).abs().max() > 1e-4  # depends on where the click is
    assert (a - c).abs().max() > 1e-4  # and on the intermediate encoder features
    # the change is largest near the click (guidance), not spread evenly
    diff = (a - b).abs().mean(1)[0]
    assert diff[25:35, 20:30].mean() > diff[55:, 55:].mean()


def test_enhancer_config_round_trips_and_rejects_unknown_settings():
    cfg = lite_config(5)
    assert EnhancerConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown enhancer settings"):
        EnhancerConfig.from_dict({**cfg.to_dict(), "depth": 3})
    # a file written before the working-grid options rebuilds the same head (no input projection)
    old = {k: v for k, v in cfg.to_dict().items() if k not in ("work_stride", "width")}
    assert EnhancerConfig.from_dict(old) == cfg
    assert not any(k.startswith("in_proj") for k in PromptGuidedEnhancer(cfg).state_dict())


def test_fast_enhancer_works_on_a_coarser_narrower_grid_and_starts_as_the_identity():
    torch.manual_seed(0)
    fast = EnhancerConfig(feature_channels=(320, 160, 128), feature_strides=(1, 1, 2), work_stride=2, width=96,
                          gate_channels=32)
    enh = PromptGuidedEnhancer(fast).eval()
    assert 0.9e6 < enh.parameter_count() < 1.2e6
    assert "on the embedding grid / 2, 96 channels" in fast.summary()
    emb = torch.randn(1, 256, 64, 64)
    inter = [torch.randn(1, 320, 64, 64), torch.randn(1, 160, 64, 64), torch.randn(1, 128, 128, 128)]
    dense = torch.randn(1, 256, 64, 64)  # the same previous mask for both objects
    clicks = (torch.tensor([[[100.0, 120.0]], [[30.0, 40.0]]]), torch.tensor([[1], [1]]))
    with torch.no_grad():
        side = enh.image_side(inter)
        assert [tuple(p.shape[-2:]) for p, _ in side] == [(32, 32)] * 3  # every feature on the working grid
        assert torch.equal(enh(emb, side, clicks, None, dense), emb.expand(2, -1, -1, -1))
        perturbed(enh)
        out = enh(emb, side, clicks, None, dense)
    assert out.shape == (2, 256, 64, 64)
    assert (out - emb).abs().max() > 1e-4
    # the two objects differ only in where their click is: the difference is largest around the clicks
    diff = (out[0] - out[1]).abs().mean(0)
    assert diff[27:33, 22:28].mean() > 2 * diff[50:, 50:].mean()
    assert diff[7:13, 4:10].mean() > 2 * diff[50:, 50:].mean()
    with pytest.raises(ValueError, match="work_stride"):
        PromptGuidedEnhancer(EnhancerConfig(feature_channels=(8,), feature_strides=(1,), work_stride=3))


def test_merged_depthwise_convolutions_equal_the_sum_of_the_branches():
    from napari_robustmedsam.models.pge_enhancer import EBlock, _pool, depthwise_sum

    torch.manual_seed(0)
    block = EBlock(16, (3, 5, 7))
    x = torch.randn(2, 16, 12, 12)
    summed = sum(conv(x) for conv in block.spatial)
    torch.testing.assert_close(depthwise_sum(block.spatial, x), summed, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(depthwise_sum(block.spatial, x, identity=True), x + summed, atol=1e-5, rtol=1e-5)
    # the gradient reaches every branch's kernel, as with separate convolutions
    depthwise_sum(block.spatial, x).square().sum().backward()
    assert all(conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0 for conv in block.spatial)
    # pooling the no-mask embedding (one vector broadcast over the grid) = average pooling
    const = torch.randn(1, 8, 1, 1).expand(1, 8, 16, 16)
    torch.testing.assert_close(_pool(const, 2), torch.nn.functional.avg_pool2d(const.contiguous(), 2))
    varying = torch.randn(1, 8, 16, 16)
    torch.testing.assert_close(_pool(varying, 2), torch.nn.functional.avg_pool2d(varying, 2))


# ---------------------------------------------------------------------------------------------- model
def test_identity_head_keeps_litemedsams_masks_for_one_and_several_objects(lite):
    img = disc_image()
    base = Predictor.from_loaded(lite)
    base.set_image(img)
    boxes = np.array([[35, 25, 105, 95], [60, 40, 140, 110]], dtype=float)
    points = np.array([[[70, 60]], [[100, 70]]], dtype=float)
    ref = base.predict(boxes=boxes, points=points, point_labels=np.array([[1], [0]]))
    model = lite.model
    try:
        model.attach_enhancer(enhancer_for(model))
        assert model.head == "pge"
        pred = Predictor.from_loaded(lite)
        emb = pred.set_image(img)
        assert all(k in emb.features for k in INTERMEDIATE_KEYS)
        got = pred.predict(boxes=boxes, points=points, point_labels=np.array([[1], [0]]))
        np.testing.assert_array_equal(got.masks, ref.masks)
        torch.testing.assert_close(got.low_res_logits, ref.low_res_logits, atol=1e-4, rtol=1e-5)
        # the per-image part is computed once per image, then reused click after click
        side = model.__dict__["_enhancer_side"][1]
        pred.predict(points=[[70, 60]])
        assert model.__dict__["_enhancer_side"][1] is side
    finally:
        model.attach_enhancer(None)


def test_segmenter_serves_the_fast_head_from_its_per_image_cache_with_the_same_values(lite):
    model = lite.model
    try:
        enh = perturbed(enhancer_for(model, work_stride=2, width=96, gate_channels=32)).eval()
        model.attach_enhancer(enh)
        pred = Predictor.from_loaded(lite)
        emb = pred.set_image(disc_image())
        feats = emb.features
        points = (torch.tensor([[[80.0, 90.0]]]), torch.tensor([[1]]))
        box = torch.tensor([[40.0, 30.0, 160.0, 150.0]])
        dense = torch.randn(1, 256, 64, 64)
        with torch.no_grad():
            got = model.enhance(feats, points, box, dense)
            cached_emb = model.__dict__["_enhancer_side"][2]
            assert cached_emb[0].is_contiguous(memory_format=torch.channels_last)
            assert cached_emb[1].shape == (1, 96, 32, 32)  # the stages' input: pooled and projected once per image
            again = model.enhance(feats, points, box, dense)
            assert model.__dict__["_enhancer_side"][2] is cached_emb
            direct = enh(feats["image_embeddings"], enh.image_side([feats[k] for k in INTERMEDIATE_KEYS]),
                         points, box, dense)
            torch.testing.assert_close(got, direct, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(again, got)
            # another image's embedding (same intermediate features) is not served from the entry
            other = dict(feats, image_embeddings=feats["image_embeddings"] * 0.5)
            moved = model.enhance(other, points, box, dense)
            assert model.__dict__["_enhancer_side"][2] is not cached_emb
            assert (moved - got).abs().max() > 1e-3
        assert pred.predict(boxes=[40, 30, 100, 90]).masks.shape == (1, 120, 150)
    finally:
        model.attach_enhancer(None)


def test_head_that_does_not_fit_the_encoder_is_refused(lite, tmp_path):
    wrong = PromptGuidedEnhancer(EnhancerConfig(feature_channels=(768, 768, 768), feature_strides=(1, 1, 1)))
    with pytest.raises(ValueError, match="trained on another encoder"):
        lite.model.attach_enhancer(wrong)
    state = dict(lite.model.state_dict())
    state.update({"feature_enhancer." + k: v for k, v in wrong.state_dict().items()})
    path = tmp_path / "wrong_head.pth"
    save_checkpoint(path, state, make_metadata(architecture="tiny_vit", decoder="sam", preprocessing="litemedsam",
                                               head=head_metadata(wrong)))
    with pytest.raises(CheckpointError, match="does not match its image encoder"):
        load_model(path, device="cpu", progress=False)
    # enhancer tensors without the metadata that says what they are: an unknown layout, not silently dropped
    bare = tmp_path / "bare.pth"
    save_checkpoint(bare, state, make_metadata(architecture="tiny_vit", decoder="sam", preprocessing="litemedsam"))
    with pytest.raises(CheckpointError, match="feature_enhancer"):
        load_model(bare, device="cpu", progress=False)


def test_checkpoint_with_a_pge_head_loads_transparently_and_info_names_the_head(lite, tmp_path):
    from napari_robustmedsam.checkpoints.inspect import describe_checkpoint, render_description

    model = lite.model
    img = disc_image(seed=1)
    try:
        enh = perturbed(enhancer_for(model), seed=1)
        model.attach_enhancer(enh)
        pred = Predictor.from_loaded(lite)
        pred.set_image(img)
        ref = pred.predict(boxes=[35, 25, 105, 95], points=[[70, 60]], point_labels=[0])
        path = tmp_path / "pge.pth"
        save_checkpoint(path, model.state_dict(), make_metadata(
            architecture="tiny_vit", decoder="sam", preprocessing="litemedsam", head=head_metadata(enh)))
    finally:
        model.attach_enhancer(None)
    loaded = load_model(path, device="cpu", progress=False)
    assert loaded.model.head == "pge"
    assert "PGE-SAM prompt-guided feature enhancer" in loaded.summary()
    pred = Predictor.from_loaded(loaded)
    pred.set_image(img)
    got = pred.predict(boxes=[35, 25, 105, 95], points=[[70, 60]], point_labels=[0])
    torch.testing.assert_close(got.low_res_logits, ref.low_res_logits)
    info = describe_checkpoint(path)
    assert info["head"] == "pge" and info["parameters"]["feature_enhancer"] == enh.parameter_count()
    assert "robust head: pge" in render_description(info)


def test_cache_keeps_enhancer_entries_apart_and_recomputes_entries_without_intermediates(lite, tmp_path):
    from napari_robustmedsam.engine.embeddings import EmbeddingEngine

    img = disc_image(seed=2)
    plain = EmbeddingEngine(Predictor.from_loaded(lite), cache_dir=tmp_path)
    plain.embed_image(img)
    model = lite.model
    try:
        model.attach_enhancer(enhancer_for(model))
        engine = EmbeddingEngine(Predictor.from_loaded(lite), cache_dir=tmp_path)
        emb = engine.embed_image(img)  # the plain entry (no intermediates) is not served
        assert all(k in emb.features for k in INTERMEDIATE_KEYS)
        assert engine.stats["computed"] == 1
        sig = engine.signature(img)
        assert sig.content == "model+pge"
        again = EmbeddingEngine(Predictor.from_loaded(lite), cache_dir=tmp_path)
        emb2 = again.embed_image(img)
        assert again.stats["computed"] == 0 and all(k in emb2.features for k in INTERMEDIATE_KEYS)
        # an entry under the enhancer's signature that lacks the intermediate features (an older writer)
        # is recomputed with a notice, not a crash
        store = again.cache.open_store(sig, 1)
        store.write(0, {"image_embeddings": emb2.image_embeddings}, emb2.frame, None)
        third = EmbeddingEngine(Predictor.from_loaded(lite), cache_dir=tmp_path)
        emb3 = third.embed_image(img)
        assert third.stats["computed"] == 1 and all(k in emb3.features for k in INTERMEDIATE_KEYS)
        assert any("intermediate features" in n for n in third.notices)
    finally:
        model.attach_enhancer(None)


# ---------------------------------------------------------------------------------------------- training
def test_foreground_reconstruction_loss_counts_the_mask_only():
    from training.finetune.pge_step import foreground_reconstruction_loss

    clean = torch.zeros(1, 4, 8, 8)
    enhanced = torch.zeros(1, 4, 8, 8)
    enhanced[..., :4, :] = 2.0  # wrong everywhere in the top half
    target = torch.zeros(1, 1, 32, 32, dtype=torch.bool)
    target[..., 24:, :] = True  # foreground: bottom quarter -> cells 6..7, where the features are right
    assert float(foreground_reconstruction_loss(enhanced, clean, target)) == pytest.approx(0.0)
    target[..., :4, :] = True  # now cell row 0 is foreground too: its error counts (4.0 per cell)
    assert float(foreground_reconstruction_loss(enhanced, clean, target)) == pytest.approx(4.0 * 8 / 24)


def test_pge_head_training_run_writes_a_checkpoint_the_predictor_loads(tmp_path):
    from napari_robustmedsam.sample_data import mri_phantom
    from training.finetune import LossWeights, PromptConfig, TrainConfig, Trainer, items_from_arrays, split_items
    from training.finetune.data import TrainingError

    with pytest.raises(TrainingError, match="head"):
        TrainConfig(head="other")
    with pytest.raises(TrainingError, match="SVD"):
        TrainConfig(head="pge", svd_neck=True)
    imgs, labs = zip(*(mri_phantom(96, seed=s) for s in range(3)))
    train, val = split_items(items_from_arrays(list(imgs), list(labs), names=["a", "b", "c"], modality="mri"),
                             0.34, seed=0)
    cfg = TrainConfig(model="litemedsam", head="pge", epochs=1, steps_per_epoch=2, batch_size=1, objects_per_image=1,
                      variants=1, prompts=PromptConfig(n_steps=2, point_counts=(1,), local_corrections="always",
                                                       click_guard="always"),
                      weights=LossWeights(feature=0.0, token=0.0, fall=1.0), cache_dir=str(tmp_path / "c"),
                      progress_bar=False, val_max_objects=1, seed=1, lr=1e-3)
    trainer = Trainer(cfg, tmp_path / "out", train, val)
    result = trainer.run()
    assert result.stopped == "completed"
    steps = trainer.step_log
    assert steps and all(np.isfinite(s["fr"]) and np.isfinite(s["dice"]) for s in steps)
    assert all(s["fall"] >= 0 for s in steps)  # --w-fall: charged on the corrective clicks, logged
    loaded = load_model(tmp_path / "out" / "last.pth", device="cpu", progress=False)
    assert loaded.model.head == "pge"
    out_proj = loaded.model.feature_enhancer.out_proj.weight
    assert out_proj.abs().max() > 0  # trained: no longer the identity
    meta = loaded.metadata
    assert meta["head"]["kind"] == "pge" and "feature_enhancer (PGE-SAM head)" in meta["provenance"]["trained"]
    pred = Predictor.from_loaded(loaded)
    pred.set_image(imgs[0])
    assert pred.predict(boxes=[20, 20, 70, 70]).masks.shape == (1, *imgs[0].shape[:2])


def test_fast_head_options_reach_the_trainer_and_keep_older_runs_resumable():
    import hashlib
    import json

    from training.finetune import TrainConfig
    from training.finetune.data import TrainingError
    from training.fit import build_parser, config_from_args

    with pytest.raises(TrainingError, match="enhancer_work_stride"):
        TrainConfig(head="pge", enhancer_work_stride=3)
    with pytest.raises(TrainingError, match="enhancer_width"):
        TrainConfig(head="pge", enhancer_width=-1)
    cfg, _ = config_from_args(build_parser().parse_args(["--data", "x", "--preset", "pge-lite-fast"]))
    assert (cfg.head, cfg.enhancer_work_stride, cfg.enhancer_width, cfg.enhancer_gate_channels) == ("pge", 2, 96, 32)
    cfg, _ = config_from_args(build_parser().parse_args(
        ["--data", "x", "--preset", "pge-lite-fast", "--enhancer-width", "128"]))
    assert cfg.enhancer_width == 128  # an explicit option overrides the preset
    # a PGE run started before these options (and --local-corrections) existed has a fingerprint without them: it still resumes
    default = TrainConfig(head="pge")
    d = default.to_dict()
    for key in ("epochs", "time_budget_s", "save_every_steps", "cache_dir", "use_cache", "memory_gb", "threads",
                "progress_bar", "lr", "device", "enhancer_work_stride", "enhancer_width", "enhancer_gate_channels"):
        d.pop(key)
    d["prompts"].pop("local_corrections")  # added later still: "off" is left out of the fingerprint
    d["prompts"].pop("click_guard")  # --click-guard, added after that: "off" is left out too
    d["prompts"].pop("click_guard_reach")  # --click-guard-reach and its scope, added later: defaults left out
    d["prompts"].pop("click_guard_reach_scope")
    d["weights"].pop("fall")  # --w-fall, added later again: 0 is left out
    assert default.fingerprint() == hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]
    assert TrainConfig(head="pge", enhancer_work_stride=2).fingerprint() != default.fingerprint()
    cfg, _ = config_from_args(build_parser().parse_args(["--data", "x", "--preset", "pge-lite-fast", "--w-fall", "2"]))
    assert cfg.weights.fall == 2.0 and cfg.fingerprint() != config_from_args(
        build_parser().parse_args(["--data", "x", "--preset", "pge-lite-fast"]))[0].fingerprint()
