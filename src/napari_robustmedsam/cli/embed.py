"""`robustmedsam embed`: precompute and cache the embeddings of an image, a volume or a folder of images."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from ..models.input_conventions import PREPROCESSINGS as PREPROCESSING_CHOICES
from ..engine.cache import DEFAULT_STORAGE_DTYPE, STORAGE_DTYPES
from ..errors import ImageInputError
from .progress import stage
from .volume_input import add_volume_options, read_input


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "embed",
        help="precompute and cache image embeddings (2D image, every slice of a volume, or a folder)",
        description=(
            "Compute the image embeddings of INPUT once and store them in the embedding cache, so that "
            "segmenting it later (CLI or napari) starts at once. INPUT is a 2D image, a 3D volume "
            "(DICOM series folder, NIfTI, NRRD, MHA, TIFF stack, NPY: every slice along the first axis) or a "
            "folder of 2D images. CT is embedded under its window (--window). "
            "Embeddings already in the cache are verified (checksums of the arrays and of their metadata) and "
            "reused; corrupt ones are recomputed and counted in the summary."
        ),
    )
    p.add_argument("input", metavar="INPUT", help="2D image, 3D volume, DICOM folder or file, or a folder of 2D images")
    p.add_argument("--model", default="litemedsam", help="registry name (default: litemedsam, embedded) or checkpoint path")
    p.add_argument(
        "--cache",
        default=None,
        metavar="DIR",
        help="cache directory (default: $ROBUSTMEDSAM_CACHE_DIR/embeddings, else the user cache directory)",
    )
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cuda, mps or cpu")
    p.add_argument("--fast", action=argparse.BooleanOptionalAction, default=None, help="channels_last on the CPU (same embeddings; default: on for LiteMedSAM, off for ViT encoders; add --precision bf16 for more speed on CPUs with native bf16, at the price of changed masks)")
    p.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "fp32", "bf16", "fp16"),
        help="encoder precision (auto: fp32 on CPU, fp16 autocast on CUDA)",
    )
    p.add_argument(
        "--storage",
        default=DEFAULT_STORAGE_DTYPE,
        choices=STORAGE_DTYPES,
        help=f"dtype of the cached tensors (default {DEFAULT_STORAGE_DTYPE}: half the size of float32, "
        "masks within tolerance; float32 keeps the encoder's values exactly)",
    )
    p.add_argument(
        "--preprocessing",
        choices=PREPROCESSING_CHOICES,
        default=None,
        help="image preprocessing of a checkpoint that does not record it (default: recorded, else guessed)",
    )
    p.add_argument("--slices", default=None, metavar="A:B", help="only these slices of a volume (Python range, e.g. 10:20)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_volume_options(p)
    p.set_defaults(func=run)
    return p


def _parse_slices(text: str | None, n: int) -> list[int] | None:
    if text is None:
        return None
    try:
        parts = [int(v) if v.strip() else None for v in text.split(":")]
        if len(parts) == 1:
            idx = parts[0]
            return [idx % n] if idx is not None and -n <= idx < n else []
        return list(range(n))[slice(*parts)]
    except (ValueError, TypeError) as err:
        raise ImageInputError(f"--slices {text!r} is not a slice like 5, 10:20 or ::2") from err


def _check_values(array, source: Path, kind: str) -> None:
    """NaN/inf pixels and other unusable values are refused before the (slow) model load."""
    import numpy as np

    from ..engine.preprocessing import validate_image

    if kind == "image":
        validate_image(array)
    elif np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        raise ImageInputError(f"{source} has {bad} NaN/inf voxels; replace them (e.g. numpy.nan_to_num) before embedding")


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"  # pragma: no cover


def _checked_input(args: argparse.Namespace, source: Path):
    """(array, kind) of the input: an image or a volume read and checked (as the model sees it), or a folder of
    images ("series", array None) whose headers are checked, so that a damaged file is named before the model load."""
    from ..engine.windows import model_view
    from ..io.medical import is_medical_path

    array = None
    if not source.is_dir() or is_medical_path(source):
        array, _, window = read_input(args, source)
        if array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4)):
            kind = "image"
        elif array.ndim == 3 or (array.ndim == 4 and array.shape[-1] in (3, 4)):
            kind = "volume"
            if array.shape[0] == 0:
                raise ImageInputError(f"{source} is a volume with zero slices (shape {array.shape}); nothing to embed")
        else:
            raise ImageInputError(
                f"{source} holds an array of shape {array.shape}: give a 2D image, a 3D volume (Z, Y, X) or a folder"
            )
        _check_values(array, source, kind)
        array = model_view(array, window)
    else:
        from ..io.images import check_image_file, image_files

        kind = "series"
        for path in image_files(source):  # headers only
            check_image_file(path)
    return array, kind


def run(args: argparse.Namespace) -> int:
    from ..checkpoints import load_model
    from ..engine.embeddings import EmbeddingEngine

    source = Path(args.input)
    if not source.exists():
        raise ImageInputError(f"input not found: {source}")
    array, kind = _checked_input(args, source)  # before the (slow) model load
    with stage(f"loading model {args.model}"):
        loaded = load_model(args.model, device=args.device, preprocessing=args.preprocessing)
    engine = EmbeddingEngine(
        loaded,
        cache_dir=args.cache,
        precision=args.precision,
        cpu_fast=args.fast,
        storage_dtype=args.storage,
    )

    job = None
    if kind == "series":
        job = engine.series(source)
        total, unit = len(job), "image"
    elif kind == "image":
        total, unit = 1, "image"
    else:
        job = engine.volume(array)
        unit = "slice"
        slices = _parse_slices(args.slices, len(job))
        total = len(job) if slices is None else len(slices)
    print(f"embedding {kind} {source} with {loaded.name} on {engine.description}", file=sys.stderr, flush=True)
    if engine.cache is not None:
        print(f"cache: {engine.cache_dir}", file=sys.stderr)

    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit=unit, file=sys.stderr, dynamic_ncols=True)

    def progress(done: int, n: int, message: str = "") -> None:
        if bar is not None:
            if bar.total != n:
                bar.reset(total=n)
            bar.n = done
            bar.set_postfix_str(message, refresh=False)
            bar.refresh()

    start = time.perf_counter()
    try:
        if kind == "image":
            emb = engine.embed_image(np.asarray(array), progress=progress)
            n_tiles = len(emb) if hasattr(emb, "tiles") else 0
        elif kind == "volume":
            job.compute(slices=slices, progress=progress)
            n_tiles = 0
        else:
            job.compute(progress=progress)
            n_tiles = 0
    finally:
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - start
    stats = engine.stats
    reused = stats["from_disk"] + stats["from_memory"] + stats["already_cached"]
    n_done = stats["computed"]
    what = f"{n_done} computed, {reused} already in the cache"
    if stats["corrupt"]:  # every reused entry was verified in full; the corrupt ones were recomputed above
        what += f", {stats['corrupt']} corrupt cache {'entry' if stats['corrupt'] == 1 else 'entries'} found and recomputed"
    if n_tiles:
        what += f" ({n_tiles} tiles)"
    print(f"{kind} embedded in {elapsed:.1f} s: {what}")
    if engine.cache is not None:
        print(f"cache: {engine.cache_dir} ({_human(engine.cache_size())} on disk)")
    else:
        print("cache: not written (in memory only): " + (str(engine.cache_error) if engine.cache_error else "disabled"))
        return 1
    return 0
