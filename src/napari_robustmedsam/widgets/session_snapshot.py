"""What a save or an autosave writes: the committed labels, their prompts and the image, model and class records.

Use: ``labels, records, kwargs = session_snapshot(annotator, loaded)``, then
``annotation.export.save_session(path, labels, records, **kwargs)``. The Export tab's *Save* and its autosave both
take their files from here, so the two always hold the same things.
"""

from __future__ import annotations

import numpy as np

from ..annotation.model_info import model_meta
from ..engine.windows import WINDOW_KEY
from ..io.medical import geometry_from_layer, source_of


def session_snapshot(annotator, loaded) -> tuple[np.ndarray, list[dict], dict]:
    """The committed labels, their prompt records and the rest of ``save_session``'s arguments, as the user sees
    them now (the labels are a copy, so that a background write sees this moment)."""
    annotator._sync_committed_into_session()
    session = annotator.session
    layer = annotator.image_layer
    geometry = geometry_from_layer(layer)
    source = source_of(layer)
    image_meta = {"name": layer.name, "shape": list(layer.data.shape), "dtype": str(layer.data.dtype),
                  "kind": annotator.kind, "source": str(source) if source else None,
                  "window": layer.metadata.get(WINDOW_KEY),
                  "geometry": geometry.to_json() if geometry is not None else None}
    kwargs = {"image_meta": image_meta, "model_meta": model_meta(loaded) if loaded is not None else {},
              "geometry": geometry, "extra": _label_classes(annotator), "class_names": _class_names(annotator)}
    return np.array(session.labels, copy=True), session.records_json(), kwargs


def _class_names(annotator) -> dict[int, str]:
    control = getattr(annotator, "label_control", None)
    return dict(control.classes.names) if control is not None else {}


def _label_classes(annotator) -> dict | None:
    """The session's class names (value -> name) for the prompts JSON, when the user named any."""
    control = getattr(annotator, "label_control", None)
    names = control.classes.to_json() if control is not None else {}
    return {"label_classes": names} if names else None
