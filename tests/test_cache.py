"""Embedding cache: hits, signature mismatches, version notices, corruption, killed writes, full/unwritable dirs.

Cache logic is exercised with tiny random-weight segmenters (a conv+BN encoder, and a 2-block ViT with a
RobustSAM decoder), built from the same classes as the real models: the engine never looks at the weights'
quality, only at their hash, so this keeps the tests honest and fast.
"""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import warnings
from functools import partial

import numpy as np
import pytest
import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, TwoWayTransformer
from torch import nn

from napari_robustmedsam.engine import cache as cache_mod
from napari_robustmedsam.engine import signature as signature_mod
from napari_robustmedsam.engine.cache import EmbeddingCache, EmbeddingStore
from napari_robustmedsam.engine.embeddings import EmbeddingCacheWarning, EmbeddingEngine
from napari_robustmedsam.errors import CacheError, UserFacingError
from napari_robustmedsam.models.segmenter import ArchitectureInfo, PromptableSegmenter


def tiny_segmenter(image_size: int = 256, robust: bool = False, seed: int = 0) -> PromptableSegmenter:
    torch.manual_seed(seed)
    patch = image_size // 64
    if robust:
        encoder = ImageEncoderViT(
            img_size=image_size, patch_size=patch, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, out_chans=256,
            qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), use_rel_pos=False, window_size=8,
            global_attn_indexes=(1,),
        )
    else:
        encoder = nn.Sequential(
            nn.Sequential(nn.Conv2d(3, 32, patch, patch, bias=False), nn.BatchNorm2d(32)), nn.GELU(), nn.Conv2d(32, 256, 1)
        )
        with torch.no_grad():
            encoder[0][1].running_mean.uniform_(-0.5, 0.5)
            encoder[0][1].running_var.uniform_(0.5, 2.0)
    prompt_encoder = PromptEncoder(
        embed_dim=256, image_embedding_size=(64, 64), input_image_size=(image_size, image_size), mask_in_chans=16
    )
    kwargs = dict(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
        transformer_dim=256,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )
    if robust:
        from napari_robustmedsam.models.robust_decoder import RobustMaskDecoder

        decoder = RobustMaskDecoder(**kwargs, vit_dim=32)
    else:
        decoder = MaskDecoder(**kwargs)
    info = ArchitectureInfo("tiny_test", image_size, 64, 256, "robust" if robust else "sam")
    return PromptableSegmenter(encoder, prompt_encoder, decoder, info).eval()


@pytest.fixture(scope="module")
def tiny():
    return tiny_segmenter()


@pytest.fixture(scope="module")
def tiny_robust():
    return tiny_segmenter(robust=True)


@pytest.fixture()
def image():
    rng = np.random.default_rng(0)
    return (rng.random((90, 120)) * 1000).astype(np.int16)


def _engine(model, cache_dir, preprocessing="litemedsam", **kw) -> EmbeddingEngine:
    return EmbeddingEngine(model, preprocessing, cache_dir=cache_dir, **kw)


def _equal(a, b) -> bool:
    return set(a.features) == set(b.features) and all(torch.equal(a.features[k], b.features[k]) for k in a.features)


def test_cache_hit_returns_identical_tensors(tiny, image, tmp_path):
    first = _engine(tiny, tmp_path)
    emb = first.embed_image(image)
    assert first.stats["computed"] == 1 and first.stats["written"] == 1
    second = _engine(tiny, tmp_path)  # a new session
    again = second.embed_image(image)
    assert second.stats["computed"] == 0 and second.stats["from_disk"] == 1
    assert _equal(emb, again) and again.frame == emb.frame
    assert second.embed_image(image) is again  # then from memory
    assert second.stats["from_memory"] == 1


def test_engine_features_equal_model_encode(tiny, image, tmp_path):
    """The engine folds the encoder's batch norms into its convolutions: equal to model.encode within 1e-5
    (float32 storage: the default float16 storage rounds what it serves, see test_float16_storage_roundtrip)."""
    from napari_robustmedsam.engine.preprocessing import preprocess

    emb = _engine(tiny, tmp_path, storage_dtype="float32").embed_image(image)
    reference = tiny.encode(preprocess(image, "litemedsam")[0])["image_embeddings"]
    torch.testing.assert_close(emb.image_embeddings, reference, atol=1e-5, rtol=1e-5)


def test_other_model_weights_recompute(tiny, image, tmp_path):
    _engine(tiny, tmp_path, storage_dtype="float32").embed_image(image)
    other = tiny_segmenter(seed=1)
    eng = _engine(other, tmp_path, storage_dtype="float32")
    emb = eng.embed_image(image)
    assert eng.stats["computed"] == 1 and eng.stats["from_disk"] == 0
    torch.testing.assert_close(emb.image_embeddings, other.encode(_pre(image))["image_embeddings"], atol=1e-5, rtol=1e-5)


def _pre(image, preprocessing="litemedsam"):
    from napari_robustmedsam.engine.preprocessing import preprocess

    return preprocess(image, preprocessing)[0]


def test_weights_changed_in_place_recompute(image, tmp_path):
    model = tiny_segmenter(seed=2)
    eng = _engine(model, tmp_path)
    before = eng.embed_image(image)
    with torch.no_grad():
        model.image_encoder[2].bias.add_(1.0)  # fine-tuning in the same process
    after = eng.embed_image(image)
    assert eng.stats["computed"] == 2
    assert not torch.equal(before.image_embeddings, after.image_embeddings)


def test_other_image_with_the_same_store_path_recomputes(tiny, image, tmp_path):
    """An explicit store (like a file-named cache) reused for another image: the signature says no."""
    path = tmp_path / "case01.zarr"
    eng = _engine(tiny, tmp_path / "cache")
    a = eng.embed_image(image, store_path=path)
    changed = image.copy()
    changed[40:50, 40:50] += 500
    fresh = _engine(tiny, tmp_path / "cache")
    b = fresh.embed_image(changed, store_path=path)
    assert fresh.stats["computed"] == 1 and fresh.stats["from_disk"] == 0
    assert not torch.equal(a.image_embeddings, b.image_embeddings)
    assert any("does not match" in n for n in fresh.notices)
    # the store now holds the new image only
    third = _engine(tiny, tmp_path / "cache")
    assert _equal(third.embed_image(changed, store_path=path), b) and third.stats["from_disk"] == 1


def test_other_preprocessing_recomputes(image, tmp_path):
    model = tiny_segmenter(image_size=1024)
    sam = _engine(model, tmp_path, preprocessing="sam")
    a = sam.embed_image(image)
    medsam = _engine(model, tmp_path, preprocessing="medsam")
    b = medsam.embed_image(image)
    assert medsam.stats["computed"] == 1 and medsam.stats["from_disk"] == 0
    assert a.frame.preprocessing == "sam" and b.frame.preprocessing == "medsam"
    assert len(list(tmp_path.glob("*.zarr"))) == 2


def test_signature_compare():
    sig = signature_mod.Signature(
        kind="image", data_hash="a", data_shape=(2, 2), data_dtype="<i2", encoder_hash="e", decoder_hash=None,
        architecture="tiny", preprocessing="litemedsam", model_size=256, precision="fp32", storage_dtype="float32",
        package_version="1.0",
    )
    from dataclasses import replace

    assert sig.compare(sig.to_json()) == ("match", [])
    assert sig.compare(replace(sig, package_version="0.9"))[0] == "version"
    assert sig.compare(replace(sig, checkpoint_sha256="x"))[0] == "match"
    for field, value in [("data_hash", "b"), ("encoder_hash", "f"), ("decoder_hash", "d"), ("preprocessing", "sam"),
                         ("precision", "bf16"), ("tile_shape", (8, 8)), ("data_shape", (2, 3)), ("cache_format", 99)]:
        state, differs = sig.compare(replace(sig, **{field: value}))
        assert state == "mismatch" and field in differs
    assert sig.key() == replace(sig, package_version="0.9").key() != replace(sig, data_hash="b").key()
    assert signature_mod.Signature.from_json(sig.to_json()) == sig


def test_version_mismatch_reuses_with_a_notice(tiny, image, tmp_path, monkeypatch):
    monkeypatch.setattr(signature_mod, "package_version", lambda: "0.0.1")
    old = _engine(tiny, tmp_path)
    emb = old.embed_image(image)
    monkeypatch.undo()
    new = _engine(tiny, tmp_path)
    with pytest.warns(EmbeddingCacheWarning, match="0.0.1"):
        again = new.embed_image(image)
    assert new.stats["computed"] == 0 and new.stats["from_disk"] == 1
    assert _equal(emb, again)
    assert any("reused" in n for n in new.notices)


def test_corrupt_entry_is_detected_and_recomputed(tiny, image, tmp_path):
    eng = _engine(tiny, tmp_path)
    emb = eng.embed_image(image)
    (store_dir,) = tmp_path.glob("*.zarr")
    chunks = [p for p in store_dir.rglob("*") if p.is_file() and "image_embeddings" in p.parts and p.name != "zarr.json"]
    assert chunks
    raw = bytearray(chunks[0].read_bytes())
    for i in range(1000, 1040):
        raw[i] ^= 0xFF
    chunks[0].write_bytes(bytes(raw))
    fresh = _engine(tiny, tmp_path)
    with pytest.warns(EmbeddingCacheWarning, match="corrupt"):
        again = fresh.embed_image(image)
    assert fresh.stats["computed"] == 1 and fresh.stats["written"] == 1
    assert _equal(emb, again)
    # rewritten correctly: a third session reads it
    third = _engine(tiny, tmp_path)
    assert _equal(third.embed_image(image), emb) and third.stats["from_disk"] == 1


def test_broken_metadata_is_recomputed(tiny, image, tmp_path):
    eng = _engine(tiny, tmp_path)
    eng.embed_image(image)
    (store_dir,) = tmp_path.glob("*.zarr")
    meta = store_dir / "entries" / "e0000000" / "zarr.json"
    meta.write_text(meta.read_text()[:40])  # truncated JSON
    fresh = _engine(tiny, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh.embed_image(image)
    assert fresh.stats["computed"] == 1


def test_entry_without_completion_marker_is_not_served(tiny, image, tmp_path):
    eng = _engine(tiny, tmp_path)
    eng.embed_image(image)
    (store_dir,) = tmp_path.glob("*.zarr")
    meta_path = store_dir / "entries" / "e0000000" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    del meta["attributes"]["complete"]
    meta_path.write_text(json.dumps(meta))
    sig = eng.signature(image)
    store = EmbeddingStore(store_dir, sig, 1)
    assert not store.has(0) and store.completed() == []
    assert store.read(0) is None
    fresh = _engine(tiny, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh.embed_image(image)
    assert fresh.stats["computed"] == 1


def _killed_writer(store_dir, sig_json, features):
    """Child process: dies (SIGKILL-like os._exit) after writing the first array of an entry."""
    sig = signature_mod.Signature.from_json(sig_json)
    store = EmbeddingStore(store_dir, sig, 1)
    real = cache_mod._write_array

    def write_then_die(group, name, arr):
        real(group, name, arr)
        os._exit(9)

    cache_mod._write_array = write_then_die
    from napari_robustmedsam.engine.preprocessing import ImageFrame

    store.write(0, features, ImageFrame("litemedsam", (90, 120), (192, 256), 256))


def test_killed_process_mid_write_leaves_no_entry(tiny_robust, image, tmp_path):
    eng = _engine(tiny_robust, tmp_path)
    sig = eng.signature(image)
    store = eng.cache.open_store(sig, 1)
    features = {
        "image_embeddings": torch.zeros(1, 256, 64, 64),
        "robust_image_features": torch.ones(1, 32, 256, 256),
    }
    ctx = multiprocessing.get_context("fork")
    child = ctx.Process(target=_killed_writer, args=(store.path, sig.to_json(), features))
    child.start()
    child.join(60)
    assert child.exitcode == 9
    assert not store.has(0) and store.read(0) is None
    leftovers = [p.name for p in (store.path / "entries").iterdir() if p.name != "zarr.json"]
    assert leftovers and all(n.startswith(".tmp-") for n in leftovers)  # the half-written temp dir
    # next run: recomputes the entry, and the stale temp dir is cleaned once old
    emb = eng.embed_image(image)
    assert eng.stats["computed"] == 1 and "robust_image_features" in emb.features
    for p in (store.path / "entries").iterdir():
        if p.name.startswith(".tmp-"):
            os.utime(p, (0, 0))
    EmbeddingStore.open(store.path, sig, 1)
    assert sorted(p.name for p in (store.path / "entries").iterdir()) == ["e0000000", "zarr.json"]


def test_unwritable_cache_dir_raises_and_engine_falls_back_to_memory(tiny, image, tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the cache directory should be")
    with pytest.raises(CacheError, match="cannot use the embedding cache"):
        EmbeddingCache(blocker / "cache")
    with pytest.warns(EmbeddingCacheWarning, match="in memory only"):
        eng = _engine(tiny, blocker / "cache")
    assert eng.cache is None and isinstance(eng.cache_error, CacheError)
    emb = eng.embed_image(image)
    assert eng.stats["computed"] == 1
    pred = eng.predictor.predict(boxes=[10, 10, 60, 50], embedding=emb)
    assert pred.masks.shape == (1, 90, 120)
    assert eng.embed_image(image) is emb  # kept in memory


def test_full_disk_mid_write_falls_back_and_leaves_nothing(tiny, image, tmp_path, monkeypatch):
    calls = []

    def full(group, name, arr):
        calls.append(name)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache_mod, "_write_array", full)
    eng = _engine(tiny, tmp_path)
    with pytest.warns(EmbeddingCacheWarning, match="disk is full"):
        emb = eng.embed_image(image)
    assert calls and emb.image_embeddings.shape == (1, 256, 64, 64)
    assert eng.cache is None and "disk is full" in str(eng.cache_error)
    (store_dir,) = tmp_path.glob("*.zarr")
    assert [p.name for p in (store_dir / "entries").iterdir()] == ["zarr.json"]  # no partial entry, no temp dir
    assert eng.embed_image(image) is emb


def test_robust_features_are_cached_and_keyed_by_the_decoder(tiny_robust, image, tmp_path):
    eng = _engine(tiny_robust, tmp_path, storage_dtype="float32")
    emb = eng.embed_image(image)
    assert set(emb.features) == {"image_embeddings", "robust_image_features"}
    box = [15, 10, 70, 60]
    fresh_pred = eng.predictor.predict(boxes=box, embedding=emb)
    again = _engine(tiny_robust, tmp_path, storage_dtype="float32")
    cached = again.embed_image(image)
    assert again.stats["from_disk"] == 1 and _equal(emb, cached)
    cached_pred = again.predictor.predict(boxes=box, embedding=cached)
    np.testing.assert_array_equal(fresh_pred.masks, cached_pred.masks)
    # a different robust decoder (same encoder) must not reuse these image-level features
    other = tiny_segmenter(robust=True)
    other.image_encoder.load_state_dict(tiny_robust.image_encoder.state_dict())
    with torch.no_grad():
        other.mask_decoder.fourier_last_layer_features.parameters().__next__().mul_(1.5)
    third = _engine(other, tmp_path, storage_dtype="float32")
    swapped = third.embed_image(image)
    # ... it recomputes them from the encoder-level entry (embedding + early features): no encoder run
    assert third.stats["computed"] == 0 and third.stats["from_encoder_cache"] == 1 and third.stats["from_disk"] == 0
    torch.testing.assert_close(swapped.image_embeddings, emb.image_embeddings)
    assert not torch.allclose(swapped.features["robust_image_features"], emb.features["robust_image_features"])
    torch.testing.assert_close(swapped.features["robust_image_features"],
                               third.encode(image).features["robust_image_features"], atol=1e-5, rtol=1e-5)


def test_float16_storage_roundtrip(tiny, image, tmp_path):
    """float16 is the default storage: zstd-compressed, under half the float32 entry, keyed apart from float32,
    and what a fresh computation serves is exactly what a later session reads back."""
    assert cache_mod.DEFAULT_STORAGE_DTYPE == "float16"
    eng = _engine(tiny, tmp_path)  # the default
    assert eng.storage_dtype == "float16"
    emb = eng.embed_image(image)
    (store_dir,) = tmp_path.glob("*.zarr")
    entry = store_dir / "entries" / "e0000000"
    meta = json.loads((entry / "image_embeddings" / "zarr.json").read_text())
    assert meta["data_type"] == "float16"
    assert [c["name"] for c in meta["codecs"]] == ["bytes", "zstd"]
    assert emb.image_embeddings.dtype == torch.float32
    # served values are the stored float16 values, not the encoder's float32 ones
    assert torch.equal(emb.image_embeddings, emb.image_embeddings.half().float())
    exact = _engine(tiny, tmp_path / "f32", storage_dtype="float32").embed_image(image)
    assert not torch.equal(emb.image_embeddings, exact.image_embeddings)
    torch.testing.assert_close(emb.image_embeddings, exact.image_embeddings, atol=2e-3, rtol=1e-3)
    again_engine = _engine(tiny, tmp_path)
    again = again_engine.embed_image(image)
    assert again_engine.stats["from_disk"] == 1 and again.image_embeddings.dtype == torch.float32
    assert torch.equal(again.image_embeddings, emb.image_embeddings)
    assert cache_mod.directory_size(entry) < cache_mod.directory_size(next((tmp_path / "f32").glob("*.zarr"))) / 2
    # fp32 and fp16 caches are different entries (the storage dtype is in the signature)
    _engine(tiny, tmp_path, storage_dtype="float32").embed_image(image)
    assert len(list(tmp_path.glob("*.zarr"))) == 2
    with pytest.raises(UserFacingError, match="storage_dtype must be one of float32, float16"):
        _engine(tiny, tmp_path, storage_dtype="bfloat16")


def test_compressed_entry_is_verified_like_an_uncompressed_one(tiny, image, tmp_path):
    """A flipped byte in a zstd chunk is corruption (deleted, recomputed), never served or a crash."""
    _engine(tiny, tmp_path).embed_image(image)
    (store_dir,) = tmp_path.glob("*.zarr")
    chunk = store_dir / "entries" / "e0000000" / "image_embeddings" / "c" / "0" / "0" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    eng = _engine(tiny, tmp_path)
    eng.embed_image(image)
    assert eng.stats["corrupt"] == 1 and eng.stats["computed"] == 1


def test_float16_overflow_keeps_values_and_falls_back_to_memory(image, tmp_path):
    """Values beyond float16 are not served as inf: the engine keeps the float32 values and goes on in memory."""
    model = tiny_segmenter(seed=3)
    with torch.no_grad():
        for p in model.image_encoder.parameters():
            p.mul_(1e4)
    eng = _engine(model, tmp_path)
    with pytest.warns(EmbeddingCacheWarning, match="NaN/inf"):
        emb = eng.embed_image(image)
    assert torch.isfinite(emb.image_embeddings).all() and emb.image_embeddings.abs().max() > 65504


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("ROBUSTMEDSAM_CACHE_DIR", str(tmp_path / "home"))
    assert cache_mod.default_cache_dir() == tmp_path / "home" / "embeddings"
    assert EmbeddingCache().directory == tmp_path / "home" / "embeddings"


def test_checkpoints_and_embeddings_share_one_cache_location(monkeypatch, tmp_path):
    from napari_robustmedsam.checkpoints import download

    monkeypatch.setenv("ROBUSTMEDSAM_CACHE_DIR", str(tmp_path / "home"))
    assert download.default_cache_dir() == tmp_path / "home"
    monkeypatch.delenv("ROBUSTMEDSAM_CACHE_DIR")
    assert download.default_cache_dir().parent == cache_mod.default_cache_dir().parent


def test_clear_removes_the_stores_and_the_exported_decoders(tiny, image, tmp_path):
    eng = _engine(tiny, tmp_path)
    eng.embed_image(image)
    cache = EmbeddingCache(tmp_path)
    decoders = tmp_path / "decoders"
    decoders.mkdir()
    (decoders / "record.json").write_text("{}")
    assert len(cache.stores()) == 1
    assert cache.clear() == 1
    assert cache.stores() == [] and not decoders.exists()
    assert cache.size_bytes() == 0


def test_all_zero_features_are_served_from_disk(tmp_path):
    """zarr leaves out chunks equal to the fill value; an all-zero feature (the lite robust decoder's image
    features) must still be a cache hit, and a chunk that went missing from real data must still be caught."""
    from napari_robustmedsam.engine.preprocessing import ImageFrame

    sig = signature_mod.Signature(
        kind="image", data_hash="a", data_shape=(2, 2), data_dtype="<i2", encoder_hash="e", decoder_hash="d",
        architecture="tiny", preprocessing="litemedsam", model_size=256, precision="fp32", storage_dtype="float32",
        package_version="1.0",
    )
    frame = ImageFrame(preprocessing="litemedsam", original_size=(2, 2), input_size=(256, 256), model_size=256)
    store = EmbeddingStore.open(tmp_path / "s.zarr", sig, 1)
    features = {"image_embeddings": torch.randn(1, 4, 8, 8), "robust_image_features": torch.zeros(1, 4, 8, 8)}
    store.write(0, features, frame)
    entry = store.entry_path(0)
    assert (entry / "robust_image_features" / "c" / "0" / "0" / "0" / "0").is_file()  # written, not left out
    got, _, _ = store.read(0)
    assert torch.equal(got["robust_image_features"], features["robust_image_features"])
    # an entry written without the chunk (as zarr's default did) is read as zeros and passes its checksum
    (entry / "robust_image_features" / "c" / "0" / "0" / "0" / "0").unlink()
    got, _, _ = store.read(0)
    assert torch.equal(got["robust_image_features"], features["robust_image_features"])
    # a missing chunk of non-zero data is corrupt: the entry is dropped and recomputed
    (entry / "image_embeddings" / "c" / "0" / "0" / "0" / "0").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert store.read(0) is None


def test_float16_finiteness_check_reads_the_exponent_bits():
    ok = np.array([0.0, -0.0, 1e-7, 65504.0, -65504.0, 0.6], np.float16)
    assert cache_mod._all_finite(ok)
    for bad in (np.inf, -np.inf, np.nan):
        arr = ok.copy()
        arr[2] = bad
        assert not cache_mod._all_finite(arr)
    assert not cache_mod._all_finite(np.array([1.0, np.nan], np.float32))


@pytest.mark.parametrize("with_cache_module", [False, True])
def test_numcodecs_exit_warning_is_hidden_once_the_cache_is_imported(with_cache_module):
    """numcodecs' exit hook calls its own deprecated ``blosc._destroy``; a program that uses the cache must not
    end with that DeprecationWarning (it made the app's "no third-party warnings" check fail at random). Without
    the cache module the warning shows (with this numcodecs), so the check can fail."""
    import subprocess
    import sys

    from conftest import REPO

    # resetwarnings: the app's own catch_warnings blocks used to drop a filter set at import time
    imports = ("napari_robustmedsam.engine.cache, " if with_cache_module else "") + "numcodecs, zarr, warnings; " \
        "warnings.resetwarnings(); warnings.simplefilter('always')"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    result = subprocess.run([sys.executable, "-W", "always::DeprecationWarning", "-c", f"import {imports}"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    if not with_cache_module and "_destroy" not in result.stderr:
        pytest.skip("this numcodecs no longer warns at exit: the filter is no longer needed")
    assert ("_destroy" in result.stderr) is not with_cache_module, result.stderr[-2000:]
