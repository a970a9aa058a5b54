"""Which image layer the annotator works on: the image combo box follows napari's layer list (a newly opened
image becomes the annotated one, a removed one stops being it), and only the annotated image and its committed
objects stay visible. The annotator (:class:`.annotator.AnnotatorWidget`) holds one as ``image_choice``."""

from __future__ import annotations

from qtpy.QtCore import QTimer

from ._common import role_of, unwrap


def is_image(layer) -> bool:
    """An image layer the user opened (not one of the plugin's own layers)."""
    from napari.layers import Image

    return isinstance(layer, Image) and role_of(layer) is None


class ImageLayerChoice:
    """The annotator's image combo box and the visibility of the images' layers (see the module docstring)."""

    def __init__(self, widget) -> None:
        self.w = widget

    def image_layers(self) -> list:
        return [layer for layer in self.w.viewer.layers if is_image(layer)]

    def refresh(self, event=None) -> None:
        """The combo box lists the image layers again; ``event``: a layer was inserted (napari's event)."""
        w, combo = self.w, self.w.image_combo
        current = w.image_layer
        combo.blockSignals(True)
        combo.clear()
        for layer in self.image_layers():
            combo.addItem(layer.name)
        if current is not None and current in w.viewer.layers:
            combo.setCurrentText(current.name)
        combo.blockSignals(False)
        # a newly opened image becomes the one annotated (the user opened it to annotate it)
        if event is not None and combo.count() and is_image(unwrap(getattr(event, "value", None))):
            if w.set_image_layer(unwrap(event.value)):
                # napari makes the inserted layer active after this callback: give the prompt layer back after it
                QTimer.singleShot(0, w.select_prompt_layer)

    def on_combo_changed(self, index: int) -> None:
        w = self.w
        name = w.image_combo.currentText()
        if name and name in w.viewer.layers and (w.image_layer is None or w.image_layer.name != name):
            w.set_image_layer(unwrap(w.viewer.layers[name]))

    def on_layer_removed(self, event) -> None:
        w = self.w
        layer = unwrap(getattr(event, "value", None))
        if layer is w.image_layer:
            w.controller.close_image()
            w.image_layer = None
            w.kind = None
            w._update_enabled()
        for attr in ("points_layer", "boxes_layer", "strokes_layer", "current_layer", "committed_layer"):
            if getattr(w, attr) is layer:
                setattr(w, attr, None)
        self.refresh()

    def show_only_this_images_layers(self) -> None:
        """The annotated image and its committed objects shown; other images and their committed layers hidden,
        so that labels of an earlier image are never drawn over this one."""
        w = self.w
        for layer in w.viewer.layers:
            layer = unwrap(layer)
            if layer is w.image_layer or layer is w.committed_layer:
                layer.visible = True
            elif is_image(layer) or role_of(layer) == "committed":
                layer.visible = False
