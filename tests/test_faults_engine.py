"""Fault injection on the engine (issue 26, items 3-6): many prompts and large images stay in bounded memory,
non-finite values (image, weights, embeddings, logits, scores) are refused with a message that names them, and
every part of a cache entry that can change a mask is covered by its integrity check.

Each case states its promise (docs/reliability.md): refused with a one-line message (CLI exit 2), recovered
(the result is the one of the healthy input), or bounded (memory does not grow with the fault's size).
Fast: small images, the embedded LiteMedSAM loaded once, tiny random-weight models for the cache.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from napari_robustmedsam.engine import predictor as predictor_mod
from napari_robustmedsam.engine.predictor import (
    DEFAULT_DECODE_CHUNK,
    Predictor,
    logits_to_original,
    masks_at_original,
)
from napari_robustmedsam.engine.preprocessing import ImageFrame, preprocess
from napari_robustmedsam.sample_data import mri_phantom

from test_cache import tiny_segmenter  # noqa: E402  (tests/ is on sys.path under pytest)

pytestmark = pytest.mark.faults


@pytest.fixture(scope="module")
def phantom():
    return mri_phantom(160, seed=4)


def _boxes(n: int, size: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x0 = rng.uniform(0, size * 0.6, n)
    y0 = rng.uniform(0, size * 0.6, n)
    side = rng.uniform(size * 0.1, size * 0.4, n)
    return np.stack([x0, y0, np.minimum(x0 + side, size), np.minimum(y0 + side, size)], 1)


class _DecodeSpy:
    """Records the batch size of every decoder call of a model."""

    def __init__(self, model, monkeypatch):
        self.sizes: list[int] = []
        real = model.decode

        def decode(features, sparse, dense, *args, **kwargs):
            self.sizes.append(int(sparse.shape[0]))
            return real(features, sparse, dense, *args, **kwargs)

        monkeypatch.setattr(model, "decode", decode)


def _pge_model():
    from napari_robustmedsam.checkpoints import load_model
    from napari_robustmedsam.models.pge_enhancer import enhancer_for

    loaded = load_model("litemedsam", device="cpu", progress=False)
    enhancer = enhancer_for(loaded.model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a head that is not the identity, so that its per-prompt work matters
        for name, p in enhancer.named_parameters():
            if name.endswith(("beta", "gamma")) or name.startswith("out_proj"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    loaded.model.attach_enhancer(enhancer.eval())
    return loaded.model, "litemedsam"


@pytest.fixture(scope="module")
def heads(litemedsam):
    """One model per decoder family: plain (LiteMedSAM), robust (tiny RobustSAM decoder), PGE (LiteMedSAM + head)."""
    return {
        "plain": (litemedsam.model, "litemedsam"),
        "robust": (tiny_segmenter(robust=True), "litemedsam"),
        "pge": _pge_model(),
    }


# ------------------------------------------------------------------------------------------------------------
# Item 3: memory flat in the number of prompts (bounded)
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("head", ["plain", "robust", "pge"])
def test_many_boxes_are_decoded_in_bounded_chunks_with_the_unchunked_result(heads, phantom, head, monkeypatch):
    model, prep = heads[head]
    boxes = _boxes(5, 160)
    whole = Predictor(model, prep, decode_chunk=len(boxes))
    emb = whole.compute_embedding(phantom[0])
    reference = whole.predict(boxes=boxes, embedding=emb)
    spy = _DecodeSpy(model, monkeypatch)
    got = Predictor(model, prep, decode_chunk=2).predict(boxes=boxes, embedding=emb)
    assert spy.sizes == [2, 2, 1]
    assert got.masks.dtype == bool and got.masks.shape == (len(boxes), 160, 160)
    assert got.low_res_logits.shape == (len(boxes), 1, 256, 256) and got.all_scores.shape == (len(boxes), 1)
    torch.testing.assert_close(got.low_res_logits, reference.low_res_logits, atol=2e-4, rtol=1e-5)
    np.testing.assert_allclose(got.scores, reference.scores, atol=1e-5)
    assert (got.masks != reference.masks).mean() < 1e-4


def test_chunked_corrections_with_local_clicks_and_guard_equal_one_call(litemedsam, phantom, monkeypatch):
    model = litemedsam.model
    n = 7
    boxes = _boxes(n, 160, seed=1)
    whole = Predictor(model, "litemedsam", decode_chunk=n)
    emb = whole.compute_embedding(phantom[0])
    first = whole.predict(boxes=boxes, embedding=emb)
    centres = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], 1)[:, None]
    kwargs = dict(points=centres, point_labels=np.zeros((n, 1)), boxes=boxes, mask_input=first.low_res_logits,
                  local_clicks=[c for c in centres], guard_new_clicks=1, embedding=emb)
    reference = whole.predict(**kwargs)
    spy = _DecodeSpy(model, monkeypatch)
    got = Predictor(model, "litemedsam", decode_chunk=3).predict(**kwargs)
    assert spy.sizes == [3, 3, 1]
    torch.testing.assert_close(got.low_res_logits, reference.low_res_logits, atol=2e-4, rtol=1e-5)
    assert (got.masks != reference.masks).mean() < 1e-4


def test_tiled_predictor_decodes_many_boxes_in_bounded_chunks(litemedsam, monkeypatch):
    from napari_robustmedsam.engine.embeddings import EmbeddingEngine

    image = mri_phantom(300, seed=2)[0]
    engine = EmbeddingEngine(litemedsam, use_cache=False, tile_threshold=200, halo=16)
    tiled = engine.embed_image(image)
    assert len(tiled) > 1
    boxes = _boxes(5, 120, seed=3)  # all inside the first tile
    engine.predictor.decode_chunk = 2
    spy = _DecodeSpy(litemedsam.model, monkeypatch)
    got = engine.tiled_predictor.predict(boxes=boxes, embedding=tiled)
    assert spy.sizes == [2, 2, 1]
    assert got.masks.shape == (len(boxes), 300, 300) and got.masks.dtype == bool


@pytest.mark.parametrize(
    "frame",
    [
        ImageFrame("litemedsam", (3001, 2345), (256, 200), 256),
        ImageFrame("litemedsam", (997, 20011), (13, 256), 256),
        ImageFrame("sam", (2999, 1500), (1024, 512), 1024),
        ImageFrame("litemedsam", (256, 171), (256, 171), 256),
    ],
    ids=["tall", "wide", "sam-1024", "same-size"],
)
def test_full_size_masks_in_bounded_bands_equal_the_one_pass_resize(frame):
    logits = torch.randn(3, 1, 256, 256, generator=torch.Generator().manual_seed(0)) * 4
    reference = (logits_to_original(frame, logits)[:, 0] > 0).numpy()
    h, w = frame.original_size
    budget = 4 * h * w // 7  # less than one object at full size: column bands
    got = masks_at_original(frame, logits, budget_bytes=budget)
    np.testing.assert_array_equal(got, reference)


def test_default_chunk_bounds_a_long_prompt_list(litemedsam, phantom, monkeypatch):
    spy = _DecodeSpy(litemedsam.model, monkeypatch)
    pred = Predictor.from_loaded(litemedsam)
    got = pred.predict(boxes=_boxes(DEFAULT_DECODE_CHUNK + 1, 160), embedding=pred.compute_embedding(phantom[0]))
    assert spy.sizes == [DEFAULT_DECODE_CHUNK, 1] and got.masks.shape[0] == DEFAULT_DECODE_CHUNK + 1


def test_predict_holds_no_full_resolution_float_for_all_objects(litemedsam, phantom, monkeypatch):
    """Full-size float intermediates are made for a bounded number of objects at a time."""
    biggest = []
    real = predictor_mod.logits_to_original

    def spy(frame, logits):
        out = real(frame, logits)
        biggest.append(out.numel())
        return out

    monkeypatch.setattr(predictor_mod, "logits_to_original", spy)
    monkeypatch.setattr(predictor_mod, "FULL_RES_BUDGET_BYTES", 4 * 160 * 160 * 5)
    boxes = _boxes(12, 160, seed=5)
    pred = Predictor(litemedsam.model, "litemedsam", decode_chunk=12)
    emb = pred.compute_embedding(phantom[0])
    got = pred.predict(boxes=boxes, embedding=emb)
    assert got.masks.shape == (12, 160, 160)
    assert max(biggest) <= 5 * 160 * 160


# ------------------------------------------------------------------------------------------------------------
# Item 4: intensities float32 cannot hold (recovered: the same model input as the healthy image, or refused)
# ------------------------------------------------------------------------------------------------------------
_VALUE_FAULTS = {
    "beyond-float32": lambda img: img.astype(np.float64) * 1e300,
    "near-float32-max": lambda img: ((img.astype(np.float64) / img.max()) * 6e38 - 3e38).astype(np.float32),
    "below-float32-min": lambda img: img.astype(np.float64) * 1e-300,
    "signal-on-offset": lambda img: img.astype(np.float64) * 1e-3 + 1e12,
    "int64-offset": lambda img: img.astype(np.int64) + 2**60,
}


@pytest.mark.parametrize("preprocessing", ["litemedsam", "sam", "medsam"])
@pytest.mark.parametrize("fault", list(_VALUE_FAULTS))
def test_intensities_float32_cannot_hold_give_the_healthy_model_input(phantom, fault, preprocessing):
    image = phantom[0][:64, :96]
    healthy, frame = preprocess(image.astype(np.float64), preprocessing)
    got, got_frame = preprocess(_VALUE_FAULTS[fault](image), preprocessing)
    assert got_frame == frame and bool(torch.isfinite(got).all())
    scale = 255.0 / 57.0 if preprocessing == "sam" else 1.0  # SAM's input is in units of its pixel std
    torch.testing.assert_close(got, healthy, atol=2e-3 * scale, rtol=0)


def test_huge_float64_image_segments_like_the_healthy_one(litemedsam, phantom):
    pred = Predictor.from_loaded(litemedsam)
    ys, xs = np.nonzero(phantom[1] > 0)
    box = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    pred.set_image(phantom[0])
    healthy = pred.predict(boxes=box)
    pred.set_image(phantom[0].astype(np.float64) * 1e300)
    got = pred.predict(boxes=box)
    assert np.isfinite(got.scores).all() and got.masks.sum() > 100
    assert (got.masks != healthy.masks).mean() < 0.01


def test_non_finite_model_input_is_refused_not_segmented(phantom, monkeypatch):
    from napari_robustmedsam.engine import preprocessing as preprocessing_mod
    from napari_robustmedsam.errors import ImageInputError

    monkeypatch.setattr(preprocessing_mod, "model_values", lambda arr: arr)  # the conversion check alone
    with pytest.raises(ImageInputError, match="NaN/inf values"):
        preprocess(phantom[0].astype(np.float64) * 1e300, "litemedsam")


# ------------------------------------------------------------------------------------------------------------
# Item 5: non-finite weights, embeddings, logits and scores (refused with a message naming which one)
# ------------------------------------------------------------------------------------------------------------
_POISONS = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


def _poisoned_checkpoint(litemedsam, tmp_path, key: str, value: float):
    from napari_robustmedsam.checkpoints import make_metadata, save_checkpoint

    state = {k: v.clone() for k, v in litemedsam.model.state_dict().items()}
    state[key].view(-1)[:3] = value
    path = tmp_path / "poisoned.pth"
    save_checkpoint(path, state, make_metadata(architecture="tiny_vit", decoder="sam", preprocessing="litemedsam"))
    return path


@pytest.mark.parametrize("poison", list(_POISONS))
@pytest.mark.parametrize("part", ["image_encoder", "mask_decoder"])
def test_checkpoint_with_non_finite_weights_is_refused_at_load(litemedsam, tmp_path, poison, part):
    from napari_robustmedsam.checkpoints import load_model
    from napari_robustmedsam.errors import CheckpointError

    key = next(k for k, v in litemedsam.model.state_dict().items() if k.startswith(part) and v.is_floating_point())
    path = _poisoned_checkpoint(litemedsam, tmp_path, key, _POISONS[poison])
    with pytest.raises(CheckpointError, match="NaN/inf values in its weights") as err:
        load_model(path, device="cpu", progress=False)
    assert key in str(err.value) and "\n" not in str(err.value)


def test_cli_segment_with_nan_weights_exits_2_with_one_line(litemedsam, phantom, tmp_path, capsys):
    from napari_robustmedsam.cli import main

    key = next(k for k in litemedsam.model.state_dict() if k.startswith("mask_decoder.iou_prediction_head"))
    path = _poisoned_checkpoint(litemedsam, tmp_path, key, float("nan"))
    image = tmp_path / "image.npy"
    np.save(image, phantom[0])
    rc = main(["segment", str(image), "--box", "20", "20", "120", "120", "--model", str(path), "--device", "cpu",
               "-o", str(tmp_path / "mask.npy")])
    err = capsys.readouterr().err
    assert rc == 2 and "NaN/inf values in its weights" in err and key in err
    assert not (tmp_path / "mask.npy").exists()


def _poison_module(module, value=float("nan")):
    """Weights broken after loading (a diverged fine-tuning run swapped in): bypasses the load-time check."""
    with torch.no_grad():
        next(p for p in module.parameters() if p.is_floating_point()).view(-1)[:5] = value


@pytest.mark.parametrize(
    "where, message",
    [
        ("image_encoder", "image embedding"),
        ("mask_decoder.output_hypernetworks_mlps", "mask logits"),
        ("mask_decoder.iou_prediction_head", "predicted IoU scores"),
    ],
)
def test_non_finite_model_outputs_are_refused_naming_which_one(phantom, where, message):
    from napari_robustmedsam.checkpoints import load_model
    from napari_robustmedsam.errors import NonFiniteError

    loaded = load_model("litemedsam", device="cpu", progress=False)
    healthy = Predictor.from_loaded(loaded).compute_embedding(phantom[0])
    _poison_module(loaded.model.get_submodule(where))
    pred = Predictor.from_loaded(loaded)
    with pytest.raises(NonFiniteError, match=message) as err:
        if where == "image_encoder":
            pred.compute_embedding(phantom[0])
        else:
            pred.predict(boxes=[20, 20, 120, 120], embedding=healthy)
    assert "\n" not in str(err.value)


def test_non_finite_embedding_given_to_the_predictor_is_refused(litemedsam, phantom):
    from napari_robustmedsam.errors import NonFiniteError

    pred = Predictor.from_loaded(litemedsam)
    emb = pred.compute_embedding(phantom[0])
    emb.features["image_embeddings"] = emb.image_embeddings.clone()
    emb.features["image_embeddings"][0, 0, 0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="image embedding"):
        pred.set_embedding(emb)


def test_non_finite_mask_prompt_is_refused(litemedsam, phantom):
    from napari_robustmedsam.errors import PromptError

    pred = Predictor.from_loaded(litemedsam)
    pred.set_image(phantom[0])
    logits = pred.predict(boxes=[20, 20, 120, 120]).low_res_logits.clone()
    logits[0, 0, 5, 5] = float("nan")
    with pytest.raises(PromptError, match="NaN/inf"):
        pred.predict(boxes=[20, 20, 120, 120], mask_input=logits)
