"""Keep a corrective click's effect where the user clicked (FocalClick's "progressive merge").

Why: with the previous logits fed back, the decoder re-predicts the whole object on every click, so a click on
one edge can also move another edge the user had already accepted; on degraded images these far-away changes
are a main reason why Dice sometimes falls from one click to the next. Here only the changed regions that touch a
new click are taken from the new prediction; everything else keeps the previous logits (Chen et al., FocalClick,
CVPR 2022, Sec. 3.4). The merge works on the low-resolution logits, so the mask shown and the logits fed back at
the next click stay one and the same.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np
import torch

T = TypeVar("T")

#: 8-connectivity: a diagonal step joins two changed pixels into one region
_EIGHT = np.ones((3, 3), dtype=bool)


def changed_regions_at_clicks(previous: np.ndarray, new: np.ndarray, clicks: np.ndarray, radius: int = 1) -> np.ndarray:
    """Boolean map of the pixels whose label changed from ``previous`` to ``new`` (2D bool masks) and that are
    connected to a click. ``clicks`` are (K, 2) (x, y) pixel positions on the same grid; a changed region counts
    as touching a click when it reaches into the (2 radius + 1)^2 window around it (rounding to the low-resolution
    grid can put a click one pixel off the region it caused)."""
    changed = previous != new
    out = np.zeros_like(changed)
    if not changed.any() or clicks is None or len(clicks) == 0:
        return out
    from scipy import ndimage  # only when a click is corrected: a one-box command-line call never needs it

    regions, _ = ndimage.label(changed, structure=_EIGHT)
    h, w = changed.shape
    touched: set[int] = set()
    for x, y in np.asarray(clicks, dtype=np.float64).reshape(-1, 2):
        cx = min(max(int(np.floor(x)), 0), w - 1)
        cy = min(max(int(np.floor(y)), 0), h - 1)
        window = regions[max(cy - radius, 0) : cy + radius + 1, max(cx - radius, 0) : cx + radius + 1]
        touched.update(int(v) for v in np.unique(window) if v)
    if touched:
        out = np.isin(regions, sorted(touched))
    return out


def paste_new_logits(
    previous_logits: torch.Tensor,
    new_logits: torch.Tensor,
    clicks: Sequence[T | None],
    keep: Callable[[T, np.ndarray, np.ndarray], np.ndarray],
) -> torch.Tensor:
    """Previous logits (N, 1, L, L), with the new logits pasted where ``keep(clicks[i], previous_fg, new_fg)`` is
    True for object i (boolean (L, L) maps of the two masks in, a boolean map out); an object whose ``clicks[i]``
    is None keeps its new logits whole. Shared by the local merge and the click guard (:mod:`.click_guard`), so both
    keep the previous logits, not only the previous label, wherever they refuse a change."""
    if previous_logits.shape != new_logits.shape:
        raise ValueError(f"previous logits {tuple(previous_logits.shape)} and new logits {tuple(new_logits.shape)} differ")
    if len(clicks) != new_logits.shape[0]:
        raise ValueError(f"{len(clicks)} click sets for {new_logits.shape[0]} objects")
    prev = previous_logits.to(device=new_logits.device, dtype=new_logits.dtype)
    out = new_logits.clone()
    prev_fg = (prev[:, 0] > 0).cpu().numpy()
    new_fg = (new_logits[:, 0] > 0).cpu().numpy()
    for i, entry in enumerate(clicks):
        if entry is not None:
            kept = torch.from_numpy(keep(entry, prev_fg[i], new_fg[i])).to(out.device)
            out[i, 0] = torch.where(kept, new_logits[i, 0], prev[i, 0])
    return out


def merge_local_correction(
    previous_logits: torch.Tensor,
    new_logits: torch.Tensor,
    clicks: Sequence[np.ndarray | None],
    radius: int = 1,
) -> torch.Tensor:
    """Previous logits, with the new logits pasted where the label changed in a region touching the object's new
    clicks. ``previous_logits``/``new_logits``: (N, 1, L, L); ``clicks``: one (K, 2) array of (x, y) positions on
    the L x L grid per object, or None to keep that object's new logits whole. A click the new prediction did not
    act on (its pixel and neighbours unchanged) leaves the object's mask as it was."""
    return paste_new_logits(previous_logits, new_logits, clicks,
                            lambda pts, prev_fg, new_fg: changed_regions_at_clicks(prev_fg, new_fg, pts, radius))
