"""`robustmedsam demo`: the main job end to end on the embedded default, offline.

Segments one image with a box prompt taken from its ground truth, prints the Dice, and writes the mask
and an overlay picture. Uses a real image from ../shared/data/medseg when it is there (developers and
CI), else the plugin's own synthetic MRI phantom.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from ..io.output_paths import add_overwrite_argument, check_output_folder, existing_file


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("demo", help="segment a sample image with the embedded model and show the result")
    p.add_argument("--image", default=None, help="image file (its mask is looked up in ../masks/ with the same name)")
    p.add_argument("--model", default="litemedsam", help="registry name or checkpoint (default: embedded LiteMedSAM)")
    p.add_argument("--device", default="auto")
    p.add_argument("-o", "--output", default="robustmedsam-demo", help="folder for mask.png and overlay.png")
    add_overwrite_argument(p)
    p.set_defaults(func=run)


def _find_real_image() -> Path | None:
    for root in (Path.cwd(), *Path.cwd().parents[:2]):
        candidate = root / "shared" / "data" / "medseg" / "hc18_fetal_head_us" / "images"
        if candidate.is_dir():
            images = sorted(candidate.glob("*.png"))
            if images:
                return images[0]
    return None


def run(args: argparse.Namespace) -> int:
    from ..checkpoints import load_model
    from ..engine.predictor import Predictor
    from ..io import read_image, write_mask
    from ..sample_data import mri_phantom
    from .segment import BINARY_FOREGROUND

    path = Path(args.image) if args.image else _find_real_image()
    mask_path = path.parent.parent / "masks" / path.name if path is not None else None
    out = check_output_folder(args.output, ["mask.png", "overlay.png"],
                              inputs=[path, mask_path, existing_file(args.model)], overwrite=args.overwrite)
    if path is not None:
        image = read_image(path)
        truth = read_image(mask_path) > 0 if mask_path.exists() else None
        source = str(path)
    else:
        image, labels = mri_phantom(256, seed=0)
        truth = labels > 0
        source = "synthetic MRI phantom (napari_robustmedsam.sample_data)"
    if truth is None or not truth.any():
        print("no ground-truth mask next to the image: using a box around the central half", file=sys.stderr)
        h, w = image.shape[:2]
        box = np.array([w / 4, h / 4, 3 * w / 4, 3 * h / 4])
    else:
        ys, xs = np.nonzero(truth)
        box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=float)

    print(f"image: {source} {image.shape} {image.dtype}")
    loaded = load_model(args.model, device=args.device)
    print(loaded.summary())
    predictor = Predictor.from_loaded(loaded)
    predictor.set_image(image)
    prediction = predictor.predict(boxes=box)
    mask = prediction.masks[0]
    # 0/255: visible in any viewer; the folder was checked above, before any work
    write_mask(out / "mask.png", mask.astype(np.uint8) * BINARY_FOREGROUND, overwrite=True)
    _overlay(image, mask, box, out / "overlay.png")
    print(f"box {box.tolist()} -> {int(mask.sum())} px, predicted IoU {prediction.scores[0]:.3f}")
    if truth is not None:
        d = 2 * np.logical_and(mask, truth).sum() / max(1, mask.sum() + truth.sum())
        print(f"Dice against the ground truth: {d:.3f}")
    print(f"wrote {out / 'mask.png'} and {out / 'overlay.png'}")
    return 0


def _overlay(image: np.ndarray, mask: np.ndarray, box: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io import atomic_write_path

    fig, ax = plt.subplots(figsize=(6, 6 * image.shape[0] / image.shape[1]))
    ax.imshow(image, cmap="gray")
    ax.imshow(np.ma.masked_where(~mask, mask), cmap="autumn", alpha=0.45)
    x0, y0, x1, y1 = box
    ax.add_patch(plt.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, color="cyan", lw=1.5))
    ax.set_axis_off()
    with atomic_write_path(path) as tmp:
        fig.savefig(tmp, dpi=100, bbox_inches="tight", format="png")
    plt.close(fig)
