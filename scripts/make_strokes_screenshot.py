"""The screenshot of docs/annotator.md's "Strokes" section: a positive and a negative stroke on a real image.

Run under a virtual screen, from the repository root (the real images are in ../shared/data/medseg)::

    xvfb-run -a -s "-screen 0 1600x1000x24" python scripts/make_strokes_screenshot.py [--out docs/images/strokes.png]

It launches ``napari-robustmedsam --image`` on a PH2 dermoscopy image, boxes the lesion with a box too large on the
left and cut short on the right (the mask misses the right part), sets Click refinement to graph-cut, draws a
positive stroke across the missed part, then a negative stroke across where the mask spills out of the lesion
(else across its top edge), as a user would with the ``stroke prompts`` layer, and saves the window. The lesion's
outline is only used to place the box and the strokes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
IMAGE = REPO.parent / "shared" / "data" / "medseg" / "ph2_dermoscopy" / "images" / "IMD002.png"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image", default=str(IMAGE))
    p.add_argument("--out", default=str(REPO / "docs" / "images" / "strokes.png"))
    args = p.parse_args()
    image_path = Path(args.image)
    from PIL import Image

    truth = np.asarray(Image.open(image_path.parent.parent / "masks" / image_path.name)) > 0

    from scipy import ndimage

    from napari_robustmedsam import launch

    viewer, startup, fit = launch.setup(launch.parse_args(["--image", str(image_path)]))
    from app_pump import event_pump
    from qtpy.QtWidgets import QApplication

    pump_until, idle = event_pump()

    pump_until(lambda: startup.ready)
    annotator = startup.widget.annotator
    fit()
    idle()
    ys, xs = np.nonzero(truth)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    cut = int(x1 - 0.3 * (x1 - x0))  # the box stops short of the lesion's right part
    annotator.refine_combo.setCurrentText("graph-cut")
    annotator.add_box([max(x0 - 60, 0), max(y0 - 30, 0), cut, y1])
    idle()
    print("box:", int((np.asarray(annotator.current_layer.data) > 0).sum()), "px, spill",
          int(((np.asarray(annotator.current_layer.data) > 0) & ~truth).sum()))

    # positive: from inside the mask across the missed part, along the lesion's middle row band
    missed = truth & ~(np.asarray(annotator.current_layer.data) > 0)
    rows = np.nonzero(missed[:, cut:].any(axis=1))[0]
    yc = int(np.median(rows))
    band = [int(np.percentile(rows, q)) for q in (30, 50, 70)]
    right = [int(np.nonzero(missed[y])[0].max()) for y in band]
    plus = [[cut - 40, band[0]], [(cut + right[1]) // 2, yc], [right[2] - 15, band[2]]]
    annotator.add_stroke(plus, positive=True)
    idle()

    # negative: across where the mask spills out of the lesion (thickest spill), else along the mask's inside
    mask = np.asarray(annotator.current_layer.data) > 0
    spill = mask & ~truth
    print("after the positive stroke: spill", int(spill.sum()), "px;", annotator.status.text())
    if spill.sum() > 30:
        depth = ndimage.distance_transform_edt(spill)
        y, x = np.unravel_index(int(np.argmax(depth)), depth.shape)
        minus = [[x - 30, y - 20], [x, y], [x + 30, y + 20]]
    else:
        my, mx = np.nonzero(mask)
        top = int(np.percentile(my, 10))
        minus = [[int(np.percentile(mx, 30)), top - 25], [int(np.percentile(mx, 60)), top + 20]]
    annotator.add_stroke(minus, positive=False)
    idle()
    print(annotator.status.text())
    viewer.layers.selection.active = annotator.strokes_layer  # the path tool shown in the layer controls
    idle()
    for _ in range(3):
        QApplication.processEvents()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(str(out), canvas_only=False)
    # 256 colours (octree keeps the strokes' red and green): about a quarter of the size
    Image.open(out).convert("RGB").quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(out, optimize=True)
    print(f"wrote {out}: {annotator.status.text()}")
    viewer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
