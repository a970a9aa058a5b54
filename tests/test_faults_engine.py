"""Fault injection on the engine (issue 26, items 3-6): many prompts and large images stay in bounded memory,
non-finite values (image, weights, embeddings, logits, scores) are refused with a message that names them, and
every part of a cache entry that can change a mask is covered by its integrity check.

Each case states its promise (docs/reliability.md): refused with a one-line message (CLI exit 2), recovered
(the result is the one of the healthy input), or bounded (memory does not grow with the fault's size).
Fast: small images, the embedded LiteMedSAM loaded once, tiny random-weight models for the cache.
"""

from __future__ import annotations

import copy
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


def _pge_model(litemedsam):
    from napari_robustmedsam.models.pge_enhancer import enhancer_for

    model = copy.deepcopy(litemedsam.model)  # the session's model stays without a head
    enhancer = enhancer_for(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a head that is not the identity, so that its per-prompt work matters
        for name, p in enhancer.named_parameters():
            if name.endswith(("beta", "gamma")) or name.startswith("out_proj"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    model.attach_enhancer(enhancer.eval())
    return model, "litemedsam"


@pytest.fixture(scope="module")
def heads(litemedsam):
    """One model per decoder family: plain (LiteMedSAM), robust (tiny RobustSAM decoder), PGE (LiteMedSAM + head)."""
    return {
        "plain": (litemedsam.model, "litemedsam"),
        "robust": (tiny_segmenter(robust=True), "litemedsam"),
        "pge": _pge_model(litemedsam),
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


@pytest.mark.parametrize("factor", [1e300, 1e-300])
@pytest.mark.parametrize("kind", ["gaussian_noise", "bias_field"])
def test_degrading_intensities_float32_cannot_hold_gives_the_scaled_healthy_result(phantom, kind, factor):
    from napari_robustmedsam.degradations import degrade

    image = phantom[0][:64, :96].astype(np.float64)
    healthy = degrade(image, kind, level="LQ-2", seed=0)
    got = degrade(image * factor, kind, level="LQ-2", seed=0)
    assert got.dtype == np.float64 and np.isfinite(got).all()
    np.testing.assert_allclose(got / factor, healthy, rtol=1e-5, atol=1e-6 * healthy.max())


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
def test_non_finite_model_outputs_are_refused_naming_which_one(litemedsam, phantom, where, message):
    from napari_robustmedsam.errors import NonFiniteError

    healthy = Predictor.from_loaded(litemedsam).compute_embedding(phantom[0])
    model = copy.deepcopy(litemedsam.model)
    _poison_module(model.get_submodule(where))
    pred = Predictor(model, "litemedsam")
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


# ------------------------------------------------------------------------------------------------------------
# Item 6: cache integrity (recovered: a tampered entry is detected, deleted and recomputed, never served)
# ------------------------------------------------------------------------------------------------------------
def _cache_image():
    rng = np.random.default_rng(1)
    return (rng.random((256, 200)) * 1000).astype(np.int16)


def _entry_meta(store_dir, index=0):
    return store_dir / "entries" / f"e{index:07d}" / "zarr.json"


def _edit_json(path, edit):
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


def _set(path_keys, value):
    def edit(meta):
        node = meta["attributes"]
        for k in path_keys[:-1]:
            node = node[k]
        node[path_keys[-1]] = value
    return edit


def _reshape_embedding_array(entry_dir):
    # same bytes, same checksum of the bytes, another shape: a different tensor for the decoder
    _edit_json(entry_dir / "image_embeddings" / "zarr.json",
               lambda m: m.update(shape=[1, 64, 256, 64], chunk_grid={"name": "regular", "configuration": {"chunk_shape": [1, 64, 256, 64]}}))


def _forge_frame_with_a_valid_checksum(entry_dir):
    from napari_robustmedsam.engine import cache as cache_mod

    meta_path = entry_dir / "zarr.json"
    meta = json.loads(meta_path.read_text())
    attrs = meta["attributes"]
    attrs["frame"]["original_size"] = [266, 200]
    records = {name: cache_mod._array_record(cache_mod._read_array(entry_dir / name)) for name in attrs["checksums"]}
    attrs["entry_checksum"] = cache_mod._entry_digest(records, attrs["frame"], attrs["extra"])
    meta_path.write_text(json.dumps(meta))


_TAMPERS = {
    "original-size-256-to-266": lambda d: _edit_json(d / "zarr.json", _set(["frame", "original_size"], [266, 200])),
    "input-size": lambda d: _edit_json(d / "zarr.json", _set(["frame", "input_size"], [256, 201])),
    "preprocessing": lambda d: _edit_json(d / "zarr.json", _set(["frame", "preprocessing"], "medsam")),
    "model-size": lambda d: _edit_json(d / "zarr.json", _set(["frame", "model_size"], 1024)),
    "no-metadata-checksum": lambda d: _edit_json(d / "zarr.json", lambda m: m["attributes"].pop("entry_checksum")),
    "array-reshaped": _reshape_embedding_array,
    "frame-forged-with-valid-checksum": _forge_frame_with_a_valid_checksum,
}


@pytest.fixture(scope="module")
def tiny():
    return tiny_segmenter()


@pytest.mark.parametrize("tamper", list(_TAMPERS))
def test_tampered_entry_metadata_is_detected_and_recomputed(tiny, tmp_path, tamper):
    from napari_robustmedsam.engine.embeddings import EmbeddingCacheWarning, EmbeddingEngine

    image = _cache_image()
    first = EmbeddingEngine(tiny, "litemedsam", cache_dir=tmp_path).embed_image(image)
    (store_dir,) = tmp_path.glob("*.zarr")
    _TAMPERS[tamper](_entry_meta(store_dir).parent)
    fresh = EmbeddingEngine(tiny, "litemedsam", cache_dir=tmp_path)
    with pytest.warns(EmbeddingCacheWarning, match="corrupt"):
        again = fresh.embed_image(image)
    assert fresh.stats["corrupt"] == 1 and fresh.stats["computed"] == 1 and fresh.stats["from_disk"] == 0
    assert again.frame == first.frame and torch.equal(again.image_embeddings, first.image_embeddings)
    third = EmbeddingEngine(tiny, "litemedsam", cache_dir=tmp_path)  # rewritten whole: served again
    assert third.embed_image(image).frame == first.frame and third.stats["from_disk"] == 1


def test_tampered_tile_extent_is_detected(tiny, tmp_path):
    from napari_robustmedsam.engine.embeddings import EmbeddingCacheWarning, EmbeddingEngine

    image = _cache_image()
    kw = dict(cache_dir=tmp_path, tile_threshold=160, halo=16)
    first = EmbeddingEngine(tiny, "litemedsam", **kw).embed_image(image)
    (store_dir,) = tmp_path.glob("*.zarr")
    _edit_json(_entry_meta(store_dir, 1), _set(["extra", "outer"], [0, 150, 84, 200]))
    fresh = EmbeddingEngine(tiny, "litemedsam", **kw)
    with pytest.warns(EmbeddingCacheWarning, match="corrupt"):
        again = fresh.embed_image(image)
    assert fresh.stats["corrupt"] == 1 and fresh.stats["computed"] == 1
    assert [e.frame for e in again.embeddings] == [e.frame for e in first.embeddings]


def test_non_finite_values_are_neither_cached_nor_served(tiny, tmp_path, monkeypatch):
    from napari_robustmedsam.engine.cache import EmbeddingStore
    from napari_robustmedsam.engine.embeddings import EmbeddingEngine
    from napari_robustmedsam.errors import CacheError

    image = _cache_image()
    engine = EmbeddingEngine(tiny, "litemedsam", cache_dir=tmp_path)
    emb = engine.embed_image(image)
    (store_dir,) = tmp_path.glob("*.zarr")
    store = EmbeddingStore(store_dir, engine.signature(image), 1)
    bad = {"image_embeddings": emb.image_embeddings.clone()}
    bad["image_embeddings"][0, 0, 0, 0] = float("nan")
    with pytest.raises(CacheError, match="NaN/inf"):
        store.write(1, bad, emb.frame)
    overflow = {"image_embeddings": emb.image_embeddings.clone() * 0 + 1e6}  # beyond float16
    half = EmbeddingStore(store_dir, __import__("dataclasses").replace(engine.signature(image), storage_dtype="float16"), 1)
    with pytest.raises(CacheError, match="NaN/inf"):
        half.write(2, overflow, emb.frame)
    assert not store.has(1) and not half.has(2)


def _volume_file(tmp_path):
    volume = np.zeros((3, 64, 48), np.int16)
    volume[:, 12:50, 10:40] = 400
    volume[1, 20:40, 15:30] = 900
    volume[2, 25:30, 20:25] = 1500
    path = tmp_path / "vol.npy"
    np.save(path, volume)
    return path


def _corrupt_bytes(entry_dir):
    chunk = next(p for p in (entry_dir / "image_embeddings").rglob("*") if p.is_file() and p.name != "zarr.json")
    raw = bytearray(chunk.read_bytes())
    raw[100:140] = bytes(b ^ 0xFF for b in raw[100:140])
    chunk.write_bytes(bytes(raw))


def _remove_chunk(entry_dir):
    next(p for p in (entry_dir / "image_embeddings").rglob("*") if p.is_file() and p.name != "zarr.json").unlink()


@pytest.mark.parametrize(
    "corrupt",
    [lambda d: _edit_json(d / "zarr.json", _set(["frame", "original_size"], [74, 48])), _corrupt_bytes, _remove_chunk],
    ids=["metadata-64-to-74", "flipped-bytes", "missing-chunk"],
)
def test_cli_embed_verifies_reused_entries_and_recomputes_corrupt_ones(tmp_path, capsys, corrupt):
    from napari_robustmedsam.cli import main

    path, cache = _volume_file(tmp_path), tmp_path / "cache"
    args = ["embed", str(path), "--cache", str(cache), "--device", "cpu", "--no-progress"]
    assert main(args) == 0
    assert "3 computed, 0 already in the cache" in capsys.readouterr().out
    entries = sorted(p.parent for p in cache.rglob("zarr.json") if p.parent.name.startswith("e0"))
    assert len(entries) == 3  # one store per slice (content-addressed), one entry each
    corrupt(entries[1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = main(args)
    out = capsys.readouterr().out
    assert rc == 0 and "1 computed, 2 already in the cache, 1 corrupt cache entry found and recomputed" in out
    assert main(args) == 0
    assert "0 computed, 3 already in the cache" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------------------
# Item 3, large images: only the tiles the prompts need are embedded (bounded)
# ------------------------------------------------------------------------------------------------------------
def test_large_image_embeds_only_the_prompted_tiles_with_the_full_layouts_routing(litemedsam):
    from napari_robustmedsam.engine.embeddings import EmbeddingEngine
    from napari_robustmedsam.engine.tiling import TiledPredictor, embedding_for_prompts

    image = mri_phantom(300, seed=2)[0]
    boxes = np.array([[20, 30, 90, 100], [210, 200, 290, 280]], float)
    predictor = Predictor.from_loaded(litemedsam)
    subset = embedding_for_prompts(predictor, image, boxes=boxes, threshold=200, halo=16)
    full = EmbeddingEngine(litemedsam, use_cache=False, tile_threshold=200, halo=16).embed_image(image)
    assert len(subset) == 2 < len(full)
    tiled = TiledPredictor(predictor)
    got, reference = tiled.predict(boxes=boxes, embedding=subset), tiled.predict(boxes=boxes, embedding=full)
    assert got.tile_indices == reference.tile_indices
    assert (got.masks != reference.masks).mean() < 1e-3


def test_large_image_prompt_outside_is_refused_before_embedding(litemedsam, monkeypatch):
    from napari_robustmedsam.engine.tiling import embedding_for_prompts
    from napari_robustmedsam.errors import PromptError

    predictor = Predictor.from_loaded(litemedsam)
    monkeypatch.setattr(predictor, "compute_embedding", lambda *a, **k: pytest.fail("embedded before checking"))
    with pytest.raises(PromptError, match="outside the image"):
        embedding_for_prompts(predictor, np.zeros((300, 300), np.uint8), boxes=[250, 250, 320, 290], threshold=200)


def test_cli_segment_on_a_large_image_embeds_one_tile_at_full_resolution(tmp_path, capsys, monkeypatch):
    from napari_robustmedsam.cli import main

    image = np.full((2300, 2400), 30, np.uint8)
    image[1900:2100, 2000:2250] = 200  # an object near the far corner
    path = tmp_path / "large.npy"
    np.save(path, image)
    calls = []
    real = Predictor.compute_embedding
    monkeypatch.setattr(Predictor, "compute_embedding", lambda self, img: calls.append(img.shape) or real(self, img))
    out = tmp_path / "mask.npy"
    assert main(["segment", str(path), "--box", "1980", "1880", "2270", "2120", "--device", "cpu", "-o", str(out)]) == 0
    assert len(calls) == 1 and max(calls[0]) <= 2048  # one tile, never the whole image
    mask = np.load(out) > 0  # a one-object mask is written 0/255
    assert mask.shape == (2300, 2400)
    inside = mask[1900:2100, 2000:2250].mean()
    assert inside > 0.8 and mask.sum() < 1.3 * 200 * 250
