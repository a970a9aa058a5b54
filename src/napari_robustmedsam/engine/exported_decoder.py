"""Decode a cached embedding with an exported prompt decoder (ONNX Runtime), without importing torch.

How it is used: ``robustmedsam segment`` exports a plain model's prompt encoder and mask decoder to ONNX the first
time it decodes with them on the CPU (:mod:`.decoder_export`), into ``decoders/`` of the
embedding cache directory. A later call on an image whose embedding is cached then reads the embedding, runs the
exported decoder with ONNX Runtime and writes the mask: it never imports torch, whose import alone takes most of a
call that builds the model (docs/results/cli-cache.md).

What is exported, and when it is used:
- one graph per prompt set-up (:func:`prompt_setup`): a box, points, points and a box; one object per box and any
  number of points; a single point alone asks for three candidate masks, as the torch path does;
- only for plain decoders (LiteMedSAM, SAM, MedSAM and fusions with their decoder): a robust or prompt-guided head
  and an empty-mask fallback decode through torch;
- a record (``<key>.json``) names the model as the command line gave it, the checkpoint file's size and
  modification time, the cache signature of the embeddings the decoder reads, and a checksum of each graph. A
  changed checkpoint, a different package version, a corrupt or missing graph: the record is not used, the call
  goes through torch and exports again.

The masks are the torch path's: the same logits, chosen by the same rule, brought to the original resolution by
the same bilinear resampling (:func:`resize_bilinear`); tests compare the two paths mask for mask.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .decode_limits import DEFAULT_DECODE_CHUNK
from .preprocessing import LOW_RES_SIZE, ImageFrame
from .signature import IMAGE_FIELDS

#: Bump when a record or graph made by an older version can no longer be read the same way.
RECORD_FORMAT = 1
#: The sub-directory of the embedding cache directory that holds the exported decoders.
DECODERS_DIR = "decoders"
INPUT_EMBEDDINGS = "image_embeddings"
INPUT_POINTS = "point_coords"
INPUT_LABELS = "point_labels"
INPUT_BOXES = "boxes"
OUTPUT_NAMES = ("low_res_logits", "iou_predictions")


def prompt_setup(points: np.ndarray | None, boxes: np.ndarray | None) -> str:
    """Name of the graph that decodes these prompts (points (N, P, 2), boxes (N, 4), either None): ``box``,
    ``points``, ``points+box``; one object with a single point alone (an ambiguous prompt) is ``point-multimask``,
    decoded with three candidates as the predictor does."""
    if points is not None and boxes is not None:
        return "points+box"
    if boxes is not None:
        return "box"
    return "point-multimask" if points.shape[0] == 1 and points.shape[1] == 1 else "points"


def record_key(model: str, preprocessing: str | None, device: str) -> str:
    """What a record is found by: the model as given (a file by its absolute path), the preprocessing override,
    the device option and the package version (an update exports again)."""
    from .. import __version__

    path = Path(model).expanduser()
    where = str(path.resolve()) if path.is_file() else model
    text = json.dumps([where, preprocessing, device, __version__, RECORD_FORMAT])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def file_stamp(path: str | os.PathLike) -> dict:
    """Size and modification time of a file: a checkpoint rewritten or replaced gets a new stamp."""
    st = os.stat(path)
    return {"path": str(Path(path).resolve()), "size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}


def file_checksum(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def signature_template(signature_json: dict) -> dict:
    """A model's embedding signature without the image's own fields (filled in per image)."""
    return {k: v for k, v in signature_json.items() if k not in IMAGE_FIELDS}


@dataclass
class DecoderRecord:
    """What ``<cache dir>/decoders/<key>.json`` holds."""

    key: str
    model_name: str
    box_primary: bool
    preprocessing: str
    checkpoint: dict  # file_stamp() of the checkpoint the decoder came from
    signature: dict  # signature_template() of the embeddings it reads
    graphs: dict  # prompt setup -> {"file": name, "sha256": checksum}
    format: int = RECORD_FORMAT

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "DecoderRecord":
        return cls(key=str(d["key"]), model_name=str(d["model_name"]), box_primary=bool(d["box_primary"]),
                   preprocessing=str(d["preprocessing"]), checkpoint=dict(d["checkpoint"]),
                   signature=dict(d["signature"]), graphs=dict(d["graphs"]), format=int(d["format"]))


def decoders_dir(cache_dir: str | os.PathLike) -> Path:
    return Path(cache_dir) / DECODERS_DIR


def record_path(cache_dir: str | os.PathLike, key: str) -> Path:
    return decoders_dir(cache_dir) / f"{key}.json"


def read_record(cache_dir: str | os.PathLike, key: str) -> DecoderRecord | None:
    """The record of ``key`` if it exists, parses, and its checkpoint is the one on disk now; else None."""
    path = record_path(cache_dir, key)
    try:
        with open(path, "rb") as fh:
            record = DecoderRecord.from_json(json.load(fh))
        if record.format != RECORD_FORMAT or record.key != key:
            return None
        if file_stamp(record.checkpoint["path"]) != record.checkpoint:
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return record


def write_record(cache_dir: str | os.PathLike, record: DecoderRecord) -> Path:
    from ..io.atomic import atomic_write_path

    path = record_path(cache_dir, record.key)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write_path(path) as tmp:
        Path(tmp).write_text(json.dumps(record.to_json(), indent=1))
    return path


def onnxruntime_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("onnxruntime") is not None


# ------------------------------------------------------------------------------------------------
# logits -> masks at the original resolution
# ------------------------------------------------------------------------------------------------
def _axis(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of torch's bilinear resampling along one axis (``align_corners=False``, no
    antialiasing): output pixel i reads the input at (i + 0.5) * n_in / n_out - 0.5, clamped at 0. The scale is a
    float32 quotient and the position is rounded to float32 once (a fused multiply-add), as torch's CPU kernel
    computes them: the weights are then torch's to the bit."""
    scale = np.float64(np.float32(n_in) / np.float32(n_out))
    src = np.maximum((np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5, 0.0).astype(np.float32)
    i0 = np.minimum(src.astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = src - i0.astype(np.float32)
    return i0, i1, (np.float32(1) - w1), w1


def resize_bilinear(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(..., h, w) float32 -> (..., H, W), as ``torch.nn.functional.interpolate(x, size, mode="bilinear",
    align_corners=False)`` computes it (to float32 rounding)."""
    h, w = x.shape[-2:]
    if (h, w) == tuple(size):
        return x
    r0, r1, rw0, rw1 = _axis(h, size[0])
    c0, c1, cw0, cw1 = _axis(w, size[1])
    # in torch's order, wy0 * (wx0 * a + wx1 * b) + wy1 * (wx0 * c + wx1 * d): across the columns first
    cols = x[..., c0] * cw0 + x[..., c1] * cw1
    return cols[..., r0, :] * rw0[:, None] + cols[..., r1, :] * rw1[:, None]


def logits_to_masks(frame: ImageFrame, low_res: np.ndarray) -> np.ndarray:
    """(n, 1, 256, 256) logits -> (n, H, W) boolean masks, as ``predictor.masks_at_original`` makes them: to the
    model's input size, cropped to the unpadded image, to the original size, positive logits."""
    x = low_res[:, 0].astype(np.float32, copy=False)
    if x.shape[-1] != frame.model_size:
        x = resize_bilinear(x, (frame.model_size, frame.model_size))
    x = x[..., : frame.input_size[0], : frame.input_size[1]]
    return resize_bilinear(x, frame.original_size) > 0


# ------------------------------------------------------------------------------------------------
# decoding
# ------------------------------------------------------------------------------------------------
class ExportedDecoder:
    """The exported graphs of one record, run with ONNX Runtime on the CPU."""

    def __init__(self, cache_dir: str | os.PathLike, record: DecoderRecord) -> None:
        self.directory = decoders_dir(cache_dir)
        self.record = record
        self._sessions: dict = {}

    def has(self, setup: str) -> bool:
        entry = self.record.graphs.get(setup)
        return entry is not None and (self.directory / entry["file"]).is_file()

    def _session(self, setup: str):
        if setup not in self._sessions:
            import onnxruntime as ort

            entry = self.record.graphs[setup]
            path = self.directory / entry["file"]
            data = path.read_bytes()
            if hashlib.sha256(data).hexdigest() != entry["sha256"]:
                raise ValueError(f"exported decoder {path.name} does not match its checksum")
            options = ort.SessionOptions()
            options.log_severity_level = 4  # failures are raised; ONNX Runtime's own log is not for the user
            self._sessions[setup] = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        return self._sessions[setup]

    def decode(self, embeddings: np.ndarray, frame: ImageFrame, points: np.ndarray | None, labels: np.ndarray | None,
               boxes: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """(masks (N, H, W) bool at the original size, predicted IoU of each (N,)) for N objects; prompts in original
        pixels as the predictor takes them: points (N, P, 2) with labels (N, P), boxes (N, 4)."""
        n = boxes.shape[0] if boxes is not None else points.shape[0]
        session = self._session(prompt_setup(points, boxes))
        h, w = frame.original_size
        masks = np.empty((n, h, w), dtype=bool)
        scores = np.empty(n, dtype=np.float32)
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        for start in range(0, n, DEFAULT_DECODE_CHUNK):
            part = slice(start, min(n, start + DEFAULT_DECODE_CHUNK))
            feeds = {INPUT_EMBEDDINGS: embeddings}
            if points is not None:
                feeds[INPUT_POINTS] = frame.points_to_model(points[part]).astype(np.float32)
                feeds[INPUT_LABELS] = np.asarray(labels[part], dtype=np.int64)
            if boxes is not None:
                feeds[INPUT_BOXES] = frame.boxes_to_model(boxes[part]).astype(np.float32)
            low_res, iou = session.run(list(OUTPUT_NAMES), feeds)
            if not (np.isfinite(low_res).all() and np.isfinite(iou).all()):
                raise ValueError("the exported decoder gave NaN/inf values")
            best = iou.argmax(axis=1)
            rows = np.arange(low_res.shape[0])
            chosen = low_res[rows, best][:, None]
            if chosen.shape[-1] != LOW_RES_SIZE:
                raise ValueError(f"the exported decoder gave {chosen.shape[-1]} px logits, expected {LOW_RES_SIZE}")
            masks[part] = logits_to_masks(frame, chosen)
            scores[part] = iou[rows, best]
        return masks, scores
