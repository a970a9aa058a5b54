"""Embedding engine: real LiteMedSAM equivalence, lazy volumes, cancel, series, worker jobs, the CLI."""

from __future__ import annotations

import threading
import warnings

import numpy as np
import pytest
import torch

from napari_robustmedsam.engine.embeddings import (
    EmbeddingCancelled,
    EmbeddingEngine,
    annotation_cache,
    is_cancelled,
)
from napari_robustmedsam.errors import ImageInputError, UserFacingError

from test_cache import tiny_segmenter  # noqa: E402  (tests/ is on sys.path under pytest)


@pytest.fixture(scope="module")
def tiny():
    return tiny_segmenter()


@pytest.fixture(scope="module")
def brain_slice(shared_data):
    import tifffile

    path = shared_data / "volumes" / "brain_mri_tumour" / "image.tif"
    if not path.exists():
        pytest.skip(f"{path} not found")
    volume = tifffile.imread(path)
    labels = tifffile.imread(path.parent / "labels.tif")
    z = int(np.argmax((labels > 0).sum(axis=(1, 2))))
    return volume[z], labels[z] > 0


def _box(mask):
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], float)


def test_litemedsam_engine_matches_the_predictor_and_reopens_from_cache(litemedsam, brain_slice, tmp_path):
    """Real model, real int16 MRI slice: the engine's (BN-folded) embedding gives the predictor's mask."""
    from napari_robustmedsam.engine.predictor import Predictor

    image, tumour = brain_slice
    predictor = Predictor.from_loaded(litemedsam)
    reference = predictor.compute_embedding(image)
    engine = EmbeddingEngine(litemedsam, cache_dir=tmp_path, storage_dtype="float32")  # float32: exact values
    emb = engine.embed_image(image)
    assert emb.frame == reference.frame
    torch.testing.assert_close(emb.image_embeddings, reference.image_embeddings, atol=1e-4, rtol=1e-4)
    box = _box(tumour)
    expected = predictor.predict(boxes=box, embedding=reference)
    got = engine.predictor.predict(boxes=box, embedding=emb)
    np.testing.assert_array_equal(got.masks, expected.masks)
    dice = 2 * (got.masks[0] & tumour).sum() / (got.masks[0].sum() + tumour.sum())
    assert dice > 0.6
    # a later session: read from disk, same tensors, same mask, no encoder run
    later = EmbeddingEngine(litemedsam, cache_dir=tmp_path, storage_dtype="float32")
    cached = later.embed_image(image)
    assert later.stats["computed"] == 0 and torch.equal(cached.image_embeddings, emb.image_embeddings)
    np.testing.assert_array_equal(later.predictor.predict(boxes=box, embedding=cached).masks, got.masks)


def test_volume_slices_are_lazy(tiny, tmp_path):
    volume = (np.random.default_rng(1).random((6, 40, 50)) * 300).astype(np.uint16)
    engine = EmbeddingEngine(tiny, "litemedsam", cache_dir=tmp_path)
    vol = engine.volume(volume)
    assert len(vol) == 6 and engine.stats["computed"] == 0 and vol.cached_slices() == []
    emb = vol[3]
    assert engine.stats["computed"] == 1 and vol.cached_slices() == [3]
    assert emb.frame.original_size == (40, 50)
    assert vol[3] is emb and engine.stats["computed"] == 1
    reports = []
    computed = vol.compute(progress=lambda d, t, m: reports.append((d, t)))
    assert computed == 5 and vol.complete
    assert reports == [(i, 6) for i in range(1, 7)]
    # reopening in a new session: nothing to compute, slices are read on access only
    again = EmbeddingEngine(tiny, "litemedsam", cache_dir=tmp_path).volume(volume)
    assert again.complete and again.engine.stats["from_disk"] == 0
    assert torch.equal(again[5].image_embeddings, vol[5].image_embeddings)
    assert again.engine.stats["from_disk"] == 1 and again.engine.stats["computed"] == 0


def test_identical_slices_share_one_entry(tiny, tmp_path):
    plane = (np.random.default_rng(7).random((32, 32)) * 100).astype(np.float32)
    engine = EmbeddingEngine(tiny, "litemedsam", cache_dir=tmp_path)
    assert engine.volume(np.stack([plane] * 3)).compute() == 1  # content-addressed
    assert len(list(tmp_path.glob("*.zarr"))) == 1


def test_zero_slice_volume_is_a_clear_error(tiny, tmp_path):
    engine = EmbeddingEngine(tiny, "litemedsam", cache_dir=tmp_path)
    with pytest.raises(ImageInputError, match="zero slices"):
        engine.volume(np.zeros((0, 64, 64), np.int16))
    with pytest.raises(ImageInputError):
        engine.volume(np.zeros((4, 5, 6, 7, 8)))


def test_cancel_during_volume_precompute_leaves_no_partial_entry(tiny, tmp_path):
    volume = (np.random.default_rng(2).random((8, 32, 32)) * 100).astype(np.float32)
    engine = EmbeddingEngine(tiny, "litemedsam", cache_dir=tmp_path)
    cancel = threading.Event()

    def progress(done, total, message):
        if done == 3:
            cancel.set()

    vol = engine.volume(volume)
    with pytest.raises(EmbeddingCancelled, match="after 3 of 8"):
        vol.compute(progress=progress, cancel=cancel)
    assert vol.cached_slices() == [0, 1, 2]
    leftovers = [p for p in tmp_path.rglob(".tmp-*")]
    assert leftovers == []
    # resuming computes only the rest
    fresh = EmbeddingEngine(tiny, "litemedsam", cache_dir=tmp_path)
    assert fresh.volume(volume).compute() == 5


def test_background_job_reports_progress_and_cancels(tiny, tmp_path):
    volume = (np.random.default_rng(3).random((30, 32, 32)) * 100).astype(np.float32)
    engine = EmbeddingEngine(tiny, "litemedsam", cache_dir=tmp_path)
    seen = []
    first = threading.Event()

    def progress(done, total, message):
        seen.append(done)
        first.set()

    job = engine.start(engine.embed_volume, volume, progress=progress)
    assert first.wait(60)
    job.cancel()
    with pytest.raises(EmbeddingCancelled):
        job.result(60)
    assert job.done and job.cancelled and 0 < len(seen) < 30
    done = engine.volume(volume).cached_slices()
    assert done == list(range(len(done)))  # a prefix: nothing partial, nothing skipped
    # a complete run in a job returns the VolumeEmbeddings
    job = engine.start(engine.embed_volume, volume[:4])
    assert job.result(60).complete


def test_is_cancelled_accepts_events_callables_and_none():
    event = threading.Event()
    assert not is_cancelled(None) and not is_cancelled(event) and not is_cancelled(lambda: False)
    event.set()
    assert is_cancelled(event) and is_cancelled(lambda: True)


def test_series_from_a_folder(tiny, tmp_path):
    import imageio.v3 as iio

    folder = tmp_path / "series"
    folder.mkdir()
    rng = np.random.default_rng(4)
    for i in range(3):
        iio.imwrite(folder / f"img{i}.png", (rng.random((30 + i, 40)) * 255).astype(np.uint8))
    (folder / "notes.txt").write_text("not an image")
    engine = EmbeddingEngine(tiny, "litemedsam", cache_dir=tmp_path / "cache")
    series = engine.series(folder)
    assert len(series) == 3 and series.name(0) == "img0.png"
    reports = []
    assert series.compute(progress=lambda d, t, m: reports.append(m)) == 3
    assert reports == ["img0.png", "img1.png", "img2.png"]
    assert series[1].frame.original_size == (31, 40)
    again = EmbeddingEngine(tiny, "litemedsam", cache_dir=tmp_path / "cache").embed_series(folder)
    assert again.engine.stats["computed"] == 0
    with pytest.raises(ImageInputError):
        engine.series(tmp_path / "cache")  # no images there


def test_annotation_adapter_load_and_store(tiny, tmp_path):
    from napari_robustmedsam.engine.predictor import Predictor

    predictor = Predictor(tiny, "litemedsam")
    adapter = annotation_cache(predictor, cache_dir=str(tmp_path))
    image = (np.random.default_rng(5).random((50, 60)) * 100).astype(np.float32)
    assert adapter.load_cached(image) is None
    emb = predictor.compute_embedding(image)
    assert adapter.store(image, emb)
    other = annotation_cache(predictor, cache_dir=str(tmp_path))
    got = other.load_cached(image)
    # the cache stores its storage dtype (float16 by default): what comes back is the embedding rounded to it
    stored = emb.image_embeddings.to(getattr(torch, other.storage_dtype)).float()
    assert got is not None and torch.equal(got.image_embeddings, stored)


def test_channels_last_is_the_default_for_folded_encoders_only(tiny, tmp_path):
    """Default (cpu_fast=None): channels_last where the batch norms are folded (a private copy exists anyway;
    docs/results/encoder-speed: faster, same masks); a ViT encoder runs as it is (no second copy)."""
    from napari_robustmedsam.engine.fast_cpu import EncoderRunner

    default = EmbeddingEngine(tiny, "litemedsam", use_cache=False)
    assert default.runner.cpu_fast and "channels_last" in default.description
    vit = tiny_segmenter(robust=True)
    assert not EncoderRunner(vit).channels_last
    assert EncoderRunner(vit, cpu_fast=True).channels_last
    assert not EncoderRunner(tiny, cpu_fast=False).channels_last
    image = (np.random.default_rng(7).random((64, 64)) * 100).astype(np.float32)
    off = EmbeddingEngine(tiny, "litemedsam", use_cache=False, cpu_fast=False).embed_image(image).image_embeddings
    torch.testing.assert_close(default.embed_image(image).image_embeddings, off, atol=1e-5, rtol=1e-5)


def test_precision_choices_on_cpu(tiny, tmp_path):
    with pytest.raises(UserFacingError, match="fp16"):
        EmbeddingEngine(tiny, "litemedsam", cache_dir=tmp_path, precision="fp16")
    with pytest.raises(UserFacingError):
        EmbeddingEngine(tiny, "litemedsam", cache_dir=tmp_path, precision="int8")
    from napari_robustmedsam.engine.fast_cpu import cpu_has_native_bf16

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast32 = EmbeddingEngine(tiny, "litemedsam", cache_dir=tmp_path, cpu_fast=True, precision="fp32",
                                 storage_dtype="float32")
        fast = EmbeddingEngine(tiny, "litemedsam", cache_dir=tmp_path, cpu_fast=True, storage_dtype="float32")
    plain = EmbeddingEngine(tiny, "litemedsam", cache_dir=tmp_path, use_cache=False, cpu_fast=False)
    assert "channels_last" not in plain.description
    image = (np.random.default_rng(6).random((64, 64)) * 100).astype(np.float32)
    reference = plain.embed_image(image).image_embeddings
    # channels_last alone changes nothing but the memory layout
    torch.testing.assert_close(fast32.embed_image(image).image_embeddings, reference, atol=1e-5, rtol=1e-5)
    assert "channels_last" in fast32.description and plain.cache is None
    # "auto" stays fp32 with cpu_fast, also on CPUs with native bf16 (bf16 moves masks: docs/benchmarks.md 1b)
    assert fast.runner.precision == "fp32"
    torch.testing.assert_close(fast.embed_image(image).image_embeddings, reference, atol=1e-5, rtol=1e-5)
    # bf16 when asked for; a notice says when the CPU only emulates it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bf16 = EmbeddingEngine(tiny, "litemedsam", cache_dir=tmp_path, cpu_fast=True, precision="bf16")
    assert bf16.runner.precision == "bf16" and "bf16" in bf16.description
    assert any("emulated" in n for n in bf16.runner.notices) != cpu_has_native_bf16()
    torch.testing.assert_close(bf16.embed_image(image).image_embeddings, reference, atol=3e-2, rtol=3e-2)


# ---- CLI ------------------------------------------------------------------------------------------
def test_cli_embeds_a_volume_then_reuses_it(tmp_path, capsys):
    from napari_robustmedsam.cli import main

    volume = np.zeros((2, 48, 48), np.int16)
    volume[:, 12:36, 12:36] = 400
    volume[1, 20:30, 20:30] = 900
    path = tmp_path / "vol.npy"
    np.save(path, volume)
    cache = tmp_path / "cache"
    assert main(["embed", str(path), "--cache", str(cache), "--device", "cpu", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "2 computed" in out and str(cache) in out and "MB on disk" in out
    assert main(["embed", str(path), "--cache", str(cache), "--device", "cpu", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "0 computed, 2 already in the cache" in out


def test_cli_errors(tmp_path, capsys):
    from napari_robustmedsam.cli import main

    empty = tmp_path / "empty.npy"
    np.save(empty, np.zeros((0, 8, 8), np.int16))
    assert main(["embed", str(empty), "--cache", str(tmp_path / "c"), "--device", "cpu"]) == 2
    assert "zero slices" in capsys.readouterr().err
    assert main(["embed", str(tmp_path / "missing.png"), "--device", "cpu"]) == 2
    assert "not found" in capsys.readouterr().err


# ---- click-time fast paths in the predictor / segmenter -----------------------------------------------
def test_fast_plain_decoder_equals_sams_mask_decoder(tiny):
    pe = tiny.prompt_encoder
    feat = torch.randn(1, 256, 64, 64)
    g = torch.Generator().manual_seed(0)
    cases = [
        (None, torch.tensor([[10.0, 20, 120, 200]]), False),
        ((torch.rand(1, 1, 2, generator=g) * 255, torch.ones(1, 1, dtype=torch.int64)), None, True),
        ((torch.rand(3, 2, 2, generator=g) * 255, torch.tensor([[1, 0], [1, 1], [0, 1]])), torch.rand(3, 4, generator=g).sort(-1).values * 255, False),
        # 12 points + padding + 5 output tokens = 18 tokens: 8 heads x 18 > 128, the projected (not absorbed) path
        ((torch.rand(2, 12, 2, generator=g) * 255, torch.randint(0, 2, (2, 12), generator=g)), None, False),
    ]
    with torch.no_grad():
        for points, boxes, multimask in cases:
            sparse, dense = pe(points=points, boxes=boxes, masks=None)
            ref = tiny.mask_decoder(feat, pe.get_dense_pe(), sparse, dense, multimask)
            got = tiny.decode({"image_embeddings": feat}, sparse, dense, multimask)
            for r, o in zip(ref, got):
                assert r.shape == o.shape
                torch.testing.assert_close(o, r, atol=1e-4, rtol=1e-4)
        # a mask prompt (corrective clicks feeding back logits): the image side is computed per call, absorbed
        # into the token side (few tokens) or projected (many)
        for n, n_points in ((1, 2), (3, 2), (2, 14)):
            sparse, dense = pe(points=(torch.rand(n, n_points, 2, generator=g) * 255,
                                       torch.ones(n, n_points, dtype=torch.int64)),
                               boxes=None, masks=torch.randn(n, 1, 256, 256, generator=g))
            assert dense.stride(-1) != 0
            ref = tiny.mask_decoder(feat, pe.get_dense_pe(), sparse, dense, False)
            got = tiny.decode({"image_embeddings": feat}, sparse, dense, False)
            for r, o in zip(ref, got):
                torch.testing.assert_close(o, r, atol=1e-4, rtol=1e-4)
    # with autograd on (training), SAM's path as well
    sparse, dense = pe(points=None, boxes=torch.tensor([[5.0, 5, 50, 50]]), masks=None)
    out = tiny.decode({"image_embeddings": feat.requires_grad_()}, sparse, dense, False)
    assert out[0].requires_grad


def test_prepared_mask_prompt_gives_the_same_masks_and_skips_the_per_click_image_side(monkeypatch):
    """Between clicks the annotator prepares the next corrective click's mask prompt (previous logits):
    the click then starts from the prepared image side, with SAM's result; another or a changed mask tensor
    is never served the prepared entry."""
    from napari_robustmedsam.engine.predictor import Predictor
    from napari_robustmedsam.models import fast_plain_decoder as fpd

    model = tiny_segmenter()
    predictor = Predictor(model, "litemedsam")
    rng = np.random.default_rng(0)
    emb = predictor.compute_embedding((rng.random((200, 300)) * 255).astype(np.uint8))
    box = np.array([40.0, 30, 180, 150])
    points, labels = np.array([[100.0, 90], [60, 40]]), [1, 0]
    logits = predictor.predict(boxes=box, embedding=emb).low_res_logits

    def reference(mask):
        pe = model.prompt_encoder
        point_arg = (torch.as_tensor(emb.frame.points_to_model(points[None]), dtype=torch.float32),
                     torch.tensor([labels]))
        box_arg = torch.as_tensor(emb.frame.boxes_to_model(box[None]), dtype=torch.float32)
        with torch.no_grad():
            sparse, dense = pe(points=point_arg, boxes=box_arg, masks=mask)
            return model.mask_decoder(emb.features["image_embeddings"], pe.get_dense_pe(), sparse, dense, False)[0]

    calls = []
    real = fpd._compute_image_side
    monkeypatch.setattr(fpd, "_compute_image_side", lambda *a, **k: calls.append(1) or real(*a, **k))
    predictor.prepare_mask_prompt(logits, embedding=emb)
    assert len(calls) == 1
    predictor.prepare_mask_prompt(logits, embedding=emb)  # already prepared: nothing recomputed
    assert len(calls) == 1
    got = predictor.predict(boxes=box, points=points, point_labels=labels, mask_input=logits, embedding=emb)
    assert len(calls) == 1  # the click used the prepared image side
    torch.testing.assert_close(got.low_res_logits, reference(logits), atol=1e-4, rtol=1e-4)

    other = logits.clone() * 0.5  # another mask tensor: computed for the call, not served the prepared entry
    got = predictor.predict(boxes=box, points=points, point_labels=labels, mask_input=other, embedding=emb)
    assert len(calls) == 2
    torch.testing.assert_close(got.low_res_logits, reference(other), atol=1e-4, rtol=1e-4)

    with torch.no_grad():
        logits.mul_(-1.0)  # changed in place after it was prepared: the version counter tells
    got = predictor.predict(boxes=box, points=points, point_labels=labels, mask_input=logits, embedding=emb)
    assert len(calls) == 3
    torch.testing.assert_close(got.low_res_logits, reference(logits), atol=1e-4, rtol=1e-4)

    emb2 = predictor.compute_embedding((rng.random((200, 300)) * 255).astype(np.uint8))
    predictor.prepare_mask_prompt(other, embedding=emb)
    got = predictor.predict(boxes=box, points=points, point_labels=labels, mask_input=other, embedding=emb2)
    assert len(calls) == 5  # prepared for another image: not used
    with torch.inference_mode():  # inference tensors have no version counter: never prepared or served
        frozen = logits.clone()
    predictor.prepare_mask_prompt(frozen, embedding=emb)
    assert len(calls) == 5


def test_dense_pe_is_cached_and_follows_the_buffer(tiny):
    first = tiny.dense_pe()
    assert tiny.dense_pe() is first
    torch.testing.assert_close(first, tiny.prompt_encoder.get_dense_pe())
    gauss = tiny.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix
    with torch.no_grad():
        gauss.mul_(1.0)  # an in-place change bumps the version: recomputed
    assert tiny.dense_pe() is not first


def test_logits_to_original_is_bit_identical_to_the_frame_method():
    from napari_robustmedsam.engine.predictor import logits_to_original
    from napari_robustmedsam.engine.preprocessing import ImageFrame

    x = torch.randn(2, 1, 256, 256) * 5
    for pre, size in (("sam", 1024), ("medsam", 1024), ("litemedsam", 256)):
        for h, w in ((512, 512), (300, 700), (1023, 17), (5, 9), (2000, 1500)):
            if pre == "medsam":
                inp = (size, size)
            else:
                s = size / max(h, w)
                inp = (max(1, int(h * s + 0.5)), max(1, int(w * s + 0.5)))
            frame = ImageFrame(pre, (h, w), inp, size)
            assert torch.equal(logits_to_original(frame, x), frame.logits_to_original(x))


def test_fine_tuned_decoder_reuses_the_encoders_cached_outputs(tmp_path):
    """Hot swap: a robust decoder on the same encoder finds the encoder-level entry (embedding + early
    features) and only recomputes its own image-level features; the encoder does not run again."""
    from napari_robustmedsam.checkpoints import load_model

    img = (np.random.default_rng(0).random((120, 100)) * 1000).astype(np.int16)
    base = load_model("litemedsam_robust", device="cpu")
    first = EmbeddingEngine(base, cache_dir=tmp_path)
    first.embed_image(img)
    assert first.stats["computed"] == 1 and first.stats["written"] == 2  # model entry + encoder entry
    tuned = load_model("litemedsam_robust", device="cpu")
    with torch.no_grad():
        for p in tuned.model.mask_decoder.robust_parameters():
            p.add_(0.01)  # another decoder: its image-level features differ
    second = EmbeddingEngine(tuned, cache_dir=tmp_path)
    emb = second.embed_image(img)
    assert second.stats["computed"] == 0 and second.stats["from_encoder_cache"] == 1
    assert sorted(emb.features) == ["image_embeddings", "robust_image_features"]
    ref = second.encode(img)  # what the encoder + this decoder give from scratch
    for key, value in ref.features.items():  # up to the float16 storage's rounding (the default)
        torch.testing.assert_close(emb.features[key], value, atol=1e-3, rtol=1e-3)
    # the swapped model's own entry is written too: a third engine reads it from disk
    third = EmbeddingEngine(tuned, cache_dir=tmp_path)
    third.embed_image(img)
    assert third.stats["from_disk"] == 1 and third.stats["computed"] == 0


def test_an_engine_that_cannot_be_opened_is_reported_not_swallowed(monkeypatch, caplog):
    """open_engine: the annotator, launcher and evaluation fall back to embeddings without the cache, and say why
    (a warning in the log, a notice for the status line / run record)."""
    import logging
    from types import SimpleNamespace

    from napari_robustmedsam.engine import embeddings

    def broken(*args, **kwargs):
        raise OSError("read-only file system")

    monkeypatch.setattr(embeddings, "EmbeddingEngine", broken)
    notices: list[str] = []
    with caplog.at_level(logging.WARNING, logger="napari_robustmedsam"):
        assert embeddings.open_engine(SimpleNamespace(name="litemedsam"), notices=notices) is None
    assert notices == ["embedding cache disabled for litemedsam: read-only file system"]
    assert "read-only file system" in caplog.text
