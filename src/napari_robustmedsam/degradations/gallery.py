"""Contact sheet: every applicable degradation at every level on one picture, to check by eye that each
one looks like the artifact it names. Rows = types, columns = clean, LQ-1, LQ-2, LQ-3 (and LQ-3+ when the
modality has domain artifacts); each panel shows its SSIM to the clean image."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ._io import atomic_path
from .apply import degrade
from .base import to_unit
from .calibrate import ssim
from .modality import modality_degradations, normalize_modality
from .registry import degradation_class, list_degradations


def gallery_types(modality: str | None) -> list[str]:
    """Rows of the sheet: the modality's types (general, modality, domain, extra) or all types."""
    if modality is None:
        return list_degradations()
    groups = modality_degradations(modality)
    return list(dict.fromkeys(groups["general"] + groups["modality"] + groups["domain"] + groups["extra"]))


def _display(arr: np.ndarray, kind: str) -> np.ndarray:
    return arr[arr.shape[0] // 2] if kind == "volume" else arr


def render_gallery(
    image: Any,
    path: str | os.PathLike,
    modality: str | None = None,
    seed: int = 0,
    types: list[str] | None = None,
    title: str | None = None,
    cell_inches: float = 1.9,
    dpi: int = 100,
    progress: bool = False,
    overwrite: bool = False,
) -> Path:
    """Render the contact sheet of `image` to `path` (PNG). Volumes show their middle slice.

    An existing `path` is replaced only with ``overwrite=True`` (checked before rendering)."""
    from ..io.output_paths import check_output

    out_path = check_output(path, overwrite=overwrite)
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    names = [degradation_class(n).name for n in (types or gallery_types(modality))]
    clean_unit, layout = to_unit(image)
    has_plus = modality is not None and bool(modality_degradations(modality)["domain"])
    levels = ["LQ-1", "LQ-2", "LQ-3"] + (["LQ-3+"] if has_plus else [])
    columns = ["clean"] + levels
    fig, axes = plt.subplots(
        len(names), len(columns), figsize=(cell_inches * len(columns) + 0.6, cell_inches * len(names) + 0.5),
        squeeze=False,
    )
    cmap = None if layout.kind == "rgb" else "gray"
    clean_show = _display(clean_unit, layout.kind)
    rows = names
    if progress:
        from tqdm import tqdm

        rows = tqdm(names, desc="gallery", unit="type")
    for r, name in enumerate(rows):
        for c, col in enumerate(columns):
            ax = axes[r, c]
            if col == "clean":
                shown, label = clean_show, "clean"
            else:
                out = degrade(image, name, col, seed=seed, modality=modality if col == "LQ-3+" else None)
                unit = _rescale(out, layout)
                shown = _display(unit, layout.kind)
                label = f"{col}  SSIM {ssim(clean_unit, unit, layout.kind):.2f}"
            ax.imshow(np.clip(shown, 0, 1), cmap=cmap, vmin=0.0, vmax=1.0, interpolation="antialiased")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(label, fontsize=7, pad=2)
            if c == 0:
                ax.set_ylabel(f"{name}\n({degradation_class(name).family})", fontsize=7)
    head = title or f"degradations - modality: {normalize_modality(modality)}"
    fig.suptitle(f"{head}  (seed {seed})", fontsize=9)
    fig_height = cell_inches * len(names) + 0.5
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig_height), h_pad=0.3, w_pad=0.2)
    try:
        buffer = io.BytesIO()
        fig.savefig(buffer, dpi=dpi, format="png")
    finally:
        plt.close(fig)
    buffer.seek(0)
    with Image.open(buffer) as sheet:
        # compact PNG: 8-bit gray for gray images, RGB without alpha for colour ones (no palette: its
        # posterisation would look like an artifact)
        sheet = sheet.convert("L") if layout.kind != "rgb" else sheet.convert("RGB")
        with atomic_path(out_path) as tmp:
            sheet.save(tmp, format="PNG", optimize=True)
    return out_path


def _rescale(out: np.ndarray, layout) -> np.ndarray:
    """Map a degraded image to the clean image's unit space (same low/high), for display and SSIM."""
    arr = out[..., :3] if layout.alpha is not None else out
    return ((arr.astype(np.float32) - layout.low) / (layout.high - layout.low)).astype(np.float32)
