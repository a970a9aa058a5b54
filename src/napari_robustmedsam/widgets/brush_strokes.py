"""Brush strokes on the ``current object`` layer: painting on the mask is a positive stroke, erasing a negative one.

Why: a user who sees a missed part or a leak reaches for napari's brush or eraser on the mask itself (as in
nnInteractive's scribbles). Taken as a pixel edit, the next decode would overwrite it; taken as a prompt, the model
re-segments with it. So the painted pixels are put back as the session has them, and the band's centre line
(:func:`..annotation.strokes.brush_path`) becomes a stroke in the ``stroke prompts`` layer: clicks along it, one
decode, **B** takes it back whole, as for a drawn stroke (:mod:`.stroke_layer`). The next point's polarity is not
changed by a brush stroke: the brush or the eraser says which it is.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np

from ..annotation.strokes import brush_path


class BrushStrokes:
    """The annotator's handler of the ``current object`` layer's paint event (one event per brush stroke)."""

    def __init__(self, widget) -> None:
        self.w = widget
        self._own_writes = 0

    @contextmanager
    def ignoring(self):
        """While the annotator writes the session's mask into the layer: napari reports those writes as paint
        events too, before the pixels are written."""
        self._own_writes += 1
        try:
            yield
        finally:
            self._own_writes -= 1

    def on_paint(self, event=None) -> None:
        w = self.w
        if self._own_writes or w._suppress or w.session is None or w.current_layer is None or w.strokes_layer is None:
            return
        z = w.current_z()
        volume = w.session.is_volume
        data = w.current_layer.data
        shown = np.asarray(data[z] if volume else data) > 0
        before = w.session.plane(w.session.current, z) > 0
        added, erased = shown & ~before, before & ~shown
        if not added.any() and not erased.any():
            return
        # the brush is a prompt, not an edit: the layer shows the session's mask again until the decode answers
        w._update_current_layer(z)
        positive = int(added.sum()) >= int(erased.sum())
        path = brush_path(added if positive else erased)
        polarity = w.polarity
        w.strokes.add(path, positive, z)
        if w.polarity != polarity:  # strokes.add takes the stroke's polarity; the next point keeps the user's
            w._set_polarity(polarity)
            w._update_polarity_button()
