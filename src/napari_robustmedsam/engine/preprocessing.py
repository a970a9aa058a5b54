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

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ImageInputError

PREPROCESSINGS = ("sam", "medsam", "litemedsam")
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
        x = F.interpolate(low_res_logits.float(), (self.model_size, self.model_size), mode="bilinear", align_corners=False)
        x = x[..., : self.input_size[0], : self.input_size[1]]
        return F.interpolate(x, self.original_size, mode="bilinear", align_corners=False)

    def mask_to_low_res(self, mask: np.ndarray | torch.Tensor, logit_scale: float = 8.0,
                        antialias: bool = False) -> torch.Tensor:
        """A binary mask (H, W) at the original size -> (1, 1, 256, 256) logits usable as a mask prompt.

        Used to turn a user's existing mask into a prompt; previous decoder logits are fed back as they are.
        ``antialias=True`` area-averages when shrinking, so thin structures keep a share of each cell they cross.
        """
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
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise ImageInputError(
            f"the image has {bad} NaN/inf pixels; replace them (e.g. numpy.nan_to_num) before segmenting"
        )
    if min(arr.shape[:2]) < 2:
        raise ImageInputError(
            f"image of size {arr.shape[0]} x {arr.shape[1]} px is too thin to segment: both sides need >= 2 px"
        )
    return arr


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


def _to_rgb_float(arr: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, 3) of any numeric dtype -> float32 (H, W, 3), gray repeated to RGB, values kept."""
    x = arr.astype(np.float32, copy=False)
    if x.ndim == 2:
        x = np.repeat(x[..., None], 3, axis=-1)
    return x


def _minmax(t: torch.Tensor) -> torch.Tensor:
    lo, hi = t.amin(), t.amax()
    span = hi - lo
    if float(span) <= 0:
        return torch.zeros_like(t)
    return (t - lo) / span


def _resize_longest(t: torch.Tensor, target: int) -> tuple[torch.Tensor, tuple[int, int]]:
    h, w = t.shape[-2:]
    scale = target / max(h, w)
    new_h, new_w = max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))
    out = F.interpolate(t, (new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
    return out, (new_h, new_w)


def preprocess(image: np.ndarray, preprocessing: str) -> tuple[torch.Tensor, ImageFrame]:
    """One 2D image -> (1, 3, S, S) float32 model input and its :class:`ImageFrame`."""
    if preprocessing not in PREPROCESSINGS:
        raise ValueError(f"unknown preprocessing {preprocessing!r}; expected one of {PREPROCESSINGS}")
    arr = validate_image(image)
    notice = no_signal_notice(arr)
    if notice:
        warnings.warn(notice, ImageSignalWarning, stacklevel=2)
    original_size = (int(arr.shape[0]), int(arr.shape[1]))
    t = torch.from_numpy(np.ascontiguousarray(_to_rgb_float(arr))).permute(2, 0, 1)[None]
    size = model_input_size(preprocessing)
    if preprocessing == "medsam":
        t = _minmax(t)
        t = F.interpolate(t, (size, size), mode="bilinear", align_corners=False, antialias=True)
        return t.clamp_(0, 1), ImageFrame(preprocessing, original_size, (size, size), size)
    if preprocessing == "litemedsam":
        t, input_size = _resize_longest(t, size)
        t = _minmax(t)
    else:  # sam: 0-255 scale; integer images other than uint8 are min-maxed to 0-255 first
        if arr.dtype != np.uint8:
            t = _minmax(t) * 255.0
        t, input_size = _resize_longest(t, size)
        mean = torch.tensor(_SAM_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(_SAM_STD).view(1, 3, 1, 1)
        t = (t - mean) / std
    t = F.pad(t, (0, size - input_size[1], 0, size - input_size[0]))
    return t.contiguous(), ImageFrame(preprocessing, original_size, input_size, size)
