"""`robustmedsam segment` twice on the same image: the second call reads the embedding from the cache.

Each call is a fresh process, as a user runs it (interpreter start, imports, model load, embedding, decode,
write). Each repeat uses a new temporary cache directory and makes three calls:
0. on another image: the first call with this cache directory, which also exports the model's decoder for these
   prompts (once per model and prompt set-up, docs/embeddings.md);
1. on the image: its first call (the embedding is computed);
2. on the image again: its second call (the embedding is read from the cache, the exported decoder decodes).
Target (issue 25): the second call takes at most 30 % of the first (call 2 / call 1). Call 2 / call 0 is reported
too. The embedding stage's own time, as the command prints it, and how call 2 decoded are reported.

For scale, each repeat also times a bare ``python -c "import torch"``: the floor of any call that uses torch.

Images: the first two hc18 ultrasound images of ../shared/data/medseg when present, else two synthetic MRI
phantoms.

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


def sample_images(folder: Path) -> tuple[list[Path], list[str]]:
    """(the image measured, another image for the call that exports the decoder), and the box prompt."""
    env = os.environ.get("ROBUSTMEDSAM_SHARED_DATA")
    shared = Path(env) if env else REPO.parent / "shared" / "data"
    images = sorted((shared / "medseg" / "hc18_fetal_head_us" / "images").glob("*.png"))
    if len(images) >= 2:
        return images[:2], ["--box", "40", "40", "450", "320"]
    import numpy as np

    sys.path.insert(0, str(REPO / "src"))
    from napari_robustmedsam.sample_data import mri_phantom

    paths = []
    for seed in (0, 1):
        image, _ = mri_phantom(256, seed=seed)
        paths.append(folder / f"phantom{seed}.npy")
        np.save(paths[-1], image)
    return paths, ["--box", "60", "60", "200", "200"]


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
    how = how.group(1) if how else "?"
    if "decoding with the exported decoder" in result.stderr:
        how += ", exported decoder"
    if "exporting the decoder" in result.stderr:
        how += ", decoder exported"
    return wall, float(took.group(1)) if took else None, how


def torch_import_floor() -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch"], check=True)
    return time.perf_counter() - start


def _embedding_note(how: str, took: float | None) -> str:
    """"embedding computed 1.2 s, decoder exported": the stage's own time right after what it did."""
    what, _, rest = how.partition(", ")
    return f"embedding {what}" + (f" {took:.1f} s" if took is not None else "") + (f", {rest}" if rest else "")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--model", default="litemedsam")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        (image, other), prompt = sample_images(Path(tmp))
        print(f"image: {image} (the export call: {other})")
        exports, firsts, seconds, floors = [], [], [], []
        for r in range(args.repeats):
            cache = Path(tmp) / f"cache{r}"
            w0, e0, how0 = one_call(other, prompt, cache, Path(tmp) / "o.png", args.model)
            w1, e1, how1 = one_call(image, prompt, cache, Path(tmp) / "a.png", args.model)
            w2, e2, how2 = one_call(image, prompt, cache, Path(tmp) / "b.png", args.model)
            floor = torch_import_floor()
            exports.append(w0)
            firsts.append(w1)
            seconds.append(w2)
            floors.append(floor)
            print(f"run {r}: export call {w0:.2f} s ({_embedding_note(how0, e0)}); first {w1:.2f} s "
                  f"({_embedding_note(how1, e1)}), second {w2:.2f} s ({_embedding_note(how2, e2)}), "
                  f"ratio {w2 / w1:.2f}; python -c 'import torch' {floor:.2f} s")
        ratio = statistics.median(seconds) / statistics.median(firsts)
        print(f"median: export call {statistics.median(exports):.2f} s, first {statistics.median(firsts):.2f} s, "
              f"second {statistics.median(seconds):.2f} s, ratio {ratio:.2f} (target <= 0.30: "
              f"{'met' if ratio <= 0.30 else 'NOT met'}); second / export call "
              f"{statistics.median(seconds) / statistics.median(exports):.2f}; "
              f"importing torch alone {statistics.median(floors):.2f} s")


if __name__ == "__main__":
    main()
