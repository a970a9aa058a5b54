"""``napari-robustmedsam`` / ``python -m napari_robustmedsam.launch``: napari, ready to click.

Opens napari with the plugin docked, the embedded model (LiteMedSAM) loaded and an image shown:
``--image`` / ``--volume`` if given, else a real image from ``shared/data/medseg`` (searched upwards from
the current directory, beside the installed package, or ``$ROBUSTMEDSAM_SHARED_DATA``), else the plugin's
own synthetic MRI phantom. The image's embedding is computed in the background right away.

``--screenshot PATH`` saves a screenshot once the embedding is ready and quits (CI, docs).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DEFAULT_DATASET = "hc18_fetal_head_us"
DATASET_MODALITY = {
    "acdc_cardiac_mri": "mri",
    "dc1000_dental_caries_xray": "dental_xray",
    "drive_fundus_vessels": "fundus",
    "dsb2018_nuclei": "nuclei",
    "hc18_fetal_head_us": "ultrasound",
    "ph2_dermoscopy": "dermoscopy",
}


def find_shared_data(start: Path | None = None) -> Path | None:
    """``shared/data`` with a ``medseg`` folder: $ROBUSTMEDSAM_SHARED_DATA, then upwards from ``start``
    (default: the current directory), then upwards from the installed package."""
    env = os.environ.get("ROBUSTMEDSAM_SHARED_DATA")
    if env and (Path(env) / "medseg").is_dir():
        return Path(env)
    starts = [Path(start or Path.cwd()).resolve(), Path(__file__).resolve().parent]
    for base in starts:
        for root in (base, *base.parents):
            candidate = root / "shared" / "data"
            if (candidate / "medseg").is_dir():
                return candidate
    return None


def default_image(shared: Path | None, dataset: str = DEFAULT_DATASET) -> Path | None:
    if shared is None:
        return None
    images = sorted((shared / "medseg" / dataset / "images").glob("*.png"))
    return images[0] if images else None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="napari-robustmedsam", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--image", help="2D image file to annotate (PNG, JPEG, TIFF, NPY, a DICOM file...)")
    src.add_argument("--volume", help="3D volume to annotate: DICOM series folder or multi-frame file, NIfTI, NRRD, "
                     "MHA/MHD, TIFF stack, NPY (spacing, origin and direction kept)")
    src.add_argument("--phantom", action="store_true", help="use the synthetic MRI phantom even if real data is there")
    p.add_argument("--dataset", default=DEFAULT_DATASET, help=f"medseg dataset for the default image ({DEFAULT_DATASET})")
    p.add_argument("--model", default="litemedsam", help="registry model or checkpoint file (default: litemedsam)")
    p.add_argument("--device", default="auto", help="auto, cuda, mps or cpu")
    p.add_argument("--no-embed", action="store_true", help="do not start computing the embedding right away")
    p.add_argument("--screenshot", help="save a screenshot when ready, then quit")
    from .cli.volume_input import add_volume_options

    add_volume_options(p)
    return p.parse_args(argv)


def _load_image(args: argparse.Namespace):
    """(array, layer keyword arguments, modality or None, source description)."""
    from .cli.volume_input import read_input
    from .engine.windows import NO_WINDOW, WINDOW_KEY
    from .io import read_image
    from .io.medical import SOURCE_KEY, layer_kwargs
    from .sample_data import mri_phantom

    path = args.image or args.volume
    if path:
        arr, geometry, window = read_input(args, path)
        if args.volume and arr.ndim != 3:
            from .errors import ImageInputError

            raise ImageInputError(f"{args.volume} has shape {arr.shape}; --volume expects a 3D (Z, Y, X) volume")
        name = Path(path).name if Path(path).is_dir() else Path(path).stem.removesuffix(".nii")
        if geometry is not None:
            kwargs = layer_kwargs(geometry, arr.ndim)
        else:
            kwargs = {"name": name, "metadata": {SOURCE_KEY: str(path)}}
        kwargs["metadata"][WINDOW_KEY] = window.spec if window is not None else NO_WINDOW
        if window is not None:
            kwargs["contrast_limits"] = window.contrast_limits()
        return arr, kwargs, None, str(path)
    if not args.phantom:
        path = default_image(find_shared_data(), args.dataset)
        if path is not None:
            return (read_image(path), {"name": f"{args.dataset}/{path.stem}", "metadata": {SOURCE_KEY: str(path)}},
                    DATASET_MODALITY.get(args.dataset), str(path))
    image, _ = mri_phantom(256, seed=0)
    return image, {"name": "MRI phantom"}, "mri", "synthetic MRI phantom (napari_robustmedsam.sample_data)"


def main(argv=None) -> int:
    args = parse_args(argv)
    from .display_check import display_problem

    problem = display_problem()  # before Qt loads: a missing xcb library aborts the process with no advice
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    ready = setup(args)
    if isinstance(ready, int):
        return ready
    viewer, startup, fit = ready
    if args.screenshot:
        _screenshot_when_ready(viewer, startup, args.screenshot, fit)
    import napari

    napari.run()
    return 0


def setup(args: argparse.Namespace):
    """Everything :func:`main` does before the event loop: ``(viewer, startup, fit)``, or an exit code.

    The window shows the image and the docked plugin at once; the model loads and napari's numba code compiles in
    workers, and the annotator takes the image when they are done (:class:`Startup`; ``startup.ready`` once the
    embedding has started).
    ``fit()`` fits the image to the canvas again (see :func:`keep_view_fitted`)."""
    from .annotation.model_info import preimport_model_modules
    from .errors import UserFacingError

    # Before napari creates its OpenGL context (see preimport_model_modules: triton + Mesa).
    preimport_model_modules()
    try:
        image, layer_kwargs, modality, source = _load_image(args)
    except UserFacingError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    import napari

    from .widgets._common import ROLE_KEY

    viewer = napari.Viewer(title="RobustMedSAM")
    rgb = image.ndim == 3 and image.shape[-1] in (3, 4) and not args.volume
    # Marked as not for annotation until the drawing code is ready: the annotator creates its layers when it
    # takes an image, and that is where napari would compile on the GUI thread (see Startup).
    layer_kwargs = {**layer_kwargs, "metadata": {**layer_kwargs.get("metadata", {}), ROLE_KEY: Startup.PENDING}}
    layer = viewer.add_image(image, rgb=rgb, **layer_kwargs)
    print(f"image: {source} {image.shape} {image.dtype}")
    widget = _dock(viewer)
    widget.annotator._set_status(Startup.MESSAGE)
    viewer.window.resize(1500, 950)
    # The canvas gets its final size only once the window is laid out (dock, status texts): fit the image
    # again on every canvas resize until the user zooms or pans.
    fit = keep_view_fitted(viewer)
    startup = Startup(viewer, widget, layer, args, modality)
    startup.start()
    return viewer, startup, fit


class Startup:
    """The slow part of the launch, off the GUI thread, so that the window paints at once and never freezes.

    Two workers run side by side: the model loads, and napari's numba-compiled drawing code (box and mask
    layers) compiles on tiny data (:func:`~napari_robustmedsam.widgets.warmup.warm_napari_numba`). Without
    that warm-up napari compiles it on the GUI thread when the plugin creates its layers and at the first box:
    a black window, then a frozen one. The annotator takes the image once the drawing code is ready (its
    layers are then created at once), and the embedding starts once the model is there too.
    """

    MESSAGE = "Loading the model and preparing napari's drawing code (the first launch on a machine takes longest)…"
    PENDING = "image waiting for the launcher"

    def __init__(self, viewer, widget, layer, args: argparse.Namespace, modality: str | None) -> None:
        self.viewer, self.widget, self.layer, self.args, self.modality = viewer, widget, layer, args, modality
        self.model_done = False
        self._annotating = False
        self.ready = False
        self.error = None
        self.seconds: dict[str, float] = {}

    def start(self) -> None:
        import time

        from .widgets._common import run_task
        from .widgets._state import get_state
        from .widgets.warmup import warm_napari_numba

        self._t0 = time.perf_counter()
        self._overlay(self.MESSAGE)
        run_task(lambda handle: warm_napari_numba(), self._warmed, self._warm_failed, name="preparing napari")
        get_state(self.viewer).load_model(self.args.model, self.args.device, on_done=self._model_loaded,
                                          on_error=self._model_failed)

    def _overlay(self, text: str | None) -> None:
        """The launch message in napari's status bar (the panel's status line says it too).

        Not the canvas's text overlay: vispy renders each new glyph of it on the GUI thread, which froze the
        window right after its first paint (docs/results/first-use.md)."""
        self.viewer.status = text or "Ready"

    def _elapsed(self, what: str) -> None:
        import time

        self.seconds[what] = time.perf_counter() - self._t0

    def _warmed(self, _seconds) -> None:
        self._elapsed("drawing code ready")
        # The annotator's five layers, one per event-loop turn: made at once they froze the window (napari's
        # per-layer Qt controls and vispy visuals; docs/results/first-use.md).
        from .widgets.layers_ahead import layer_creation_steps

        self._make_layers(layer_creation_steps(self.viewer, self.layer))

    def _make_layers(self, steps: list) -> None:
        from qtpy.QtCore import QTimer

        if not steps:
            self._take_image()
            return
        try:
            steps.pop(0)()
        except Exception as err:  # noqa: BLE001 - only slower: set_image_layer makes what is missing at once
            print(f"note: preparing the annotator's layers ahead failed ({err}); they are made now", file=sys.stderr)
            steps.clear()
        QTimer.singleShot(0, lambda: self._make_layers(steps))

    def _take_image(self) -> None:
        from .widgets._common import ROLE_KEY

        self._elapsed("layers ready")
        self.layer.metadata.pop(ROLE_KEY, None)
        annotator = self.widget.annotator
        annotator.image_choice.refresh()
        annotator.set_image_layer(self.layer)
        self._annotating = True
        if self.modality:
            self.widget.preview.modality_combo.setCurrentText(self.modality)
            self.widget.sweep.modality_combo.setCurrentText(self.modality)
        annotator.select_prompt_layer()
        if not self.model_done:
            annotator._set_status("Loading the model…")
        else:
            annotator._set_status("")
        self._finish()

    def _warm_failed(self, err, tb) -> None:  # only slower: napari compiles on first use as it would anyway
        self._warmed(0.0)

    def _model_loaded(self, loaded) -> None:
        self._elapsed("model loaded")
        print(loaded.summary())
        self.model_done = True
        self._finish()

    def _model_failed(self, err, tb) -> None:
        print(f"error: {err}", file=sys.stderr)
        self.error = err
        self.model_done = True
        self._finish()

    def _finish(self) -> None:
        if not self._annotating or not self.model_done or self.ready:
            return
        annotator = self.widget.annotator
        if self.error is not None:
            self.widget.model_panel.banner.show_error(self.error)
        elif not self.args.no_embed and annotator.state.loaded is not None:
            annotator.compute_embeddings()
        annotator.select_prompt_layer()
        self._overlay(None)
        self.ready = True


def keep_view_fitted(viewer):
    """Fit the layers to the canvas now and again whenever the canvas changes size, until the user moves the
    camera (zoom or pan). Returns the function that fits (it returns False once the user took over).

    Why: ``reset_view`` uses the canvas size known at the time of the call; before the window is shown and laid
    out that is a provisional size, and docking the panel or a re-wrapped status text resizes the canvas later,
    which left the image zoomed in and cropped at the top-left.
    """
    state: dict = {}

    def view():
        scene = getattr(viewer, "scene", None)  # napari >= 0.9; viewer.camera before
        camera = scene.camera if scene is not None and hasattr(scene, "camera") else viewer.camera
        return tuple(round(float(v), 6) for v in camera.center), round(float(camera.zoom), 9)

    def fit(event=None) -> bool:
        if state.get("done"):
            return False
        if "view" in state and view() != state["view"]:  # the user zoomed or panned: leave the view alone
            state["done"] = True
            try:
                viewer.canvas.events.size.disconnect(fit)
            except Exception:
                pass
            return False
        viewer.reset_view()
        state["view"] = view()
        return True

    viewer.canvas.events.size.connect(fit)
    fit()
    return fit


def _dock(viewer):
    """Dock the plugin's main widget through npe2 (as a user would), or directly if not registered."""
    try:
        _, widget = viewer.window.add_plugin_dock_widget("napari-robustmedsam", "RobustMedSAM")
        return widget
    except Exception:
        from .widgets.main_widget import RobustMedSAMWidget

        widget = RobustMedSAMWidget(viewer)
        viewer.window.add_dock_widget(widget, name="RobustMedSAM", area="right")
        return widget


_KEEP: list = []


def _screenshot_when_ready(viewer, startup, path: str, fit=None) -> None:
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication

    from .widgets._common import any_task_running

    timer = QTimer()

    def check():
        if startup.ready and not any_task_running():
            timer.stop()
            for _ in range(3):  # let the layout settle (word-wrapped status texts resize the dock)
                QApplication.processEvents()
            if fit is not None:
                fit()
                QApplication.processEvents()
            viewer.screenshot(path, canvas_only=False)
            print(f"screenshot: {path}")
            viewer.close()

    timer.timeout.connect(check)
    timer.start(300)
    _KEEP.append(timer)


if __name__ == "__main__":
    sys.exit(main())
