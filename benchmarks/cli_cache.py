"""`robustmedsam segment` twice on the same image: the second call reads the embedding from the cache.

Each call is a fresh process, as a user runs it (interpreter start, imports, model load, embedding, decode,
write). The cache directory is a new temporary one, so the first call always computes the embedding.
Target (issue 25): the second call takes at most 30 % of the first. The embedding stage's own time, as the
command prints it, is reported too.

For scale, each repeat also times a bare ``python -c "import torch"``: the floor of any call that uses torch.

Image: the first hc18 ultrasound image of ../shared/data/medseg when present, else the synthetic MRI phantom.

Usage: ``python benchmarks/cli_cache.py [--repeats 3] [--model litemedsam]``
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def sample_image(folder: Path) -> tuple[Path, list[str]]:
    env = os.environ.get("ROBUSTMEDSAM_SHARED_DATA")
    shared = Path(env) if env else REPO.parent / "shared" / "data"
    images = sorted((shared / "medseg" / "hc18_fetal_head_us" / "images").glob("*.png"))
    if images:
        return images[0], ["--box", "40", "40", "450", "320"]
    import numpy as np

    sys.path.insert(0, str(REPO / "src"))
    from napari_robustmedsam.sample_data import mri_phantom

    image, _ = mri_phantom(256, seed=0)
    path = folder / "phantom.npy"
    np.save(path, image)
    return path, ["--box", "60", "60", "200", "200"]


def one_call(image: Path, prompt: list[str], cache: Path, out: Path, model: str) -> tuple[float, float | None, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "napari_robustmedsam", "segment", str(image), *prompt, "--model", model,
           "--device", "cpu", "--cache", str(cache), "--allow-empty", "--overwrite", "-o", str(out)]
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"segment failed: {result.stderr}")
    took = re.search(r"image embedding on \w+(?: \.\.\.|:) done \(([\d.]+) s\)", result.stderr)
    how = re.search(r"image embedding (computed|read from the cache)", result.stderr)
    return wall, float(took.group(1)) if took else None, how.group(1) if how else "?"


def torch_import_floor() -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch"], check=True)
    return time.perf_counter() - start


def _embedding_note(how: str, took: float | None) -> str:
    return f"embedding {how}" + (f" {took:.1f} s" if took is not None else "")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--model", default="litemedsam")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        image, prompt = sample_image(Path(tmp))
        print(f"image: {image}")
        firsts, seconds, floors = [], [], []
        for r in range(args.repeats):
            cache = Path(tmp) / f"cache{r}"
            w1, e1, how1 = one_call(image, prompt, cache, Path(tmp) / "a.png", args.model)
            w2, e2, how2 = one_call(image, prompt, cache, Path(tmp) / "b.png", args.model)
            floor = torch_import_floor()
            firsts.append(w1)
            seconds.append(w2)
            floors.append(floor)
            print(f"run {r}: first {w1:.2f} s ({_embedding_note(how1, e1)}), second {w2:.2f} s "
                  f"({_embedding_note(how2, e2)}), ratio {w2 / w1:.2f}; python -c 'import torch' {floor:.2f} s")
        ratio = statistics.median(seconds) / statistics.median(firsts)
        print(f"median: first {statistics.median(firsts):.2f} s, second {statistics.median(seconds):.2f} s, "
              f"ratio {ratio:.2f} (target <= 0.30: {'met' if ratio <= 0.30 else 'NOT met'}); "
              f"importing torch alone {statistics.median(floors):.2f} s")


if __name__ == "__main__":
    main()
