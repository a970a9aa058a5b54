"""Screenshots of the README's quick start, taken from the real app driven as a user would drive it.

Run under a virtual screen (Debian/Ubuntu: ``bash scripts/install-system-deps.sh`` first)::

    xvfb-run -a -s "-screen 0 1600x1000x24" python scripts/make_screenshots.py [--out docs/images]

It launches ``napari-robustmedsam --phantom`` (the synthetic MRI phantom that ships with the plugin), then:
a box a little too large around the lesion, two negative clicks where the mask spills over, C (commit), the organ
around it as a second object, save; then
opens the phantom volume, boxes the organ on one slice and propagates it through the volume. Each step is
saved as ``quickstart_<n>_<step>.png``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(REPO / "docs" / "images"))
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from scipy import ndimage

    from napari_robustmedsam import launch
    from napari_robustmedsam.prompting import tight_box
    from napari_robustmedsam.sample_data import mri_phantom, mri_phantom_volume

    viewer, startup, fit = launch.setup(launch.parse_args(["--phantom"]))
    from app_pump import event_pump
    from qtpy.QtWidgets import QApplication

    pump_until, idle = event_pump()

    def shot(n: int, step: str) -> None:
        idle()
        for _ in range(3):
            QApplication.processEvents()
        path = out / f"quickstart_{n}_{step}.png"
        viewer.screenshot(str(path), canvas_only=False)
        print(f"wrote {path}")

    pump_until(lambda: startup.ready)
    widget = startup.widget
    annotator = widget.annotator
    fit()
    shot(1, "launch")

    _, truth = mri_phantom(256, seed=0)  # the launcher's phantom: its ground truth tells where to click
    lesion, organ = truth == 2, truth >= 1
    # a box drawn a little too large around the bright lesion: the mask spills onto the tissue around it
    y0, x0 = np.argwhere(lesion).min(0)
    y1, x1 = np.argwhere(lesion).max(0) + 1
    annotator.add_box([x0 - 20, y0 - 20, x1 + 20, y1 + 20])
    shot(2, "box")

    # negative clicks on the spill, each where what is left of it is thickest
    for _ in range(2):
        spill = (np.asarray(annotator.current_layer.data) > 0) & ~lesion
        if not spill.any():
            break
        depth = ndimage.distance_transform_edt(spill)
        y, x = np.unravel_index(int(np.argmax(depth)), depth.shape)
        annotator.add_point(float(x), float(y), positive=False)
        idle()
        print(f"negative click at ({x}, {y}): {annotator.status.text()}")  # the README quotes what it says
    shot(3, "click")

    annotator.commit()
    annotator.add_box(tight_box(organ))  # the organ around it: a second object, in its own colour
    idle()
    annotator.commit()
    shot(4, "commit")

    widget.show_tab("export")
    with tempfile.TemporaryDirectory() as tmp:
        widget.export.save(Path(tmp) / "phantom_labels.tif")
        shot(5, "save")
    widget.show_tab("annotate")

    volume, volume_truth = mri_phantom_volume(16, 256, seed=0)
    layer = viewer.add_image(volume, name="phantom volume")  # a newly opened image becomes the target
    pump_until(lambda: annotator.image_layer is layer)
    annotator.compute_embeddings()  # "Compute embeddings": every slice once, so that propagation does not wait
    idle()
    z = 8
    viewer.dims.set_current_step(0, z)
    annotator.add_box(tight_box(volume_truth[z] >= 1), z=z)
    shot(6, "volume_box")

    done = []
    annotator.propagated.connect(lambda result: done.append(result))
    annotator.propagate()
    pump_until(lambda: bool(done))
    viewer.dims.set_current_step(0, 4)
    shot(7, "volume_propagated")
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
