"""The annotator's controls (Qt): built here, wired to the :class:`~.annotator.AnnotatorWidget` passed in, whose
attributes they become (``w.live_check``, ``w.local_combo``, ...). The widget reads them in
:meth:`~.annotator.AnnotatorWidget.settings` for the controller."""

from __future__ import annotations

from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QVBoxLayout,
)

from ..annotation.model_info import display_name
from ..annotation.prompt_decoding import (
    BOX_PRIMARY_HINT,
    CLICK_GUARD_MODES,
    CLICK_REFINEMENT_MODES,
    CLICK_REFINEMENT_TOOLTIP,
    DEFAULT_CLICK_GUARD,
    DEFAULT_CLICK_REFINEMENT,
    DEFAULT_LOCAL_CORRECTIONS,
    DEFAULT_ZOOM_SMALL_OBJECTS,
    LOCAL_CORRECTION_MODES,
    ZOOM_SMALL_OBJECTS_TOOLTIP,
)
from ..annotation.propagation import DEFAULT_IOU_THRESHOLD, DEFAULT_MIN_SCORE, DEFAULT_PROMPT_MODE, PROMPT_MODES
from ._common import Banner, TaskRow, mode_combo, shrinkable
from .label_control import LabelControl
from .window_control import WindowControl


KEYS = {
    "s": "segment",
    "c": "commit",
    "Shift-C": "clear",
    "t": "toggle_polarity",
    "u": "undo",
    "b": "take_back_click",
    "Shift-S": "propagate",
}


def key_handler(widget, action: str):
    """A napari key callback that calls ``widget.<action>()``."""
    def handler(*_args):
        getattr(widget, action)()

    handler.__name__ = f"robustmedsam_{action}"
    return handler


def bind_keys(target, handler_for, quiet: bool = False) -> None:
    """Bind :data:`KEYS` on the viewer or a layer (``quiet``: a layer that refuses a binding is left as it is)."""
    for key, action in KEYS.items():
        try:
            target.bind_key(key, handler_for(action), overwrite=True)
        except Exception:
            if not quiet:
                raise


def build_controls(w) -> None:
    """Create the annotator's controls on ``w`` and lay them out (image choice, embeddings, live / local / guard
    choices, polarity, the action buttons, the 3D group, messages). Long on purpose: one straight run of
    statements per control, in the order they appear on screen; split up it would only scatter the layout."""
    w.image_combo = shrinkable(QComboBox())
    w.image_combo.currentIndexChanged.connect(w.image_choice.on_combo_changed)
    w.embed_button = QPushButton("Compute embeddings")
    w.embed_button.setToolTip("Encode the image (every slice of a volume) once; prompts are then fast")
    w.embed_button.clicked.connect(lambda: w.compute_embeddings())
    w.prefetch_check = QCheckBox("Embed a volume's slices in the background")
    w.prefetch_check.setChecked(True)
    w.prefetch_check.setToolTip("On opening a volume: the current slice first, then its neighbours, nearest first; "
                                "the first click waits for one slice")
    w.embed_row = TaskRow()
    w.embed_status = QLabel("")
    w.embed_status.setWordWrap(True)

    w.live_check = QCheckBox("Live: segment on every prompt change")
    w.live_check.setChecked(True)
    w.local_combo = mode_combo(
        LOCAL_CORRECTION_MODES, DEFAULT_LOCAL_CORRECTIONS,
        "Local: a corrective click changes the mask only in the region connected to the click, the rest "
        "stays as it was (otherwise the model re-predicts the whole object on every click). 'with a box': "
        "local once the object has a box; from points alone the whole new mask is taken.",
    )
    w.guard_combo = mode_combo(
        CLICK_GUARD_MODES, DEFAULT_CLICK_GUARD,
        "Guarded: a positive click only adds to the mask and a negative click only removes from it, and only "
        "where the new click is nearer than your earlier clicks of the other label, so earlier clicks keep "
        "their label. A negative click made before any positive click removes only near itself (within twice "
        "its distance to the mask's edge); with a click refinement on, every click is bounded that way. "
        "'with a box': guarded once the object has a box.",
    )
    w.refine_combo = mode_combo(CLICK_REFINEMENT_MODES, DEFAULT_CLICK_REFINEMENT, CLICK_REFINEMENT_TOOLTIP)
    w.zoom_check = QCheckBox("Zoom on small objects")
    w.zoom_check.setChecked(DEFAULT_ZOOM_SMALL_OBJECTS)
    w.zoom_check.setToolTip(ZOOM_SMALL_OBJECTS_TOOLTIP)
    w.polarity_button = QPushButton()
    w.polarity_button.setToolTip("Polarity of the next point and the next stroke (T)")
    w.polarity_button.clicked.connect(w.toggle_polarity)
    w.overwrite_check = QCheckBox("Commit overwrites other objects")
    w.hint = Banner()
    w.banner = Banner()
    w.status = QLabel("")
    w.status.setWordWrap(True)

    buttons = QGridLayout()
    w.segment_button = QPushButton("Segment [S]")
    w.commit_button = QPushButton("Commit [C]")
    w.clear_button = QPushButton("Clear [Shift-C]")
    w.undo_button = QPushButton("Undo commit [U]")
    w.take_back_button = QPushButton("Take back click [B]")
    w.take_back_button.setToolTip("Remove the last point (or the last stroke) on this slice: the mask returns "
                                     "exactly to what it was before it")
    w.segment_button.clicked.connect(lambda: w.segment())
    w.take_back_button.clicked.connect(lambda: w.take_back_click())
    w.commit_button.clicked.connect(lambda: w.commit())
    w.clear_button.clicked.connect(lambda: w.clear())
    w.undo_button.clicked.connect(lambda: w.undo())
    buttons.addWidget(w.segment_button, 0, 0)
    buttons.addWidget(w.commit_button, 0, 1)
    buttons.addWidget(w.clear_button, 1, 0)
    buttons.addWidget(w.undo_button, 1, 1)
    buttons.addWidget(w.take_back_button, 2, 0, 1, 2)

    w.volume_box = QGroupBox("3D")
    vform = QFormLayout(w.volume_box)
    w.propagate_button = QPushButton("Propagate through volume [Shift-S]")
    w.propagate_button.clicked.connect(lambda: w.propagate())
    w.iou_spin = QDoubleSpinBox()
    w.iou_spin.setRange(0.0, 1.0)
    w.iou_spin.setSingleStep(0.05)
    w.iou_spin.setValue(DEFAULT_IOU_THRESHOLD)
    w.iou_spin.setToolTip("Stop when the IoU between neighbouring slices falls below this")
    w.score_spin = QDoubleSpinBox()
    w.score_spin.setRange(0.0, 1.0)
    w.score_spin.setSingleStep(0.05)
    w.score_spin.setValue(DEFAULT_MIN_SCORE)
    w.score_spin.setToolTip("Stop when the model's predicted IoU of a propagated mask falls below this (0 = off)")
    w.prompt_mode_combo = shrinkable(QComboBox())
    w.prompt_mode_combo.addItems(PROMPT_MODES)
    w.prompt_mode_combo.setCurrentText(DEFAULT_PROMPT_MODE)
    w.prompt_mode_combo.setToolTip("Prompts derived from the neighbour slice's mask (logits: its low-resolution "
                                   "logits as the mask prompt)")
    w.auto_repropagate_check = QCheckBox("Re-propagate after a correction")
    w.auto_repropagate_check.setChecked(True)
    w.mark_end_button = QPushButton("Object ends on this slice")
    w.mark_end_button.setToolTip("Empty the object here; propagation never goes past this slice")
    w.mark_end_button.clicked.connect(lambda: w.mark_end())
    w.propagate_row = TaskRow()
    vform.addRow(w.propagate_button)
    vform.addRow("Stop below IoU", w.iou_spin)
    vform.addRow("Stop below score", w.score_spin)
    vform.addRow("From neighbour", w.prompt_mode_combo)
    vform.addRow(w.auto_repropagate_check)
    vform.addRow(w.mark_end_button)
    vform.addRow(w.propagate_row)

    form = QFormLayout()
    form.addRow("Image", w.image_combo)
    w.window_control = WindowControl(w)
    form.addRow("Window", w.window_control)
    w.label_control = LabelControl(w)
    form.addRow("Label", w.label_control)
    polarity_row = QHBoxLayout()
    polarity_row.addWidget(QLabel("Next point / stroke"))
    polarity_row.addWidget(w.polarity_button, 1)
    layout = QVBoxLayout(w)
    layout.addLayout(form)
    layout.addWidget(w.embed_button)
    layout.addWidget(w.prefetch_check)
    layout.addWidget(w.embed_row)
    layout.addWidget(w.embed_status)
    layout.addWidget(w.hint)
    layout.addWidget(w.live_check)
    local_row = QHBoxLayout()
    local_row.addWidget(QLabel("Corrections stay local"))
    local_row.addWidget(w.local_combo, 1)
    layout.addLayout(local_row)
    guard_row = QHBoxLayout()
    guard_row.addWidget(QLabel("Clicks only add / remove"))
    guard_row.addWidget(w.guard_combo, 1)
    layout.addLayout(guard_row)
    refine_row = QHBoxLayout()
    refine_row.addWidget(QLabel("Click refinement"))
    refine_row.addWidget(w.refine_combo, 1)
    layout.addLayout(refine_row)
    layout.addWidget(w.zoom_check)
    layout.addLayout(polarity_row)
    layout.addLayout(buttons)
    layout.addWidget(w.overwrite_check)
    layout.addWidget(w.volume_box)
    layout.addWidget(w.banner)
    layout.addWidget(w.status)
    layout.addStretch(1)


def model_hint(loaded) -> tuple[str, str]:
    """The hint above the controls for the loaded model (None: the default, not loaded yet) and its level."""
    if loaded is not None and loaded.box_primary:
        return BOX_PRIMARY_HINT.format(name=display_name(loaded)), "hint"
    if loaded is None:
        return ("The embedded LiteMedSAM is loaded on first use. It was trained with box prompts only: "
                "draw a box around the object first, then refine with points.", "hint")
    return "Click positive / negative points or draw a box.", "info"


def embed_status_text(emb, engine_notice: str | None) -> str:
    """The embeddings line: slices ready, how many came from the disk cache, and where that cache is (or why
    there is none)."""
    if emb is None:
        return "Embeddings: not computed yet."
    disk = f", {emb.from_disk} from the disk cache" if emb.from_disk else ""
    if emb.cache_dir:
        where = f" Cache: {emb.cache_dir}"
    else:
        where = f" (memory only: {engine_notice})" if engine_notice else " (memory only)"
    return f"Embeddings: {emb.n_ready}/{emb.n_slices} slice(s) ready{disk}.{where}"
