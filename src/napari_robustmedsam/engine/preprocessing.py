"""Image preprocessing and prompt coordinate frames of the SAM family.

The three conventions differ, and a mismatch does not crash: it silently ruins masks.
- ``sam``: longest side to 1024, 0-255 intensities normalised by SAM's pixel mean/std, pad bottom/right.
- ``medsam``: resize to 1024 x 1024 ignoring aspect ratio, min-max to [0, 1], no padding.
- ``litemedsam``: longest side to 256, min-max to [0, 1] over the resized image, pad bottom/right.

Prompts are given in original-image pixel coordinates (x, y), as napari and the CLI give them, and
mapped to the model frame here; masks are mapped back to the original size here too.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..errors import ImageInputError
from ..models.input_conventions import PREPROCESSINGS

if TYPE_CHECKING:
    import torch

# torch is imported where tensors are made: the geometry and the checks here serve the CLI's exported-decoder
# path too, which decodes a cached embedding without importing torch (docs/embeddings.md)

LOW_RES_SIZE = 256  # decoder logits and mask prompts: 4 x the 64 x 64 embedding grid, for every model
_SAM_MEAN = (123.675, 116.28, 103.53)
_SAM_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class ImageFrame:
    """Geometry linking an original image to the model's square input."""

    preprocessing: str
    original_size: tuple[int, int]  # (H, W) of the user's image
    input_size: tuple[int, int]  # (h, w) of the resized image inside the model input (before padding)
    model_size: int  # side of the square model input

    @property
    def scale_xy(self) -> tuple[float, float]:
        h, w = self.original_size
        return self.input_size[1] / w, self.input_size[0] / h

    def points_to_model(self, points: np.ndarray) -> np.ndarray:
        """(..., 2) array of (x, y) original pixel coordinates -> model input coordinates."""
        sx, sy = self.scale_xy
        out = np.asarray(points, dtype=np.float64).copy()
        out[..., 0] *= sx
        out[..., 1] *= sy
        return out

    def boxes_to_model(self, boxes: np.ndarray) -> np.ndarray:
        """(..., 4) array of (x0, y0, x1, y1) -> model input coordinates."""
        b = np.asarray(boxes, dtype=np.float64)
        return self.points_to_model(b.reshape(*b.shape[:-1], 2, 2)).reshape(b.shape)

    def logits_to_original(self, low_res_logits: torch.Tensor) -> torch.Tensor:
        """(N, C, 256, 256) decoder logits -> (N, C, H, W) logits at the original resolution."""
        import torch.nn.functional as F

        x = F.interpolate(low_res_logits.float(), (self.model_size, self.model_size), mode="bilinear", align_corners=False)
        x = x[..., : self.input_size[0], : self.input_size[1]]
        return F.interpolate(x, self.original_size, mode="bilinear", align_corners=False)

    def mask_to_low_res(self, mask: np.ndarray | torch.Tensor, logit_scale: float = 8.0,
                        antialias: bool = False) -> torch.Tensor:
        """A binary mask (H, W) at the original size -> (1, 1, 256, 256) logits usable as a mask prompt.

        Used to turn a user's existing mask into a prompt; previous decoder logits are fed back as they are.
        ``antialias=True`` area-averages when shrinking, so thin structures keep a share of each cell they cross.
        """
        import torch
        import torch.nn.functional as F

        m = torch.as_tensor(np.asarray(mask), dtype=torch.float32)[None, None]
        m = F.interpolate(m, self.input_size, mode="bilinear", align_corners=False, antialias=antialias)
        m = F.pad(m, (0, self.model_size - self.input_size[1], 0, self.model_size - self.input_size[0]))
        m = F.interpolate(m, (LOW_RES_SIZE, LOW_RES_SIZE), mode="bilinear", align_corners=False)
        return (m * 2.0 - 1.0) * logit_scale


def model_input_size(preprocessing: str) -> int:
    return 256 if preprocessing == "litemedsam" else 1024


def validate_image(image: np.ndarray) -> np.ndarray:
    """Check a 2D image (H, W), (H, W, 3) or (H, W, 4 with alpha dropped) and return (H, W) or (H, W, 3)."""
    arr = np.asarray(image)
    if arr.size == 0:
        raise ImageInputError("the image is empty (a dimension has size 0)")
    if arr.ndim == 3 and arr.shape[-1] == 4:
        arr = arr[..., :3]  # RGBA: alpha carries no anatomy; drop it
    elif arr.ndim == 3 and arr.shape[-1] == 2:
        raise ImageInputError(f"image of shape {arr.shape} looks like 2 channels; give gray (H, W) or RGB (H, W, 3)")
    if arr.ndim == 3 and arr.shape[-1] != 3:
        raise ImageInputError(
            f"a {arr.ndim}D array of shape {arr.shape} is not a 2D image: pick a slice (--slice Z for a volume) "
            "or give (H, W) gray / (H, W, 3) RGB"
        )
    if arr.ndim not in (2, 3):
        raise ImageInputError(
            f"a {arr.ndim}D array of shape {arr.shape} is not a 2D image: choose a slice/channel first "
            "(e.g. --slice Z, or index the array) so that it is (H, W) or (H, W, 3)"
        )
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ImageInputError(f"unsupported pixel type {arr.dtype}; use an integer or float image")
    if np.issubdtype(arr.dtype, np.floating) and not _all_finite(arr):
        bad = sum(int((~np.isfinite(block)).sum()) for block in _row_blocks(arr))
        raise ImageInputError(
            f"the image has {bad} NaN/inf pixels; replace them (e.g. numpy.nan_to_num) before segmenting"
        )
    if min(arr.shape[:2]) < 2:
        raise ImageInputError(
            f"image of size {arr.shape[0]} x {arr.shape[1]} px is too thin to segment: both sides need >= 2 px"
        )
    return arr


# Rows per block when a large image is scanned or converted piece by piece (bounded temporary arrays).
_BLOCK_PIXELS = 1 << 22
# Values whose magnitude exceeds this overflow float32 arithmetic (a span, a * 255) or come near it.
_FLOAT32_SAFE_MAGNITUDE = 1e30
# Below this span relative to the magnitude, float32 (24-bit mantissa) keeps too few distinct intensity levels.
_FLOAT32_MIN_RELATIVE_SPAN = 1e-3
# Below this span, float32 flushes the differences to zero or subnormals.
_FLOAT32_MIN_SPAN = 1e-30


def _row_blocks(arr: np.ndarray):
    rows = max(1, _BLOCK_PIXELS // max(1, int(np.prod(arr.shape[1:]))))
    for r0 in range(0, arr.shape[0], rows):
        yield arr[r0:r0 + rows]


def _all_finite(arr: np.ndarray) -> bool:
    """``np.isfinite(arr).all()`` without a full-size temporary (large images are scanned in row blocks)."""
    return all(bool(np.isfinite(block).all()) for block in _row_blocks(arr))


def model_values(arr: np.ndarray) -> np.ndarray:
    """The image with values float32 holds faithfully, for the float32 model input.

    Every preprocessing min-maxes any image that is not uint8, and min-max is unchanged by an affine map of the
    values. So an image whose values float32 cannot carry (beyond its range, so small that they flush to zero,
    or a small signal on a large offset) is min-maxed to [0, 1] here, in float64, one row block at a time; any
    other image is returned as it is.
    """
    if arr.dtype == np.uint8 or arr.dtype.itemsize <= 2:
        return arr
    lo_value, hi_value = arr.min(), arr.max()
    lo, hi = float(lo_value), float(hi_value)
    magnitude = max(abs(lo), abs(hi))
    # integers: the span in exact integer arithmetic (2**60 + 3 - 2**60 is 3, not float64's 0)
    integer = np.issubdtype(arr.dtype, np.integer) and int(hi_value) - int(lo_value) < 2**63
    span = float(int(hi_value) - int(lo_value)) if integer else hi - lo
    faithful = magnitude <= _FLOAT32_SAFE_MAGNITUDE and (
        span == 0 or (span >= _FLOAT32_MIN_SPAN and span >= magnitude * _FLOAT32_MIN_RELATIVE_SPAN)
    )
    if faithful:
        return arr
    out = np.empty(arr.shape, dtype=np.float32)
    if span == 0:  # a constant image: min-max gives zeros
        scale, offset = 0.0, 0.0
    elif not np.isfinite(span):  # lo and hi within float64, their difference not: to [-0.5, 0.5]
        scale, offset = 0.5 / magnitude, 0.0
    else:
        scale, offset = 1.0 / span, (0.0 if integer else -lo / span)
    done = 0
    for block in _row_blocks(arr):
        if integer:  # subtract the minimum before leaving the integers, where it is exact
            block = (block.astype(np.int64) - np.int64(lo_value)) if arr.dtype != np.uint64 else block - lo_value
        out[done:done + block.shape[0]] = block.astype(np.float64) * scale + offset
        done += block.shape[0]
    return out


def _to_float_tensor(arr: np.ndarray) -> torch.Tensor:
    """(H, W) or (H, W, 3) -> float32 (1, C, H, W) with C = 1 for gray (expanded to RGB after resizing, which
    gives the same values at a third of the memory) or 3."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(model_values(arr)).astype(np.float32, copy=False))
    return x[None, None] if x.ndim == 2 else x.permute(2, 0, 1)[None]


def _rgb(t: torch.Tensor) -> torch.Tensor:
    return t.expand(-1, 3, -1, -1) if t.shape[1] == 1 else t


class ImageSignalWarning(UserWarning):
    """The image carries no signal to segment: every pixel has the same value."""


def no_signal_notice(image: np.ndarray) -> str | None:
    """A sentence saying the image is constant (nothing to segment in it), or None when it varies."""
    arr = np.asarray(image)
    if arr.size == 0:
        return None
    low, high = arr.min(), arr.max()
    if low != high:
        return None
    value = low.item() if hasattr(low, "item") else low
    return (
        f"every pixel of the image has the value {value:g}: it carries no signal, so any mask predicted on it is "
        "meaningless; check the file, the slice or the window"
    )


def _minmax(t: torch.Tensor) -> torch.Tensor:
    lo, hi = t.amin(), t.amax()
    span = hi - lo
    if float(span) <= 0:
        return t.new_zeros(t.shape)
    return (t - lo) / span


def _longest_side_to(h: int, w: int, target: int) -> tuple[int, int]:
    scale = target / max(h, w)
    return max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))


def frame_for(shape_hw: tuple[int, int], preprocessing: str) -> ImageFrame:
    """The :class:`ImageFrame` that :func:`preprocess` gives an image of ``shape_hw`` (H, W)."""
    size = model_input_size(preprocessing)
    h, w = int(shape_hw[0]), int(shape_hw[1])
    input_size = (size, size) if preprocessing == "medsam" else _longest_side_to(h, w, size)
    return ImageFrame(preprocessing, (h, w), input_size, size)


def _resize_longest(t: torch.Tensor, target: int) -> tuple[torch.Tensor, tuple[int, int]]:
    import torch.nn.functional as F

    new_h, new_w = _longest_side_to(*t.shape[-2:], target)
    out = F.interpolate(t, (new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
    return out, (new_h, new_w)


def preprocess(image: np.ndarray, preprocessing: str) -> tuple[torch.Tensor, ImageFrame]:
    """One 2D image -> (1, 3, S, S) float32 model input and its :class:`ImageFrame`."""
    import torch
    import torch.nn.functional as F

    if preprocessing not in PREPROCESSINGS:
        raise ValueError(f"unknown preprocessing {preprocessing!r}; expected one of {PREPROCESSINGS}")
    arr = validate_image(image)
    notice = no_signal_notice(arr)
    if notice:
        warnings.warn(notice, ImageSignalWarning, stacklevel=2)
    original_size = (int(arr.shape[0]), int(arr.shape[1]))
    t = _to_float_tensor(arr)
    size = model_input_size(preprocessing)
    if preprocessing == "medsam":
        t = _minmax(t)
        t = F.interpolate(t, (size, size), mode="bilinear", align_corners=False, antialias=True)
        return _checked(_rgb(t.clamp_(0, 1))), ImageFrame(preprocessing, original_size, (size, size), size)
    if preprocessing == "litemedsam":
        t, input_size = _resize_longest(t, size)
        t = _minmax(t)
    else:  # sam: 0-255 scale; integer images other than uint8 are min-maxed to 0-255 first
        if arr.dtype != np.uint8:
            t = _minmax(t) * 255.0
        t, input_size = _resize_longest(t, size)
        mean = torch.tensor(_SAM_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(_SAM_STD).view(1, 3, 1, 1)
        t = (_rgb(t) - mean) / std
    t = F.pad(_rgb(t), (0, size - input_size[1], 0, size - input_size[0]))
    return _checked(t), ImageFrame(preprocessing, original_size, input_size, size)


def _checked(t: torch.Tensor) -> torch.Tensor:
    """The model input, contiguous, refused if any value is not finite (the values the model would see)."""
    import torch

    t = t.contiguous()
    if not bool(torch.isfinite(t).all()):
        raise ImageInputError(
            "preprocessing the image gave NaN/inf values: its intensities are outside what float32 holds; "
            "rescale the image (e.g. to 0..1) before segmenting"
        )
    return t
