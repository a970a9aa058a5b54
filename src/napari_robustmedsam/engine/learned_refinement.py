"""The ``learned`` click refinement: a small network re-decides a click's disk (``models/click_refiner.py``).

Use: ``--click-refinement learned`` (or ``learned-directed``) in the evaluation, or the annotator's Click refinement
row. The click refinement (``engine/click_refinement.py``) chooses the click's window and disk exactly as for the
random walker; this module turns that window into the network's input (:func:`window_inputs`, which training uses
too, so the network is trained on exactly what it sees here) and its output back into a foreground.

The weights ship in the package (``heads/click_refiner.pt``, provenance in ``heads/click_refiner.json``, rebuilt by
``python -m training.fit_refiner``). A refiner file is untrusted input like any checkpoint: it is read with the
project's safe loader, and a missing or mismatched file is a :class:`~napari_robustmedsam.errors.CheckpointError`
with one line saying what is wrong.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..checkpoints.safe_load import load_untrusted
from ..errors import CheckpointError

#: the format word a refiner file carries (``format`` key), checked on load
REFINER_FORMAT = "robustmedsam-click-refiner-1"
#: radius of a click's mark in the network's input, in input pixels
CLICK_MARK_RADIUS = 1.5
SHIPPED_REFINER = Path(__file__).resolve().parents[1] / "heads" / "click_refiner.pt"


def resize_square(arr: np.ndarray, size: int):
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    t = t.permute(2, 0, 1)[None] if t.ndim == 3 else t[None, None]
    return F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[0]


def window_inputs(window: np.ndarray, current: np.ndarray, disk: np.ndarray, seeds, size: int) -> np.ndarray:
    """The network's input (INPUT_CHANNELS, size, size) float32 for one click window.

    ``window`` (h, w, C) image values, ``current`` (h, w) bool mask shown now, ``disk`` (h, w) bool: where the mask
    may change, ``seeds``: the object's clicks in the window as (row, col, label) window pixels (a later click on a
    pixel wins)."""
    from ..models.click_refiner import INPUT_CHANNELS

    img = np.asarray(window, dtype=np.float32)
    if img.ndim == 2:
        img = img[..., None]
    img = img[..., :3]
    if img.shape[-1] < 3:
        img = np.repeat(img[..., :1], 3, axis=-1)
    img = (img - img.mean()) / max(float(img.std()), 1e-6)
    h, w = current.shape
    out = np.zeros((INPUT_CHANNELS, size, size), dtype=np.float32)
    # one resize for the image, the mask (-1 / +1) and the disk: bilinear resizing treats each channel alone
    stacked = np.concatenate([img, (current.astype(np.float32) * 2 - 1)[..., None], disk[..., None]], axis=-1)
    out[:5] = resize_square(stacked, size).numpy()
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    sy, sx = size / h, size / w
    for row, col, label in seeds:
        cy, cx = (row + 0.5) * sy - 0.5, (col + 0.5) * sx - 0.5
        mark = (yy - cy) ** 2 + (xx - cx) ** 2 <= CLICK_MARK_RADIUS ** 2
        out[5][mark] = 1.0 if label == 1 else 0.0
        out[6][mark] = 0.0 if label == 1 else 1.0
    return out


class LearnedRefiner:
    """A loaded click refiner: :meth:`decide` gives the foreground of one window."""

    def __init__(self, net, size: int) -> None:
        self.net = net.eval()
        self.size = size

    def logits(self, inputs: np.ndarray) -> np.ndarray:
        """(N, C, S, S) inputs -> (N, S, S) logits."""
        import torch

        with torch.inference_mode():
            return self.net(torch.from_numpy(np.ascontiguousarray(inputs)))[:, 0].numpy()

    def decide(self, window: np.ndarray, current: np.ndarray, disk: np.ndarray, seeds) -> np.ndarray:
        """(h, w) bool foreground over the window (the caller keeps only the disk's pixels)."""
        import torch
        import torch.nn.functional as F

        h, w = current.shape
        logits = self.logits(window_inputs(window, current, disk, seeds, self.size)[None])
        full = F.interpolate(torch.from_numpy(logits)[None], size=(h, w), mode="bilinear", align_corners=False)
        return full[0, 0].numpy() > 0


def refiner_state(net, extra: dict | None = None) -> dict:
    """What a refiner file holds: the format word, the architecture's settings and plain tensors."""
    from ..models.click_refiner import INPUT_SIZE

    return {"format": REFINER_FORMAT, "width": int(net.width), "input_size": INPUT_SIZE,
            "state_dict": {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}, **(extra or {})}


def load_refiner(path: str | os.PathLike) -> LearnedRefiner:
    """The refiner stored in ``path`` (safe loader; a missing, foreign or mismatched file: CheckpointError)."""
    from ..models.click_refiner import build_click_refiner

    path = Path(path)
    data = load_untrusted(path, what="click refiner", source_hint="python -m training.fit_refiner")
    if data.get("format") != REFINER_FORMAT:
        raise CheckpointError(f"{path} is not a click refiner file (format {data.get('format')!r}, expected "
                              f"{REFINER_FORMAT!r}); train one with python -m training.fit_refiner")
    try:
        width, size = int(data["width"]), int(data["input_size"])
        net = build_click_refiner(width)
        net.load_state_dict(data["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"click refiner {path} does not fit this version's network ({first}); "
                              "retrain it with python -m training.fit_refiner") from None
    if size % 4:
        raise CheckpointError(f"click refiner {path} has an input size of {size}; it must be divisible by 4")
    return LearnedRefiner(net, size)


@lru_cache(maxsize=4)
def _cached(path: str, stamp: tuple[int, int]) -> LearnedRefiner:
    return load_refiner(path)


def refiner_for(path: str | os.PathLike | None = None) -> LearnedRefiner:
    """The refiner at ``path`` (default: the one shipped in the package, or ``$ROBUSTMEDSAM_CLICK_REFINER``),
    loaded once per file version."""
    path = Path(path or os.environ.get("ROBUSTMEDSAM_CLICK_REFINER") or SHIPPED_REFINER)
    try:
        st = path.stat()
    except OSError:
        raise CheckpointError(f"click refiner not found: {path}; reinstall the package or set "
                              "ROBUSTMEDSAM_CLICK_REFINER to a file from python -m training.fit_refiner") from None
    return _cached(str(path), (st.st_size, st.st_mtime_ns))
