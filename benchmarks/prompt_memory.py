"""Peak memory of segmenting with many prompts, and of `segment` on a very large image: bounded vs. the previous
behaviour, in the same run.

Usage::

    python benchmarks/prompt_memory.py [--boxes 10,100,1000] [--size 512] [--large 12000] [--limit-gb 8]
                                       [--old-src DIR]

Every case runs in its own subprocess and its peak RSS is that process's ``ru_maxrss`` (``os.wait4``), so the
cases never share a peak. A case whose RSS passes ``--limit-gb`` is stopped and reported as "> limit" (the
baselines would otherwise exhaust a shared machine). Cases, LiteMedSAM on the CPU:

- ``boxes N, chunked``: ``Predictor.predict(boxes=<N x 4>)`` with the defaults (``DEFAULT_DECODE_CHUNK``
  objects per decoder call, full-size float masks within ``FULL_RES_BUDGET_BYTES``) on a 512 x 512 phantom;
- ``boxes N, one call``: the same with ``decode_chunk=N`` and no full-size budget, i.e. one decoder call for
  all objects and a full-size float mask per object, as before the chunking;
- ``large S, segment``: ``robustmedsam segment`` on an S x S uint8 ``.npy`` with one box (only the tile the box
  falls in is embedded);
- ``large S, whole image``: the previous ``segment`` path, ``Predictor.set_image`` on the whole image and an
  unbudgeted full-size float mask.

``--old-src DIR`` also runs the ``one call`` and ``whole image`` cases with the package from DIR (e.g. a
``git archive`` of an earlier commit's ``src``), for the figures of the code before the change.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LARGE_BOX = (0.55, 0.55, 0.7, 0.68)  # box of the bright object in the large image, as fractions of its side


def _boxes(n: int, size: int):
    import numpy as np

    rng = np.random.default_rng(0)
    x0 = rng.uniform(0, size * 0.7, n)
    y0 = rng.uniform(0, size * 0.7, n)
    side = rng.uniform(size * 0.05, size * 0.3, n)
    return np.stack([x0, y0, np.minimum(x0 + side, size - 1), np.minimum(y0 + side, size - 1)], 1)


def _large_image(path: Path, side: int) -> list[str]:
    import numpy as np

    image = np.full((side, side), 40, np.uint8)
    x0, y0, x1, y1 = (int(f * side) for f in LARGE_BOX)
    image[y0 + 20:y1 - 20, x0 + 20:x1 - 20] = 200
    np.save(path, image)
    return [str(v) for v in (x0, y0, x1, y1)]


# ---- child side ------------------------------------------------------------------------------------------
def run_case(args) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    from napari_robustmedsam.checkpoints import load_model
    from napari_robustmedsam.engine import predictor as predictor_mod
    from napari_robustmedsam.engine.predictor import Predictor

    loaded = load_model("litemedsam", device="cpu", progress=False)
    predictor = Predictor.from_loaded(loaded)
    unbounded = args.mode in ("one-call", "whole-image")
    if unbounded and hasattr(predictor_mod, "FULL_RES_BUDGET_BYTES"):
        predictor_mod.FULL_RES_BUDGET_BYTES = 1 << 62
    if args.case == "boxes":
        from napari_robustmedsam.sample_data import mri_phantom

        image = mri_phantom(args.size, seed=0)[0]
        predictor.set_image(image)
        boxes = _boxes(args.n, args.size)
        if unbounded and hasattr(predictor, "decode_chunk"):
            predictor.decode_chunk = args.n
    else:
        image = np.load(args.image)
        boxes = np.asarray([[float(v) for v in args.box]])
        predictor.set_image(image)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    prediction = predictor.predict(boxes=boxes)
    seconds = time.perf_counter() - start
    return {"before_predict": before, "seconds": seconds, "pixels": int(prediction.masks.sum())}


# ---- parent side -----------------------------------------------------------------------------------------
def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def measure(command: list[str], src: Path, limit: int) -> dict:
    """Run ``command`` with ``src`` first on the path; its peak RSS (ru_maxrss), or ``stopped`` past ``limit``."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(src), str(REPO)]))
    start = time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stopped = False
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if _rss(proc.pid) > limit:
            proc.kill()
            stopped = True
        time.sleep(0.05)
    out, err = proc.stdout.read(), proc.stderr.read()
    result = {"peak": usage.ru_maxrss * 1024, "wall": time.perf_counter() - start, "stopped": stopped,
              "rc": os.waitstatus_to_exitcode(status)}
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if lines:
        result.update(json.loads(lines[-1]))
    elif result["rc"] != 0 and not stopped:
        result["error"] = (err.strip().splitlines() or ["?"])[-1]
    return result


def _gb(n: float) -> str:
    return f"{n / 2**30:.2f} GB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--boxes", default="10,100,1000")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--large", default="12000", help="sides of the large-image cases, comma-separated ('' for none)")
    parser.add_argument("--limit-gb", type=float, default=8.0)
    parser.add_argument("--old-src", default=None)
    parser.add_argument("--run-case", dest="case", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="chunked", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--image", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--box", nargs=4, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args)))
        return

    limit = int(args.limit_gb * 2**30)
    sources = [("this code", REPO / "src")]
    if args.old_src:
        sources.append(("old code", Path(args.old_src).resolve()))
    me = [sys.executable, str(Path(__file__).resolve())]
    rows = []
    for n in [int(v) for v in args.boxes.split(",") if v]:
        for label, src in sources:
            modes = ["chunked", "one-call"] if label == "this code" else ["one-call"]
            for mode in modes:
                res = measure(me + ["--run-case", "boxes", "--mode", mode, "--n", str(n), "--size", str(args.size)], src, limit)
                rows.append((f"{n} boxes, {args.size} x {args.size}", f"{mode} ({label})", res))
                print(rows[-1], file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for side in [int(v) for v in args.large.split(",") if v]:
            path = Path(tmp) / f"large{side}.npy"
            box = _large_image(path, side)
            cli = [sys.executable, "-m", "napari_robustmedsam", "segment", str(path), "--box", *box,
                   "--device", "cpu", "-o", str(Path(tmp) / "mask.npy")]
            res = measure(cli, REPO / "src", limit)
            rows.append((f"segment, {side} x {side} uint8 .npy ({_gb(side * side)})", "tiled (this code)", res))
            print(rows[-1], file=sys.stderr, flush=True)
            for label, src in sources:
                res = measure(me + ["--run-case", "large", "--mode", "whole-image", "--image", str(path), "--box", *box],
                              src, limit)
                rows.append((f"segment, {side} x {side} uint8 .npy ({_gb(side * side)})", f"whole image ({label})", res))
                print(rows[-1], file=sys.stderr, flush=True)
            (Path(tmp) / "mask.npy").unlink(missing_ok=True)
            path.unlink()

    print(f"peak RSS per case (its own process; stopped above {args.limit_gb:g} GB); LiteMedSAM, CPU, torch "
          f"{__import__('torch').__version__}\n")
    print("| case | path | peak RSS | peak RSS before predict | predict s | process s |")
    print("|---|---|---|---|---|---|")
    for case, path, res in rows:
        peak = f"> {args.limit_gb:g} GB (stopped)" if res["stopped"] else _gb(res["peak"])
        if res.get("error"):
            peak += f" (failed: {res['error']})"
        before = _gb(res["before_predict"]) if "before_predict" in res else "-"
        secs = f"{res['seconds']:.1f}" if "seconds" in res else "-"
        print(f"| {case} | {path} | {peak} | {before} | {secs} | {res['wall']:.1f} |")


if __name__ == "__main__":
    main()
