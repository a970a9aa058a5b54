"""`robustmedsam segment`: one image (or one slice of a volume), box or point prompts -> mask file."""

from __future__ import annotations

import argparse
import warnings

import numpy as np

from ..models.input_conventions import PREPROCESSINGS
from ..errors import CacheError, ImageInputError, UserFacingError
from ..io.output_paths import add_overwrite_argument, check_output, existing_file
from .progress import message, stage
from .volume_input import add_volume_options, read_input


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "segment",
        help="segment an image with box or point prompts and write a mask",
        description=(
            "Segment IMAGE with box and/or point prompts. Coordinates are (x, y) pixels of the original image. "
            "Each --box is one object (label 1, 2, ...); points without a box make one object. A one-object mask "
            "is written as 0/255 (--label-values: 0/1). An object that comes out empty writes nothing and exits 1 "
            "unless --allow-empty. The image embedding is cached, so a second call on the same image is quicker."
        ),
    )
    p.add_argument("image", help="PNG/JPG/TIFF/NPY image, a DICOM file, or a volume (DICOM folder, NIfTI, NRRD, MHA, TIFF) with --slice")
    p.add_argument("--box", nargs=4, type=float, action="append", metavar=("X0", "Y0", "X1", "Y1"), help="box prompt (repeatable: one object each)")
    p.add_argument("--point", nargs=2, type=float, action="append", metavar=("X", "Y"), default=[], help="positive point (repeatable)")
    p.add_argument("--negative", nargs=2, type=float, action="append", metavar=("X", "Y"), default=[], help="negative point (repeatable)")
    p.add_argument("--model", default="litemedsam", help="registry name (default: litemedsam, embedded) or checkpoint path")
    p.add_argument("--slice", type=int, default=None, metavar="Z", help="slice index of a 3D volume (first axis)")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cuda, mps or cpu")
    p.add_argument(
        "--preprocessing",
        choices=PREPROCESSINGS,
        default=None,
        help="image preprocessing of a checkpoint that does not record it (default: recorded, else guessed)",
    )
    p.add_argument("-o", "--output", help="mask file to write (.png, .tif, .npy, .nii.gz, .nrrd, .mha); NIfTI/NRRD/MHA "
                   "keep the image's geometry (a volume's slice is written as a one-slice volume at its place)")
    p.add_argument("--into", metavar="LABELS", help="with --slice: write the masks into slice Z of this full-volume label "
                   "file (NIfTI/NRRD/MHA on the image's grid; created if missing, other slices and labels kept)")
    p.add_argument(
        "--label-values",
        action="store_true",
        help="write a one-object mask as 0/1 (label value 1) instead of 0/255; several objects are always 1, 2, ...",
    )
    p.add_argument("--allow-empty", action="store_true", help="write the mask and exit 0 even when an object comes out empty")
    p.add_argument(
        "--cache",
        default=None,
        metavar="DIR",
        help="embedding cache directory (default: $ROBUSTMEDSAM_CACHE_DIR/embeddings, else the user cache directory); "
        "a second call on the same image reads its embedding from there",
    )
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the embedding cache")
    add_overwrite_argument(p)
    add_volume_options(p)
    p.set_defaults(func=run)


def select_plane(array: np.ndarray, slice_index: int | None) -> np.ndarray:
    """Pick the 2D plane to segment: (H, W) / (H, W, 3|4) as is; a volume needs a slice index."""
    is_2d = array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))
    if is_2d:
        if slice_index is not None:
            raise ImageInputError(f"--slice was given but the image is 2D (shape {array.shape})")
        return array
    if array.ndim in (4, 5) and slice_index is None:
        raise ImageInputError(
            f"a {array.ndim}D array of shape {array.shape} has no single plane to segment: "
            "reduce it to a 3D volume or 2D image first, then choose a slice with --slice Z"
        )
    if array.ndim != 3:
        raise ImageInputError(f"cannot segment a {array.ndim}D array of shape {array.shape}; give a 2D image or a 3D volume with --slice")
    if slice_index is None:
        raise ImageInputError(f"the input is a 3D volume of shape {array.shape}: choose the slice to segment with --slice Z (0..{array.shape[0] - 1})")
    if not 0 <= slice_index < array.shape[0]:
        raise ImageInputError(f"--slice {slice_index} is outside the volume's 0..{array.shape[0] - 1}")
    return array[slice_index]


# value of a one-object mask's foreground: visible in any image viewer (label value 1 looks all black)
BINARY_FOREGROUND = 255


def point_warning(model_name: str, has_box: bool) -> str:
    """What to tell a user who gives points to a model trained with box prompts only."""
    if has_box:
        return (
            f"warning: {model_name} was trained with box prompts only: the points may make the box's mask worse; "
            "drop them, or use a model fine-tuned for clicks"
        )
    return (
        f"warning: {model_name} was trained with box prompts only: points alone give poor or empty masks; "
        "give a --box X0 Y0 X1 Y1 around the object"
    )


def _prompts_from_args(args: argparse.Namespace):
    """(points (1, P, 2), labels (1, P), boxes (N, 4)) from the command line, each None when not given; a prompt
    or destination that cannot work is refused here, before anything is read."""
    from ..io.images import check_mask_format

    if not args.box and not args.point and not args.negative:
        raise ImageInputError("no prompt given: add --box X0 Y0 X1 Y1 or --point X Y")
    if args.negative and not args.point and not args.box:
        raise ImageInputError("only negative points were given: add a --point or a --box for the object")
    if not args.output and not args.into:
        raise UserFacingError("say where the masks go: -o MASK_FILE, or --into LABELS with --slice Z")
    if args.into and args.slice is None:
        raise UserFacingError("--into writes one slice of a volume's label file: give the slice with --slice Z")
    points = [*args.point, *args.negative]
    labels = [1] * len(args.point) + [0] * len(args.negative)
    boxes = np.asarray(args.box, dtype=np.float64) if args.box else None
    point_arg = label_arg = None
    if points:
        if boxes is not None and len(boxes) > 1:
            raise ImageInputError("points with several --box prompts are ambiguous: use one box per call with points, or boxes only")
        point_arg, label_arg = np.asarray(points)[None], np.asarray(labels)[None]
    if args.output:
        check_output(args.output, inputs=[args.image, existing_file(args.model)], overwrite=args.overwrite)
        check_mask_format(args.output)
    if args.into:  # updating the label file is what --into is for; it may still never be an input
        check_output(args.into, inputs=[args.image, existing_file(args.model)], overwrite=True)
        check_mask_format(args.into)
    return point_arg, label_arg, boxes


def _engine(loaded, args: argparse.Namespace):
    """The embedding engine of ``loaded`` with the command's cache choice; without a cache when it cannot open."""
    from ..engine.embeddings import EmbeddingEngine, open_engine

    notices: list[str] = []
    engine = open_engine(loaded, args.cache, notices=notices, use_cache=not args.no_cache)
    if engine is None:  # the cache could not be opened (the notice says why): the same embedding, computed
        message(f"note: {notices[-1]}")
        engine = EmbeddingEngine(loaded, use_cache=False)
    return engine


def _uses_exported_decoder(args: argparse.Namespace, model_image: np.ndarray) -> bool:
    """Whether this call may decode with an exported decoder: the cache is in use, the decoder runs on the CPU
    (``--device auto`` decodes there too: a decoder call is tens of milliseconds) and the image is not tiled."""
    from ..engine.exported_decoder import onnxruntime_available
    from ..engine.tile_layout import needs_tiling

    return (not args.no_cache and args.device in ("auto", "cpu") and not needs_tiling(model_image.shape[:2])
            and onnxruntime_available())


def _decode_exported(args: argparse.Namespace, model_image: np.ndarray, point_arg, label_arg, boxes):
    """(masks, scores, fell back) decoded without torch, when the image's embedding is cached and the model's decoder
    was exported for these prompts (:mod:`..engine.exported_decoder`); None when that is not so."""
    if not _uses_exported_decoder(args, model_image):
        return None
    from ..engine import exported_decoder as exported
    from ..engine.cache import EmbeddingCache, EmbeddingStore
    from ..engine.preprocessing import frame_for, validate_image
    from ..engine.prompt_checks import check_prompts
    from ..engine.signature import Signature, image_fields

    cache = EmbeddingCache(args.cache, check_writable=False)  # only read here
    cache_dir = cache.directory
    record = exported.read_record(cache_dir, exported.record_key(args.model, args.preprocessing, args.device))
    if record is None:
        return None
    image = validate_image(model_image)
    points, labels, bxs = check_prompts(point_arg, label_arg, boxes, image_size=image.shape[:2], allow_empty=True)
    n_objects = bxs.shape[0] if bxs is not None else points.shape[0]
    decoder = exported.ExportedDecoder(cache_dir, record)
    if not decoder.has(exported.prompt_setup(points, bxs)):
        return None
    signature = Signature.from_json({**record.signature, **image_fields(image)})
    store_path = cache.path_for(signature)
    if not store_path.is_dir():
        return None
    try:
        store = EmbeddingStore.open(store_path, signature, 1)
    except CacheError:  # the torch path opens it again and says why it cannot
        return None
    got = store.read_arrays(0, frame_for(image.shape[:2], record.preprocessing))
    for notice in store.notices:
        message(f"note: {notice}")
    if got is None:
        return None
    arrays, frame, _ = got
    if record.box_primary and point_arg is not None:
        message(point_warning(record.model_name, has_box=boxes is not None))
    message("image embedding read from the cache")
    try:
        with stage(f"decoding with the exported decoder of {record.model_name} (ONNX Runtime)"):
            masks, scores = decoder.decode(arrays["image_embeddings"], frame, points, labels, bxs)
    except Exception as err:  # noqa: BLE001 - a broken export only costs the quick path: torch decodes instead
        message(f"note: the exported decoder could not be used ({err}); decoding with the model instead")
        return None
    return masks, scores, np.zeros(n_objects, dtype=bool)


def _export_decoder(args: argparse.Namespace, loaded, engine, model_image: np.ndarray, point_arg, boxes) -> None:
    """Export the model's decoder for these prompts, once, so that a later call on a cached image needs no torch."""
    if not _uses_exported_decoder(args, model_image) or engine.cache_dir is None:
        return
    from ..engine import exported_decoder as exported
    from ..engine.decoder_export import export_for_cache, qualifies
    from ..engine.preprocessing import validate_image

    if not qualifies(loaded):
        return
    key = exported.record_key(args.model, args.preprocessing, args.device)
    setup = exported.prompt_setup(point_arg, boxes)
    record = exported.read_record(engine.cache_dir, key)
    if record is not None and setup in record.graphs:
        return
    signature = engine.signature(validate_image(model_image)).to_json()
    try:
        with stage(f"exporting the decoder of {loaded.name} for quicker calls on cached images"):
            export_for_cache(loaded, signature, setup, engine.cache_dir, key, record)
    except Exception as err:  # noqa: BLE001 - the masks are written; later calls keep decoding with torch
        message(f"note: the decoder was not exported ({err}); later calls decode with the model")


def _embedding(args: argparse.Namespace, model_image: np.ndarray, point_arg, label_arg, boxes):
    """(loaded model, engine, embedding, where it came from) of the image the model sees."""
    from ..checkpoints import load_model
    from ..engine.preprocessing import ImageSignalWarning
    from ..engine.tiling import embedding_for_prompts, needs_tiling

    # An image seen before has its embedding in the cache: then the model is loaded without its image encoder,
    # which skips the encoder's build and imports (most of a call's time, docs/results/cli-cache.md)
    tiled = needs_tiling(model_image.shape[:2])
    reuse = not args.no_cache and not tiled
    with stage(f"loading model {args.model}"):
        loaded = load_model(args.model, device=args.device, preprocessing=args.preprocessing, image_encoder=not reuse)
    engine = _engine(loaded, args)
    if engine.predictor.box_primary and point_arg is not None:
        message(point_warning(loaded.name, has_box=boxes is not None))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ImageSignalWarning)  # run() said it once, before the model load
        embedding = engine.load_cached(model_image) if reuse else None
        if embedding is not None:
            return loaded, engine, embedding, "read from the cache"
        if not loaded.model.has_image_encoder:
            with stage("loading its image encoder (this image is not in the cache yet)"):
                loaded = load_model(args.model, device=args.device, preprocessing=args.preprocessing)
            engine = _engine(loaded, args)
        with stage(f"image embedding on {engine.device.type}"):
            if tiled:
                # a large image is embedded only in the tiles its prompts fall in (bounded memory, full
                # resolution); those tiles depend on the prompts, so they are not cached
                embedding = embedding_for_prompts(engine.predictor, model_image, point_arg, label_arg, boxes)
            else:
                embedding = engine.embed_image(model_image)
    if tiled:
        return loaded, engine, embedding, "computed for the prompted tiles"
    return loaded, engine, embedding, "computed" if engine.stats["computed"] else "read from the cache"


def run(args: argparse.Namespace) -> int:
    from ..engine.preprocessing import no_signal_notice, validate_image
    from ..engine.prompt_checks import check_prompts
    from ..io import write_mask
    from ..io.images import write_slice_into
    from ..io.medical import refuse_source_overwrite

    # Everything that can be checked without the model is checked first: a mistake costs no model load.
    point_arg, label_arg, boxes = _prompts_from_args(args)
    n_objects = 1 if boxes is None else len(boxes)
    volume, geometry, window = read_input(args)
    for target in (args.output, args.into):
        if target:
            refuse_source_overwrite(target, geometry)  # also a file inside the DICOM folder being annotated
    image = validate_image(select_plane(volume, args.slice))
    check_prompts(point_arg, label_arg, boxes, image_size=image.shape[:2])
    signal = no_signal_notice(image)
    if signal:
        message(f"robustmedsam segment: warning: {signal}")

    model_image = window.apply(image) if window is not None else image
    decoded = _decode_exported(args, model_image, point_arg, label_arg, boxes)
    export_later = None
    if decoded is not None:
        masks, scores, fell_back_rows = decoded
        preferred_rows = np.zeros(0, dtype=bool)  # the exported decoder serves only models without a base model
    else:
        loaded, engine, embedding, source = _embedding(args, model_image, point_arg, label_arg, boxes)
        message(f"image embedding {source}")
        prediction = engine.tiled_predictor.predict(points=point_arg, point_labels=label_arg, boxes=boxes,
                                                    embedding=embedding)
        masks, scores, fell_back_rows = prediction.masks, prediction.scores, prediction.fell_back
        preferred_rows = prediction.base_preferred
        export_later = (loaded, engine, model_image)
    label_map = np.zeros(masks.shape[1:], dtype=np.uint16 if n_objects > 255 else np.uint8)
    for index, mask in enumerate(masks, start=1):
        label_map[mask & (label_map == 0)] = index
    fell_back = set(np.flatnonzero(fell_back_rows) + 1) if fell_back_rows.size else set()
    preferred = set(np.flatnonzero(preferred_rows) + 1) if preferred_rows.size else set()
    for index, (mask, score) in enumerate(zip(masks, scores), start=1):
        note = (" (the head's mask was empty: this is LiteMedSAM's mask, its empty-mask fallback)" if index in fell_back
                else " (LiteMedSAM scored its mask higher than the head's: this is LiteMedSAM's mask, the head's box "
                "check)" if index in preferred else "")
        print(f"object {index}: {int(mask.sum())} px, predicted IoU {score:.3f}{note}")
    empty = [index for index, mask in enumerate(masks, start=1) if not mask.any()]
    if empty and not args.allow_empty:
        which = "the object" if n_objects == 1 else "object " + ", ".join(str(i) for i in empty)
        hint = "draw a --box around it" if boxes is None else "check that the box encloses it"
        message(
            f"robustmedsam segment: error: {which} came out empty, nothing was written: {hint}, "
            "or pass --allow-empty to write the mask anyway"
        )
        return 1
    if args.output:
        out_geometry = geometry
        if geometry is not None and args.slice is not None and volume.ndim == 3:
            out_geometry = geometry.slab(args.slice)
        mask_file = label_map
        if n_objects == 1 and not args.label_values:
            mask_file = np.where(label_map > 0, BINARY_FOREGROUND, 0).astype(np.uint8)
        write_mask(args.output, mask_file, out_geometry, inputs=[args.image], overwrite=True)  # checked above
        print(f"wrote {args.output}")
    if args.into:  # a label volume: objects keep their label values
        write_slice_into(args.into, label_map, args.slice, volume.shape, geometry)
        print(f"wrote slice {args.slice} of {args.into}")
    if export_later is not None:  # after the masks are written: nothing here can cost the user the result
        _export_decoder(args, *export_later, point_arg, boxes)
    return 0
