"""Compile napari's numba code in the background, before the user's first box.

napari draws Shapes (the box layer) and Labels (the masks) through numba-compiled functions. They compile the
first time they run (for each array type), seconds each on a small CPU, and napari runs them on the GUI
thread: without this warm-up the window stays black while the box layer is created and the first box freezes
the UI. :func:`warm_napari_numba` runs the same functions once on tiny arrays of the types the annotator uses
(uint8 for the current object, uint32 for committed objects, a rectangle for the box), from a worker thread.
numba keeps the compiled code for the rest of the session (and in its on-disk cache for the next one).
"""

from __future__ import annotations

import time

import numpy as np

from ..annotation.feedback import COMMITTED_COLORS, CURRENT_COLOR, rgba


def warm_napari_numba() -> float:
    """Run napari's numba-compiled Shapes and Labels code once on tiny data; returns the seconds it took.

    Safe from any thread: only layer *models* are built (no Qt, no viewer). Without numba there is nothing to do.
    """
    start = time.perf_counter()
    try:
        import numba  # noqa: F401  (only whether it is installed)
    except ImportError:
        return 0.0
    from napari.layers import Labels, Shapes
    from napari.layers.shapes import _accelerated_triangulate_dispatch as triangulate
    from napari.utils.colormaps import CyclicLabelColormap, DirectLabelColormap

    triangulate.warmup_numba_cache()
    box = np.array([[[1.0, 1.0], [1.0, 6.0], [6.0, 6.0], [6.0, 1.0]]])
    Shapes(box, shape_type="rectangle", face_color="transparent", edge_color="#ffd400")
    current = DirectLabelColormap(color_dict={1: CURRENT_COLOR, None: "transparent", 0: "transparent"})
    committed = CyclicLabelColormap(colors=[(0.0, 0.0, 0.0, 0.0)] + [rgba(c) for c in COMMITTED_COLORS])
    for dtype, colormap in ((np.uint8, current), (np.uint32, committed)):
        data = np.zeros((8, 8), dtype)
        data[2:5, 2:5] = 1
        layer = Labels(data)
        layer.colormap = colormap
        colormap._data_to_texture(data)
        colormap.map(data)
        layer._raw_to_displayed(data)  # what the canvas draws
    return time.perf_counter() - start
