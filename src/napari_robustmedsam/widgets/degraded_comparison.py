""""Segment on degraded" of the degradation preview: the annotator's prompts of the visible slice segmented on
the clean and on the degraded slice, shown as two mask layers and side by side with their Dice.

:class:`DegradedComparison` is the preview's (:class:`.degradation_preview.DegradationPreview`) comparison box;
the preview's ``segment_on_degraded`` runs it.
"""

from __future__ import annotations

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QGridLayout, QLabel, QWidget

from ..annotation.robustness import segment_on_degraded
from ..annotation.session import SlicePrompts
from ..errors import UserFacingError
from . import _render
from ._common import mark, run_task

CLEAN_MASK_NAME = "mask on clean"
DEGRADED_MASK_NAME = "mask on degraded"


class DegradedComparison(QWidget):
    """The clean and the degraded mask side by side (hidden until the first comparison), and the run behind it."""

    def __init__(self, preview) -> None:
        super().__init__()
        self.preview = preview
        self._handle = None
        self.clean_view = QLabel()
        self.degraded_view = QLabel()
        for view in (self.clean_view, self.degraded_view):
            view.setAlignment(Qt.AlignmentFlag.AlignCenter)
            view.setMinimumSize(120, 120)
        self.clean_caption = QLabel("clean")
        self.degraded_caption = QLabel("degraded")
        for caption in (self.clean_caption, self.degraded_caption):
            caption.setWordWrap(True)
            caption.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.dice_label = QLabel("")
        self.dice_label.setWordWrap(True)
        self.dice_label.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.dice_label.setStyleSheet("font-weight:bold;")
        grid = QGridLayout(self)
        grid.addWidget(self.clean_caption, 0, 0)
        grid.addWidget(self.degraded_caption, 0, 1)
        grid.addWidget(self.clean_view, 1, 0)
        grid.addWidget(self.degraded_view, 1, 1)
        grid.addWidget(self.dice_label, 2, 0, 1, 2)
        self.hide()

    def run(self):
        """Segment the annotator's prompts of the visible slice on the clean and the degraded slice, in a worker;
        the result is shown here, as two mask layers and in ``preview.last_result`` (``preview.compared`` fires)."""
        preview = self.preview
        annotator = preview.state.annotator
        preview.banner.clear_message()
        try:
            if annotator is None or annotator.session is None:
                raise UserFacingError("open the annotator on an image and segment an object first")
            layer, kind, z, image = preview._source()
            if layer is not annotator.image_layer:
                raise UserFacingError("the degradation preview works on the annotator's image: choose it there")
            prompts = annotator.session.current_prompts.get(z)
            layer_prompts = annotator.slice_prompts(z)
            if prompts is None or prompts.end or prompts.is_empty:
                prompts = layer_prompts
            if prompts.is_empty:
                raise UserFacingError(f"no prompts on slice {z}: draw a box or click points in the annotator first")
            settings = preview.settings()
            if settings["level"] == "LQ-3+" and settings["modality"] is None:
                raise UserFacingError("LQ-3+ adds the modality's domain artifacts: choose a modality")
        except UserFacingError as err:
            preview.banner.show_error(err)
            return None
        prompts = SlicePrompts(prompts.points, prompts.labels, prompts.box, "user")

        def run(loaded):
            embeddings = annotator.embeddings
            predictor = embeddings.predictor

            def work(handle):
                handle.report(0, 2, "clean embedding")
                clean_embedding = embeddings.get(z)
                handle.report(1, 2, "degraded embedding")
                return segment_on_degraded(
                    predictor, image, prompts, settings["name"], level=settings["level"],
                    severity=settings["severity"], seed=settings["seed"], modality=settings["modality"],
                    clean_embedding=clean_embedding, box_primary=bool(loaded.box_primary),
                )

            def done(result):
                preview.last_result = result
                self.show_result(layer, kind, z, result, image)
                preview.compared.emit(result)

            self._handle = run_task(work, done, lambda e, tb: preview.banner.show_error(e), name="segment on degraded",
                                    row=preview.task_row)

        preview.state.ensure_model(run, lambda e, tb: preview.banner.show_error(e), row=preview.task_row)
        return True

    def show_result(self, layer, kind: str, z: int, result, clean_image: np.ndarray) -> None:
        """The degraded slice and both masks as layers, and the two crops side by side with their Dice."""
        self.preview._show_degraded(layer, kind, z, result.degraded_image)
        self._show_mask_layers(layer, kind, z, result)
        limits = None if layer.rgb else tuple(layer.contrast_limits)
        ys, xs = _render.crop_box([result.clean_mask, result.degraded_mask], result.clean_mask.shape)
        clean_rgb = _render.overlay(_render.to_uint8(clean_image, limits), result.clean_mask, (0, 229, 255))
        degraded_rgb = _render.overlay(_render.to_uint8(result.degraded_image, limits), result.degraded_mask, (255, 140, 0))
        self.clean_view.setPixmap(_render.pixmap(clean_rgb[ys, xs], 150))
        self.degraded_view.setPixmap(_render.pixmap(degraded_rgb[ys, xs], 150))
        self.clean_caption.setText(f"clean: {int(result.clean_mask.sum())} px")
        self.degraded_caption.setText(f"{result.setting}: {int(result.degraded_mask.sum())} px")
        self.dice_label.setText(f"Dice clean vs degraded: {result.dice:.3f} (IoU {result.iou:.3f})")
        self.show()

    def _show_mask_layers(self, layer, kind: str, z: int, result) -> None:
        viewer = self.preview.viewer
        volume = kind in ("volume", "rgb_volume")
        scale, translate = tuple(layer.scale), list(layer.translate)
        if volume:
            translate[0] = translate[0] + z * scale[0]
        selected = viewer.layers.selection.active
        for name, mask, color in ((CLEAN_MASK_NAME, result.clean_mask, "#00e5ff"),
                                  (DEGRADED_MASK_NAME, result.degraded_mask, "#ff8c00")):
            data = (mask[None] if volume else mask).astype(np.uint8)
            if name in viewer.layers and viewer.layers[name].data.shape == data.shape:
                lay = viewer.layers[name]
                lay.data = data
                lay.translate = translate
            else:
                if name in viewer.layers:
                    viewer.layers.remove(viewer.layers[name])
                lay = mark(viewer.add_labels(data, name=name, scale=scale, translate=translate, opacity=0.6),
                           "comparison")
                try:
                    from napari.utils.colormaps import DirectLabelColormap

                    lay.colormap = DirectLabelColormap(color_dict={1: color, 0: "transparent", None: "transparent"})
                except Exception:
                    pass
                lay.contour = 2
        if selected is not None and selected in viewer.layers:
            viewer.layers.selection.active = selected
