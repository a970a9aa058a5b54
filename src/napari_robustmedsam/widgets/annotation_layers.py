"""The napari layers the annotator manages, and the conversions between them and the session.

``point prompts`` (Points) and ``box prompts`` (Shapes) hold the user's prompts; :func:`prompts_from_layers` reads
one slice's prompts from them in image pixels. ``current object`` (Labels) shows the object being segmented:
:func:`show_mask` writes only what changed. ``committed objects (<image>)`` (Labels) holds the committed labels,
one layer per image so that switching images never loses or mixes labels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..annotation.feedback import COMMITTED_COLORS, CURRENT_COLOR, rgba
from ..annotation.session import SlicePrompts
from ..annotation.slice_embeddings import image_kind
from ..errors import ImageInputError
from ..io.medical import copy_geometry
from ._common import mark, unwrap

POINTS_NAME = "point prompts"
BOXES_NAME = "box prompts"
CURRENT_NAME = "current object"
COMMITTED_NAME = "committed objects"
POINT_COLORS = ["#00ff00", "#ff2020"]  # positive, negative
POLARITIES = ["positive", "negative"]
PARTIAL_UPDATE_FRACTION = 0.25  # up to this share of a plane changed: napari's partial labels update


def committed_layer_name(image_name: str) -> str:
    return f"{COMMITTED_NAME} ({image_name})"


@dataclass
class AnnotationLayers:
    points: object
    boxes: object
    current: object
    committed: object


def make_layers(viewer, image_layer, shape: tuple[int, ...]) -> AnnotationLayers:
    """The annotator's four layers for ``image_layer`` (same scale and translation), reusing (emptied) layers
    of the same names that fit ``shape``, placed on top of the layer list."""
    points = make_points_layer(viewer, image_layer, shape)
    boxes = make_boxes_layer(viewer, image_layer, shape)
    current = make_current_layer(viewer, image_layer, shape)
    committed = make_committed_layer(viewer, image_layer, shape)
    # prompt layers on top, the image stays selectable
    for managed in (committed, current, boxes, points):
        viewer.layers.move(viewer.layers.index(managed), len(viewer.layers))
    return AnnotationLayers(points, boxes, current, committed)


def _geometry(image_layer) -> dict:
    return {"scale": tuple(image_layer.scale), "translate": tuple(image_layer.translate)}


def make_points_layer(viewer, image_layer, shape: tuple[int, ...]):
    ndim = len(shape)
    geo = _geometry(image_layer)
    layer = existing_layer(viewer, POINTS_NAME, lambda lay: lay.ndim == ndim)
    if layer is None:
        layer = viewer.add_points(
            np.zeros((0, ndim)), name=POINTS_NAME, ndim=ndim, property_choices={"label": POLARITIES},
            face_color="label", face_color_cycle=POINT_COLORS, border_color="#ffffff", border_width=0.1,
            size=max(4.0, 0.02 * max(shape[-2:])), **geo,
        )
    else:
        layer.data = np.zeros((0, ndim))
        layer.scale, layer.translate = geo["scale"], geo["translate"]
    points = mark(layer, "points")
    # a reused layer keeps its feature columns (the strokes add one): every column needs a default
    kept = points.feature_defaults.iloc[0].to_dict() if len(points.feature_defaults.columns) else {}
    points.feature_defaults = {**kept, "label": "positive"}
    return points


def make_boxes_layer(viewer, image_layer, shape: tuple[int, ...]):
    ndim = len(shape)
    geo = _geometry(image_layer)
    layer = existing_layer(viewer, BOXES_NAME, lambda lay: lay.ndim == ndim)
    if layer is None:
        layer = viewer.add_shapes(name=BOXES_NAME, ndim=ndim, face_color="transparent", edge_color="#ffd400",
                                  edge_width=max(1.0, 0.004 * max(shape[-2:])), **geo)
    else:
        layer.data = []
        layer.scale, layer.translate = geo["scale"], geo["translate"]
    return mark(layer, "boxes")


def make_current_layer(viewer, image_layer, shape: tuple[int, ...]):
    geo = _geometry(image_layer)
    layer = existing_layer(viewer, CURRENT_NAME, lambda lay: tuple(lay.data.shape) == shape)
    if layer is None:
        layer = viewer.add_labels(np.zeros(shape, np.uint8), name=CURRENT_NAME, opacity=0.55, **geo)
        _set_label_color(layer, 1, CURRENT_COLOR)
    else:
        layer.data = np.zeros(shape, np.uint8)
        layer.scale, layer.translate = geo["scale"], geo["translate"]
    return mark(layer, "current")


def make_committed_layer(viewer, image_layer, shape: tuple[int, ...]):
    name = committed_layer_name(image_layer.name)
    layer = existing_layer(viewer, name, lambda lay: tuple(lay.data.shape) == shape)
    if layer is None:
        layer = viewer.add_labels(np.zeros(shape, np.uint32), name=name, opacity=0.6, **_geometry(image_layer))
        _use_committed_colors(layer)
    elif layer.metadata.get("robustmedsam_image") != id(image_layer):
        layer.data = np.zeros(shape, np.uint32)  # a new image under the same name (e.g. image series)
    committed = mark(layer, "committed")
    committed.metadata["robustmedsam_image"] = id(image_layer)
    copy_geometry(image_layer, committed)  # File > Save writes the labels on the image's grid
    return committed


def annotatable_kind(layer, is_image: bool) -> str:
    """The image kind of ``layer`` (:func:`..annotation.slice_embeddings.image_kind`), or an ImageInputError that
    says why the annotator cannot work on it (not an image layer, a pyramid, a pixel type that is not a number)."""
    if not is_image:
        kind_name = type(layer).__name__ if layer is not None else "nothing"
        raise ImageInputError(
            f"the annotator works on image layers; '{getattr(layer, 'name', '')}' is a {kind_name} layer")
    if getattr(layer, "multiscale", False):
        raise ImageInputError(
            f"'{layer.name}' is a multiscale (pyramid) image: open its full-resolution level as a plain image")
    kind = image_kind(tuple(layer.data.shape), bool(layer.rgb))
    dtype = np.dtype(layer.data.dtype)
    if dtype.kind not in "uifb":
        raise ImageInputError(f"'{layer.name}' has pixel type {dtype}, which cannot be segmented")
    return kind


def visible_slice(viewer, image_layer, n_slices: int) -> int:
    """The volume slice the viewer shows (the dims slider's world position in the image's pixels)."""
    point = np.asarray(viewer.dims.point, dtype=float)
    world_z = point[-3] if point.size >= 3 else 0.0
    scale = float(image_layer.scale[0]) or 1.0
    z = int(round((world_z - float(image_layer.translate[0])) / scale))
    return int(np.clip(z, 0, n_slices - 1))


def show_slice(viewer, image_layer, z: int) -> None:
    """Move the dims slider to slice ``z`` of the volume."""
    world = float(image_layer.translate[0]) + z * float(image_layer.scale[0])
    viewer.dims.set_point(viewer.dims.ndim - 3, world)


def existing_layer(viewer, name: str, fits):
    """The layer called ``name`` if it exists and ``fits(layer)``; removed (None) if it does not fit."""
    if name not in viewer.layers:
        return None
    layer = unwrap(viewer.layers[name])
    if fits(layer):
        return layer
    viewer.layers.remove(layer)
    return None


def prompts_from_layers(points_layer, boxes_layer, z: int, volume: bool) -> SlicePrompts:
    """The user's prompts on slice ``z`` from the prompt layers, as (x, y) pixel coordinates; the box is the
    last one drawn on the slice."""
    pts = np.zeros((0, 2))
    labels = np.zeros((0,), np.int64)
    if points_layer is not None and len(points_layer.data):
        data = np.asarray(points_layer.data, dtype=float)
        polar = np.asarray(points_layer.features["label"]).astype(str)
        if volume:
            sel = np.round(data[:, 0]) == z
            data, polar = data[sel][:, 1:], polar[sel]
        pts = data[:, [1, 0]]  # (row, col) -> (x, y)
        labels = (polar == "positive").astype(np.int64)
    box = None
    if boxes_layer is not None and boxes_layer.nshapes:
        for verts in reversed(boxes_layer.data):
            v = np.asarray(verts, dtype=float)
            if volume:
                if not np.all(np.round(v[:, 0]) == z):
                    continue
                v = v[:, 1:]
            # napari pixel i spans [i - 0.5, i + 0.5]; model boxes use pixel edges (exclusive upper corner)
            y0, x0 = v.min(axis=0) + 0.5
            y1, x1 = v.max(axis=0) + 0.5
            if x1 - x0 >= 1 and y1 - y0 >= 1:
                box = np.array([x0, y0, x1, y1])
            break
    return SlicePrompts(pts, labels, box, "user")


def remove_prompts(points_layer, boxes_layer, z: int | None, volume: bool) -> None:
    """Remove the prompts of slice ``z`` (all of them when ``z`` is None or the image is 2D)."""
    if points_layer is not None and len(points_layer.data):
        if z is None or not volume:
            points_layer.data = np.zeros((0, points_layer.ndim))
        else:
            keep = np.round(np.asarray(points_layer.data)[:, 0]) != z
            features = points_layer.features[keep].reset_index(drop=True)
            points_layer.data = np.asarray(points_layer.data)[keep]
            points_layer.features = features
    if boxes_layer is not None and boxes_layer.nshapes:
        if z is None or not volume:
            boxes_layer.data = []
        else:
            drop = {i for i, v in enumerate(boxes_layer.data) if np.all(np.round(np.asarray(v)[:, 0]) == z)}
            if drop:
                boxes_layer.selected_data = drop
                boxes_layer.remove_selected()


def show_mask(layer, mask: np.ndarray, z: int | None, volume: bool) -> bool:
    """Show the session's current object ``mask`` in the ``current object`` layer (of slice ``z`` only, when
    given). Returns whether the layer's pixels changed (then its thumbnail is stale).

    In place, cheaper than the data setter on every click: a small change through napari's partial update, a
    large one with one refresh; nothing to do if the mask is unchanged.
    """
    data = layer.data
    if not isinstance(data, np.ndarray) or data.shape != mask.shape or not data.flags.writeable:
        layer.data = mask.astype(np.uint8)
        return False
    if z is None or not volume:
        target, source = data, mask
    else:
        target, source = data[z], mask[z]
    changed = target != source
    n_changed = int(np.count_nonzero(changed))
    if n_changed == 0:
        return False
    if n_changed <= PARTIAL_UPDATE_FRACTION * changed.size and _set_pixels(layer, changed, source, z):
        return True
    np.copyto(target, source, casting="unsafe")
    # same shape and dtype: the extent (and with it the viewer's dims) cannot have changed
    layer.refresh(thumbnail=False, extent=False, highlight=False)
    return True


def activate_prompt_layer(viewer, points_layer, boxes_layer, box_primary: bool) -> None:
    """Box-trained models: the box layer in rectangle mode; otherwise the points layer in add mode (best effort)."""
    try:
        if box_primary and boxes_layer is not None:
            viewer.layers.selection.active = boxes_layer
            boxes_layer.mode = "add_rectangle"
        elif points_layer is not None:
            viewer.layers.selection.active = points_layer
            points_layer.mode = "add"
    except Exception:
        pass


def remove_last_point(points_layer, z: int, volume: bool) -> bool:
    """Remove the last point clicked on slice ``z`` (any slice of a 2D image); False when there is none."""
    data = np.asarray(points_layer.data, dtype=float)
    on_slice = np.flatnonzero(np.round(data[:, 0]) == z) if volume else np.arange(len(data))
    if on_slice.size == 0:
        return False
    points_layer.selected_data = {int(on_slice[-1])}
    points_layer.remove_selected()
    return True


def set_polarity(points_layer, polarity: str) -> str:
    """The label ("positive" / "negative") of the next point added to the points layer (its other defaults kept)."""
    points_layer.feature_defaults = {**points_layer.feature_defaults.iloc[0].to_dict(), "label": polarity}
    return polarity


def box_rectangle(box, z: int | None) -> np.ndarray:
    """The Shapes rectangle of a box ``(x0, y0, x1, y1)`` in pixel edges (exclusive upper corner), on slice z."""
    x0, y0, x1, y1 = (float(v) - 0.5 for v in box)
    rect = np.array([[y0, x0], [y0, x1], [y1, x1], [y1, x0]])
    if z is not None:
        rect = np.concatenate([np.full((4, 1), float(z)), rect], axis=1)
    return rect


def _set_pixels(layer, changed: np.ndarray, source: np.ndarray, z: int | None) -> bool:
    """Write the changed pixels of one plane into a Labels layer with napari's partial update (only the
    changed region is re-coloured and re-uploaded to the GPU); False if that path is not available.

    ``Labels.data_setitem`` records an undo step; the "current object" layer is a display of the session (its
    own undo lives there), so that history is dropped again: Ctrl-Z on the layer cannot show a stale mask.
    """
    setitem = getattr(layer, "data_setitem", None)
    if setitem is None:
        return False
    indices = np.nonzero(changed)
    if z is not None and np.ndim(layer.data) == changed.ndim + 1:
        indices = (np.full(indices[0].shape, z, dtype=indices[0].dtype),) + indices
    try:
        setitem(indices, source[changed].astype(layer.data.dtype, copy=False))
    except Exception:  # noqa: BLE001 - napari internals differ: the caller falls back to a full refresh
        return False
    reset = getattr(layer, "_reset_history", None)
    if reset is not None:
        reset()
    return True


def still_drawing(shapes_layer) -> bool:
    """True while a shape is being dragged out (napari adds a tiny rectangle on mouse press)."""
    try:
        return bool(unwrap(shapes_layer)._is_creating)  # not public API: fall back to "not drawing"
    except AttributeError:
        return False


def connect_once(emitter, callback) -> None:
    try:
        emitter.disconnect(callback)
    except Exception:
        pass
    emitter.connect(callback)


def _use_committed_colors(layer) -> None:
    """Committed objects in distinct, bright colours that cycle (see annotation.feedback.COMMITTED_COLORS)."""
    from napari.utils.colormaps import CyclicLabelColormap

    layer.colormap = CyclicLabelColormap(colors=[(0.0, 0.0, 0.0, 0.0)] + [rgba(c) for c in COMMITTED_COLORS])


def _set_label_color(layer, value: int, color: str) -> None:
    try:
        from napari.utils.colormaps import DirectLabelColormap

        layer.colormap = DirectLabelColormap(color_dict={value: color, None: "transparent", 0: "transparent"})
    except Exception:
        pass
