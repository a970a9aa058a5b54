"""The ``stroke prompts`` layer: positive and negative strokes on the current object, drawn as napari Shapes paths.

Each finished path becomes clicks along it (:func:`..annotation.strokes.stroke_points`), added to the ``point
prompts`` layer as the newest clicks. The decode, the click guard, the click refinement and the take-back are then
exactly those of clicks; a point's ``stroke`` feature (-1 for a click) links it to its path, so that removing the
path removes its clicks, editing it samples them again, and the status line names the stroke. A stroke takes the
polarity of the next point (the **T** key, the polarity button) and is drawn in that polarity's colour.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..annotation.strokes import stroke_points
from ..errors import PromptError
from ._common import mark
from .annotation_layers import POINT_COLORS, POLARITIES, existing_layer, still_drawing

STROKES_NAME = "stroke prompts"
STROKE_FEATURE = "stroke"  # in both layers: the stroke's id; in the points layer -1 marks a click
NO_STROKE = -1
STROKE_SHAPE_TYPES = ("path", "line", "polyline")  # open lines; a closed shape is not a stroke
STROKE_POINT_SIZE = 0.5  # a stroke's clicks are drawn this much smaller than a click, so its path stays visible


@dataclass
class StrokeSync:
    """What :func:`sync_stroke_points` changed: strokes turned into clicks ((id, number of points, label) each),
    strokes whose clicks were removed, and the strokes left out with the reason."""

    added: list[tuple[int, int, str]] = field(default_factory=list)
    removed: int = 0
    refused: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.added or self.removed)


class AnnotatorStrokes:
    """The annotator's side of the strokes (its ``strokes``): a finished, removed or edited path's clicks follow it,
    then the object is segmented once, as after a click; B takes a whole stroke back; strokes drawn by code."""

    def __init__(self, widget) -> None:
        self.w = widget

    def on_changed(self, event=None) -> None:
        """The strokes layer's data event."""
        w = self.w
        if w._suppress or w.session is None or w.strokes_layer is None or w.points_layer is None:
            return
        if still_drawing(w.strokes_layer) or str(getattr(event, "action", "changed")).lower().endswith("ing"):
            return  # the path is still being drawn: its clicks come when it is finished
        w._suppress += 1
        try:
            change = sync_stroke_points(w.strokes_layer, w.points_layer, w.session.shape[-2:], w.session.is_volume,
                                        w.polarity)
        finally:
            w._suppress -= 1
        if change.refused:
            reason = change.refused[-1]
            w.banner.show_error(f"Stroke left out: {reason}.")
            w._set_status(f"Stroke left out, nothing changed: {reason}.")
        if change.changed:
            w._on_prompt_event(None)

    def take_back(self, z: int) -> bool:
        """If the last click on slice ``z`` belongs to a stroke: remove the stroke's path and all its clicks (which
        re-segments, as taking a click back does) and return True."""
        w = self.w
        stroke = last_stroke_on_slice(w.points_layer, z, w.session.is_volume)
        if stroke is None:
            return False
        w._suppress += 1
        try:
            remove_stroke(w.strokes_layer, stroke)
        finally:
            w._suppress -= 1
        remove_stroke_points(w.points_layer, stroke)
        return True

    def add(self, path, positive: bool = True, z: int | None = None) -> None:
        """A path through the pixels ``path`` ((N, 2) x, y) on slice ``z``, as if drawn with the path tool."""
        w = self.w
        pol = "positive" if positive else "negative"
        if w.polarity != pol:
            w._set_polarity(pol)
            w._update_polarity_button()
        verts = np.asarray(path, dtype=float).reshape(-1, 2)[:, [1, 0]]
        if w.session.is_volume:
            verts = np.concatenate([np.full((len(verts), 1), float(w.current_z() if z is None else z)), verts], 1)
        w.strokes_layer.add_paths([verts])


def make_strokes_layer(viewer, image_layer, shape: tuple[int, ...], points_layer):
    """The ``stroke prompts`` layer for ``image_layer`` (same scale and translation; an existing one that fits is
    emptied and reused), just below the points layer, in path mode so that a drag draws a stroke. Also gives the
    points layer its ``stroke`` feature."""
    ndim = len(shape)
    geo = {"scale": tuple(image_layer.scale), "translate": tuple(image_layer.translate)}
    ensure_stroke_feature(points_layer)
    layer = existing_layer(viewer, STROKES_NAME, lambda lay: lay.ndim == ndim)
    if layer is None:
        layer = viewer.add_shapes(
            name=STROKES_NAME, ndim=ndim, shape_type="path", face_color="transparent",
            features={"label": pd.Categorical([], categories=POLARITIES), STROKE_FEATURE: np.zeros(0, np.int64)},
            # napari gives the cycle's colours in the order the values appear, the default first: positive first
            feature_defaults={"label": POLARITIES[0], STROKE_FEATURE: NO_STROKE},
            edge_color="label", edge_color_cycle=POINT_COLORS, edge_width=max(1.5, 0.008 * max(shape[-2:])),
            **geo)
    else:
        layer.data = []
        layer.scale, layer.translate = geo["scale"], geo["translate"]
    set_stroke_polarity(layer, str(points_layer.feature_defaults["label"][0]))
    try:
        layer.mode = "add_path"
    except Exception:  # noqa: BLE001 - an older napari without the mode: the user picks the tool
        pass
    layers = viewer.layers
    layers.move(layers.index(layer), layers.index(points_layer))  # just below the points
    return mark(layer, "strokes")


def ensure_stroke_feature(points_layer) -> None:
    """Give the points layer a ``stroke`` feature (-1 for every click) if it has none yet."""
    if STROKE_FEATURE in points_layer.features.columns:
        return
    defaults = points_layer.feature_defaults.iloc[0].to_dict()
    features = points_layer.features.copy()
    features[STROKE_FEATURE] = np.full(len(features), NO_STROKE, np.int64)
    points_layer.features = features
    points_layer.feature_defaults = {**defaults, STROKE_FEATURE: NO_STROKE}


def set_stroke_polarity(strokes_layer, polarity: str) -> None:
    """The polarity ("positive" / "negative") and so the colour of the next stroke drawn."""
    strokes_layer.feature_defaults = {"label": polarity, STROKE_FEATURE: NO_STROKE}


def point_strokes(points_layer, z: int, volume: bool) -> np.ndarray:
    """The stroke id of each of slice ``z``'s points (-1 for a click), in the order of
    :func:`.annotation_layers.prompts_from_layers`."""
    if points_layer is None or not len(points_layer.data):
        return np.zeros(0, np.int64)
    ids = _point_ids(points_layer)
    if volume:
        ids = ids[np.round(np.asarray(points_layer.data, dtype=float)[:, 0]) == z]
    return ids


def sync_stroke_points(strokes_layer, points_layer, plane: tuple[int, int], volume: bool,
                       polarity: str) -> StrokeSync:
    """Make the stroke clicks in the points layer match the strokes layer's paths: a new path becomes clicks along
    it with ``polarity``; the clicks of a removed path go; an edited path's clicks are sampled again (as the newest
    clicks). A path with no pixel on the image (or a closed shape) is removed, with the reason in ``refused``."""
    out = StrokeSync()
    features = strokes_layer.features
    shape_ids = np.asarray(features[STROKE_FEATURE], dtype=np.int64)
    next_id = int(max(shape_ids.max(initial=-1), _point_ids(points_layer).max(initial=-1))) + 1
    bad, recolour = [], False
    for i, (vertices, kind) in enumerate(zip(strokes_layer.data, strokes_layer.shape_type)):
        sid = int(shape_ids[i])
        label = polarity if sid < 0 else str(features["label"].iloc[i])
        try:
            if kind not in STROKE_SHAPE_TYPES:
                raise PromptError(f"a {kind} is not a stroke: draw strokes with the path tool")
            coords = _stroke_coords(np.asarray(vertices, dtype=float), label, plane, volume)
        except PromptError as err:
            bad.append(i)
            out.refused.append(str(err))
            continue
        if sid < 0:  # new: give it an id and the polarity it was drawn with
            sid = next_id
            next_id += 1
            features.loc[features.index[i], STROKE_FEATURE] = sid
            features.loc[features.index[i], "label"] = label
            recolour = True
        own = np.flatnonzero(_point_ids(points_layer) == sid)
        current = np.asarray(points_layer.data, dtype=float)[own]
        if current.shape == coords.shape and np.allclose(current, coords):
            continue
        if own.size:
            _remove_points(points_layer, own)
            out.removed += 1
        _add_points(points_layer, coords, label, sid)
        out.added.append((sid, len(coords), label))
    if recolour:
        strokes_layer.refresh_colors()
    if bad:
        strokes_layer.selected_data = set(bad)
        strokes_layer.remove_selected()
    live = set(np.asarray(strokes_layer.features[STROKE_FEATURE], dtype=np.int64).tolist())
    ids = _point_ids(points_layer)
    orphans = np.flatnonzero((ids >= 0) & ~np.isin(ids, list(live)))
    if orphans.size:
        out.removed += len(set(ids[orphans].tolist()))
        _remove_points(points_layer, orphans)
    return out


def last_stroke_on_slice(points_layer, z: int, volume: bool) -> int | None:
    """The stroke id of the last point on slice ``z`` if that point belongs to a stroke, else None."""
    ids = point_strokes(points_layer, z, volume)
    return int(ids[-1]) if ids.size and ids[-1] >= 0 else None


def remove_stroke(strokes_layer, stroke_id: int) -> None:
    """Remove the path of stroke ``stroke_id`` (its clicks stay: the caller removes them)."""
    ids = np.asarray(strokes_layer.features[STROKE_FEATURE], dtype=np.int64)
    drop = set(np.flatnonzero(ids == stroke_id).tolist())
    if drop:
        strokes_layer.selected_data = drop
        strokes_layer.remove_selected()


def remove_stroke_points(points_layer, stroke_id: int) -> None:
    """Remove the clicks of stroke ``stroke_id`` from the points layer (one change event)."""
    own = np.flatnonzero(_point_ids(points_layer) == stroke_id)
    if own.size:
        _remove_points(points_layer, own)


def remove_strokes(strokes_layer, z: int | None, volume: bool) -> None:
    """Remove the strokes of slice ``z`` (all of them when ``z`` is None or the image is 2D)."""
    if strokes_layer is None or not strokes_layer.nshapes:
        return
    if z is None or not volume:
        strokes_layer.data = []
        return
    drop = {i for i, v in enumerate(strokes_layer.data) if np.all(np.round(np.asarray(v)[:, 0]) == z)}
    if drop:
        strokes_layer.selected_data = drop
        strokes_layer.remove_selected()


def _stroke_coords(vertices: np.ndarray, label: str, plane: tuple[int, int], volume: bool) -> np.ndarray:
    """The points layer coordinates ((row, col), or (z, row, col)) of the clicks along a path's ``vertices``."""
    path_xy = vertices[:, [-1, -2]]  # napari (row, col) -> (x, y)
    pts, _ = stroke_points(path_xy, 1 if label == "positive" else 0, plane)
    coords = pts[:, [1, 0]]
    if volume:
        coords = np.concatenate([np.full((len(coords), 1), float(np.round(vertices[0, 0]))), coords], axis=1)
    return coords


def _point_ids(points_layer) -> np.ndarray:
    if STROKE_FEATURE not in points_layer.features.columns:
        return np.full(len(points_layer.data), NO_STROKE, np.int64)
    return np.asarray(points_layer.features[STROKE_FEATURE], dtype=np.int64)


def _remove_points(points_layer, indices) -> None:
    points_layer.selected_data = {int(i) for i in indices}
    points_layer.remove_selected()


def _add_points(points_layer, coords: np.ndarray, label: str, stroke_id: int) -> None:
    """Add the clicks of one stroke (one change event), then restore the next click's defaults."""
    defaults = points_layer.feature_defaults.iloc[0].to_dict()
    points_layer.feature_defaults = {**defaults, "label": label, STROKE_FEATURE: stroke_id}
    try:
        points_layer.add(coords)
    finally:
        points_layer.feature_defaults = defaults
    sizes = np.array(points_layer.size, dtype=float, copy=True)
    sizes[-len(coords):] *= STROKE_POINT_SIZE
    points_layer.size = sizes
    borders = np.array(points_layer.border_color, copy=True)  # no white rim: small dots in the stroke's colour
    borders[-len(coords):] = np.asarray(points_layer.face_color)[-len(coords):]
    points_layer.border_color = borders
