"""The annotator's layers made ahead, one per event-loop turn, before the annotator takes its first image.

Why: creating a napari layer (its Qt controls, its vispy visual) takes a noticeable time on the GUI thread, so
making the annotator's five layers at once froze the launcher's window (docs/results/first-use.md). The launcher runs
:func:`layer_creation_steps` one call per event-loop turn; the annotator then finds the layers by name and only
reuses and empties them (:func:`~.annotation_layers.make_layers`, :func:`~.stroke_layer.make_strokes_layer`).
"""

from __future__ import annotations

from ._common import spatial_shape, unwrap
from .annotation_layers import make_boxes_layer, make_committed_layer, make_current_layer, make_points_layer
from .stroke_layer import make_strokes_layer


def layer_creation_steps(viewer, image_layer) -> list:
    """The five layers for ``image_layer`` (points, boxes, current object, committed objects, strokes) as one
    call each, in that order."""
    image_layer = unwrap(image_layer)
    shape = spatial_shape(image_layer)
    made: dict = {}
    steps = [lambda: made.setdefault("points", make_points_layer(viewer, image_layer, shape))]
    steps += [lambda make=make: make(viewer, image_layer, shape)
              for make in (make_boxes_layer, make_current_layer, make_committed_layer)]
    steps.append(lambda: make_strokes_layer(viewer, image_layer, shape, made["points"]))
    return steps
