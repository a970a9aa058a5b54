"""Faster CPU encoders and a smaller cache, judged by the masks they give (issue 24, item 7).

The rule (candidates, tolerance, data) is docs/results/encoder-speed/rule.md; the figures are in
docs/results/encoder-speed/results.md.

What it does, in one run:

- Development images (``--per-dataset`` seeded images of each medseg dataset), each clean and at LQ-3.
- Every input is embedded by every encoder candidate in turn (order rotated per input), each call timed
  (preprocessing included). Candidates: the project's fp32 engine (the reference), ``cpu_fast``, ``bf16`` autocast,
  ONNX Runtime, OpenVINO (f32 and bf16 precision hints) and torch dynamic int8 on the encoder's linear layers. A
  candidate whose package is not installed is skipped with a printed notice.
- Box masks (the tight box of each ground-truth object) from each candidate's embedding are compared with the
  reference's: IoU per object.
- Cache storage: the reference embeddings written as real cache entries in float32, float16, and float16 with
  zstd or blosc compression: bytes per entry, read-and-verify time, and the masks from the float16 values.

Usage::

    nice -n 19 env OMP_NUM_THREADS=1 python benchmarks/encoder_backends.py [--per-dataset 10] [--threads 1]
        [--candidates fp32,cpu_fast,bf16,ort,ov_f32,ov_bf16,int8_dyn] [--json out.json]
    python benchmarks/encoder_backends.py --report out.json [--prefix 60]     # tables of a saved (partial) run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import napari_robustmedsam  # noqa: F401  (before torch: the package's allocator setting)
import numpy as np
import torch

warnings.filterwarnings("ignore")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

ALL_CANDIDATES = ("fp32", "cpu_fast", "bf16", "ort", "ov_f32", "ov_bf16", "int8_dyn")
STORAGE_VARIANTS = ("f32", "f16", "f16+zstd", "f16+blosc")
IOU_TOLERANCE, SHARE_REQUIRED = 0.98, 0.95


class BackendUnavailable(RuntimeError):
    """A candidate's package is not installed (or cannot run here): the benchmark skips it with this message."""


def data_dir(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    env = os.environ.get("ROBUSTMEDSAM_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "?"


# ------------------------------------------------------------------------------------------------
# encoder candidates: each a callable (1, 3, S, S) float32 tensor -> (1, 256, 64, 64) float32 tensor
# ------------------------------------------------------------------------------------------------
def _require(module: str, pip_name: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise BackendUnavailable(f"{pip_name} is not installed ({err}); `pip install {pip_name}` to measure it") from err


def folded_encoder(model) -> torch.nn.Module:
    """The reference runner's private encoder copy (batch norms folded), in eval mode."""
    from napari_robustmedsam.engine.fast_cpu import EncoderRunner

    runner = EncoderRunner(model)
    return runner._get_model().image_encoder.eval()


def export_onnx(encoder: torch.nn.Module, size: int, path: Path) -> Path:
    _require("onnx", "onnx")
    x = torch.zeros(1, 3, size, size)
    with torch.no_grad():
        try:
            torch.onnx.export(encoder, (x,), str(path), input_names=["image"], output_names=["image_embeddings"],
                              opset_version=17, dynamo=False)
        except TypeError:  # an older torch without the dynamo switch
            torch.onnx.export(encoder, (x,), str(path), input_names=["image"], output_names=["image_embeddings"],
                              opset_version=17)
    return path


def build_ort(onnx_path: Path, threads: int):
    ort = _require("onnxruntime", "onnxruntime")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])

    def run(x: torch.Tensor) -> torch.Tensor:
        out = session.run(None, {"image": np.ascontiguousarray(x.numpy())})[0]
        return torch.from_numpy(out)

    return run


def build_openvino(onnx_path: Path, threads: int, precision: str):
    ov = _require("openvino", "openvino")
    core = ov.Core()
    model = core.read_model(str(onnx_path))
    compiled = core.compile_model(model, "CPU", {
        "INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": str(threads), "PERFORMANCE_HINT": "LATENCY",
    })
    request = compiled.create_infer_request()

    def run(x: torch.Tensor) -> torch.Tensor:
        request.infer({0: np.ascontiguousarray(x.numpy())})
        return torch.from_numpy(np.array(request.get_output_tensor(0).data, dtype=np.float32, copy=True))

    return run


def build_int8_dynamic(encoder: torch.nn.Module):
    import copy

    try:
        from torch.ao.quantization import quantize_dynamic
    except ImportError as err:
        raise BackendUnavailable(f"torch.ao.quantization is not available in this torch ({err})") from err
    q = quantize_dynamic(copy.deepcopy(encoder), {torch.nn.Linear}, dtype=torch.qint8)

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return q(x)

    return run


def build_candidates(names: list[str], model, size: int, threads: int, workdir: Path) -> tuple[dict, list[str]]:
    """{name: encoder callable} for the candidates that can run here, and the notices for those skipped."""
    from napari_robustmedsam.engine.fast_cpu import EncoderRunner, cpu_has_native_bf16

    out, notices = {}, []
    encoder = None
    onnx_path = None
    for name in names:
        try:
            if name == "fp32":
                runner = EncoderRunner(model)
                out[name] = lambda x, r=runner: r(x)["image_embeddings"]
            elif name == "cpu_fast":
                runner = EncoderRunner(model, cpu_fast=True)
                out[name] = lambda x, r=runner: r(x)["image_embeddings"]
            elif name == "bf16":
                if not cpu_has_native_bf16():
                    raise BackendUnavailable("this CPU has no native bf16 (AMX-BF16 / AVX512-BF16): bf16 is emulated")
                runner = EncoderRunner(model, cpu_fast=True, precision="bf16")
                out[name] = lambda x, r=runner: r(x)["image_embeddings"]
            elif name in ("ort", "ov_f32", "ov_bf16"):
                _require("onnxruntime" if name == "ort" else "openvino", "onnxruntime" if name == "ort" else "openvino")
                if onnx_path is None:
                    encoder = encoder if encoder is not None else folded_encoder(model)
                    start = time.perf_counter()
                    onnx_path = export_onnx(encoder, size, workdir / "encoder.onnx")
                    print(f"  ONNX export of the folded encoder: {time.perf_counter() - start:.1f} s")
                start = time.perf_counter()
                if name == "ort":
                    out[name] = build_ort(onnx_path, threads)
                else:
                    if name == "ov_bf16" and not cpu_has_native_bf16():
                        raise BackendUnavailable("this CPU has no native bf16: OpenVINO would not use it")
                    out[name] = build_openvino(onnx_path, threads, "f32" if name == "ov_f32" else "bf16")
                print(f"  {name}: session built in {time.perf_counter() - start:.1f} s")
            elif name == "int8_dyn":
                encoder = encoder if encoder is not None else folded_encoder(model)
                out[name] = build_int8_dynamic(encoder)
            else:
                raise BackendUnavailable(f"unknown candidate {name!r}; expected one of {', '.join(ALL_CANDIDATES)}")
        except BackendUnavailable as err:
            notices.append(f"{name}: skipped: {err}")
        except Exception as err:  # noqa: BLE001 - a backend that fails to build is reported, not fatal
            notices.append(f"{name}: skipped: failed to build ({type(err).__name__}: {err})")
    return out, notices


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------
def development_inputs(medseg: Path, per_dataset: int, seed: int, conditions: list[str]):
    """[(key, dataset, condition, image, [GTObject])] in the rule's fixed order."""
    from napari_robustmedsam.degradations import degrade_random
    from napari_robustmedsam.prompting import derive_seed
    from training.evaluation.dataset import discover, select_objects, select_samples

    out = []
    for sample in select_samples(discover(medseg), per_dataset=per_dataset, seed=seed):
        image, labels = sample.load()
        objects = select_objects(labels, sample.key, seed=seed, objects="label", max_objects=3, min_object_px=20)
        for condition in conditions:
            if condition == "clean":
                img = image
            else:
                img, _ = degrade_random(image, condition, sample.modality, derive_seed(seed, "degrade", sample.key))
            out.append((sample.key, sample.dataset, condition, img, objects))
    return out


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


# ------------------------------------------------------------------------------------------------
# storage
# ------------------------------------------------------------------------------------------------
def storage_stores(root: Path, signature_fn) -> dict:
    from napari_robustmedsam.engine.cache import EmbeddingStore

    stores = {}
    for variant in STORAGE_VARIANTS:
        dtype = "float32" if variant == "f32" else "float16"
        stores[variant] = EmbeddingStore.open(root / f"{variant}.zarr", signature_fn(dtype), 10_000)
    return stores


def storage_compression(variant: str) -> str | None:
    return {"f16+zstd": "zstd", "f16+blosc": "blosc"}.get(variant)


# ------------------------------------------------------------------------------------------------
def summarise(records: list[dict], times: dict[str, list[float]], names: list[str]) -> dict:
    out = {}
    ref = np.asarray(times["fp32"])
    for name in names:
        rs = [r for r in records if r["candidate"] == name]
        ious = np.asarray([r["iou"] for r in rs])
        row = {"objects": int(ious.size)}
        if ious.size:
            ok = ious >= IOU_TOLERANCE
            row.update(share_ok=float(ok.mean()), median_iou=float(np.median(ious)), min_iou=float(ious.min()))
            for cond in sorted({r["condition"] for r in rs}):
                c = np.asarray([r["iou"] >= IOU_TOLERANCE for r in rs if r["condition"] == cond])
                row[f"share_ok_{cond}"] = float(c.mean())
            row["meets_tolerance"] = bool(all(v >= SHARE_REQUIRED for k, v in row.items() if k.startswith("share_ok")))
        if name in times:
            t = np.asarray(times[name])
            row.update(median_s=float(np.median(t)), min_s=float(t.min()), speedup=float(np.median(ref / t)))
        out[name] = row
    return out


def write_json(path, args, records, times, entry_bytes, read_times, notices, done, total, summary) -> None:
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps({
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "load_average": load_average(), "threads": args.threads,
        "per_dataset": args.per_dataset, "conditions": args.conditions, "inputs_done": done, "inputs_total": total,
        "summary": summary, "times": times, "entry_bytes": entry_bytes, "read_times": read_times,
        "notices": notices, "records": records,
    }, indent=1))
    os.replace(tmp, path)


def print_tables(summary: dict, entry_bytes: dict, read_times: dict) -> None:
    nan = float("nan")
    print(f"\n| candidate | median s | speed-up vs fp32 | objects | IoU >= {IOU_TOLERANCE} | clean | LQ-3 | "
          f"median IoU | min IoU | meets tolerance |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n, row in summary.items():
        print(f"| {n} | {row.get('median_s', nan):.3f} | {row.get('speedup', nan):.2f}x | {row['objects']} | "
              f"{row.get('share_ok', nan):.1%} | {row.get('share_ok_clean', nan):.1%} | {row.get('share_ok_LQ-3', nan):.1%} | "
              f"{row.get('median_iou', nan):.4f} | {row.get('min_iou', nan):.4f} | "
              f"{'yes' if row.get('meets_tolerance') else 'no'} |")
    if entry_bytes:
        print("\n| storage | bytes per entry (median / max) | read + verify (median ms) |")
        print("|---|---|---|")
        for v in entry_bytes:
            print(f"| {v} | {int(np.median(entry_bytes[v])):,} / {max(entry_bytes[v]):,} | "
                  f"{1000 * np.median(read_times[v]):.1f} |")


def report_saved(path: str, prefix: int | None) -> int:
    """Re-print the tables of a saved run, optionally for its first ``prefix`` inputs only (an interrupted run:
    the inputs go round-robin over the datasets, clean then LQ-3, so a multiple of 12 covers each dataset alike)."""
    saved = json.loads(Path(path).read_text())
    records = saved["records"]
    if records and "input" not in records[0]:  # inputs in order of appearance (every input has objects)
        seen: dict = {}
        for r in records:
            r["input"] = seen.setdefault((r["key"], r["condition"]), len(seen))
    done = saved["inputs_done"]
    n = done if prefix is None else min(prefix, done)
    records = [r for r in records if r["input"] < n]
    times = {k: v[:n] for k, v in saved["times"].items()}
    entry_bytes = {k: v[:n] for k, v in saved["entry_bytes"].items()}
    read_times = {k: v[:n] for k, v in saved["read_times"].items()}
    names = [k for k in times if k != "fp32"] + (["f16"] if entry_bytes else [])
    images = len({r["key"] for r in records})
    print(f"saved run of {saved['date']} (load average then {saved.get('load_average', '?')}): first {n} of "
          f"{saved['inputs_total']} inputs ({images} images with objects), {len({(r['input'], r['object']) for r in records})} objects")
    print(f"reference fp32 engine: median {np.median(times['fp32']):.3f} s, min {min(times['fp32']):.3f} s per input")
    print_tables(summarise(records, times, names), entry_bytes, read_times)
    for a, b in (("cpu_fast", "ov_f32"), ("cpu_fast", "ort")):
        if a in times and b in times:
            print(f"median per-input ratio {a} / {b}: {np.median(np.asarray(times[a]) / np.asarray(times[b])):.2f}x")
    for notice in saved.get("notices", []):
        print("notice:", notice)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="the shared data folder (default ../shared/data)")
    parser.add_argument("--per-dataset", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--conditions", default="clean,LQ-3")
    parser.add_argument("--candidates", default=",".join(ALL_CANDIDATES))
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads for every candidate")
    parser.add_argument("--skip-storage", action="store_true")
    parser.add_argument("--json", help="write per-object IoUs, timings and the summary here")
    parser.add_argument("--report", metavar="JSON", help="only re-print the tables of a run saved with --json")
    parser.add_argument("--prefix", type=int, help="with --report: the first N inputs only")
    args = parser.parse_args(argv)
    if args.report:
        return report_saved(args.report, args.prefix)

    torch.set_num_threads(args.threads)
    from napari_robustmedsam.checkpoints import load_model
    from napari_robustmedsam.engine import cache as cache_mod
    from napari_robustmedsam.engine.predictor import ImageEmbedding, Predictor
    from napari_robustmedsam.engine.preprocessing import preprocess
    from napari_robustmedsam.engine.signature import Signature
    from napari_robustmedsam.prompting import tight_box

    names = [n.strip() for n in args.candidates.split(",") if n.strip()]
    if "fp32" not in names:
        names.insert(0, "fp32")
    print(f"encoder backends benchmark {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; {platform.machine()} "
          f"{platform.processor() or ''}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; load average {load_average()}")
    loaded = load_model("litemedsam", device="cpu", progress=False)
    model = loaded.model
    preprocessing = loaded.preprocessing
    predictor = Predictor(model, preprocessing, box_primary=getattr(loaded, "box_primary", False))
    size = int(model.architecture.image_size)

    workdir = Path(tempfile.mkdtemp(prefix="encoder-backends-"))
    try:
        candidates, notices = build_candidates(names, model, size, args.threads, workdir)
        for n in notices:
            print("  notice:", n)
        names = [n for n in names if n in candidates]
        inputs = development_inputs(data_dir(args.data) / "medseg", args.per_dataset, args.seed,
                                    [c.strip() for c in args.conditions.split(",")])
        n_obj = sum(len(o) for *_, o in inputs)
        print(f"{len(inputs)} inputs ({args.per_dataset} images per dataset x {args.conditions}), {n_obj} objects; "
              f"candidates: {', '.join(names)}")

        def signature(dtype: str) -> Signature:
            return Signature(kind="image", data_hash="bench", data_shape=(1, 1), data_dtype="<f4", encoder_hash="e",
                             decoder_hash="d", architecture=model.architecture.name, preprocessing=preprocessing,
                             model_size=size, precision="fp32", storage_dtype=dtype)

        stores = {} if args.skip_storage else storage_stores(workdir / "stores", signature)
        for n in names:  # warm-up (first-call allocations, OpenVINO's lazy init)
            candidates[n](preprocess(inputs[0][3], preprocessing)[0])

        times = {n: [] for n in names}
        read_times = {v: [] for v in stores}
        entry_bytes = {v: [] for v in stores}
        records = []
        for i, (key, dataset, condition, image, objects) in enumerate(inputs):
            order = names[i % len(names):] + names[: i % len(names)]
            embeddings = {}
            for n in order:
                start = time.perf_counter()
                x, frame = preprocess(image, preprocessing)
                with torch.no_grad():
                    emb = candidates[n](x)
                times[n].append(time.perf_counter() - start)
                embeddings[n] = emb.float().contiguous()
            boxes = np.stack([tight_box(o.mask) for o in objects]) if objects else None
            variants = dict(embeddings)
            for v, store in stores.items():
                saved = dict(cache_mod.COMPRESSION_BY_DTYPE)
                cache_mod.COMPRESSION_BY_DTYPE[store.storage_dtype.name] = storage_compression(v)
                try:
                    store.write(i, {"image_embeddings": embeddings["fp32"]}, frame)
                finally:
                    cache_mod.COMPRESSION_BY_DTYPE.clear()
                    cache_mod.COMPRESSION_BY_DTYPE.update(saved)
                entry_bytes[v].append(cache_mod.directory_size(store.entry_path(i)))
                start = time.perf_counter()
                got = store.read(i)
                read_times[v].append(time.perf_counter() - start)
                if v == "f16":
                    variants["f16"] = got[0]["image_embeddings"]
            if boxes is None:
                continue
            ref = predictor.predict(boxes=boxes, embedding=ImageEmbedding({"image_embeddings": variants["fp32"]}, frame))
            for v, emb in variants.items():
                if v == "fp32":
                    continue
                pred = predictor.predict(boxes=boxes, embedding=ImageEmbedding({"image_embeddings": emb}, frame))
                for o, a, b in zip(objects, ref.masks, pred.masks):
                    records.append({"input": i, "key": key, "dataset": dataset, "condition": condition,
                                    "object": o.object_id,
                                    "candidate": v, "iou": round(iou(a, b), 6)})
            if (i + 1) % 6 == 0 or i + 1 == len(inputs):
                med = "  ".join(f"{n} {np.median(times[n]):.3f}" for n in names)
                print(f"  {time.strftime('%H:%M:%S')} {i + 1}/{len(inputs)} inputs; median s: {med}; "
                      f"load average {load_average()}", flush=True)
            if args.json:  # after every input: an interrupted run keeps a prefix that covers every dataset
                write_json(args.json, args, records, times, entry_bytes, read_times, notices, i + 1, len(inputs),
                           summarise(records, times, names[1:] + (["f16"] if stores else [])))

        summary = summarise(records, times, names[1:] + (["f16"] if stores else []))
        print(f"\nfinished {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; load average {load_average()}")
        print(f"reference fp32 engine: median {np.median(times['fp32']):.3f} s, min {min(times['fp32']):.3f} s per input")
        print_tables(summary, entry_bytes, read_times)
        for n in notices:
            print("notice:", n)
        if args.json:
            write_json(args.json, args, records, times, entry_bytes, read_times, notices, len(inputs), len(inputs),
                       summary)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
