"""Everything in one dock: model, annotator, degradation preview, robustness sweep, export, image series,
fine-tuning on the user's labels."""

from __future__ import annotations

from qtpy.QtCore import Qt
from qtpy.QtWidgets import QFrame, QScrollArea, QTabWidget, QVBoxLayout, QWidget

from .annotator import AnnotatorWidget
from .degradation_preview import DegradationPreview
from .export_panel import ExportPanel
from .finetune import FinetuneWidget
from .image_series import ImageSeriesPanel
from .model_panel import ModelPanel
from .robustness_sweep import RobustnessSweep


def _scrolled(widget: QWidget) -> QScrollArea:
    area = QScrollArea()
    area.setWidgetResizable(True)
    area.setFrameShape(QFrame.Shape.NoFrame)
    area.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)  # content follows the dock width
    area.setWidget(widget)
    return area


class RobustMedSAMWidget(QWidget):
    """The plugin's main dock (tabs); each tab is also available as its own widget."""

    TABS = ("annotate", "degrade", "sweep", "export", "series", "finetune", "model")

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.setObjectName("robustmedsam-main")
        self.model_panel = ModelPanel(napari_viewer)
        self.annotator = AnnotatorWidget(napari_viewer)
        self.preview = DegradationPreview(napari_viewer)
        self.sweep = RobustnessSweep(napari_viewer)
        self.export = ExportPanel(napari_viewer)
        self.series = ImageSeriesPanel(napari_viewer)
        self.finetune = FinetuneWidget(napari_viewer)
        # the preview runs only while its tab is shown (it adds a "degraded" layer as soon as it runs)
        self.preview.live_check.setChecked(False)

        self.tabs = QTabWidget()
        for widget, title in (
            (self.annotator, "Annotate"),
            (self.preview, "Degrade"),
            (self.sweep, "Sweep"),
            (self.export, "Export"),
            (self.series, "Series"),
            (self.finetune, "Fine-tune"),
            (self.model_panel, "Model"),
        ):
            self.tabs.addTab(_scrolled(widget), title)
        self.tabs.tabBar().setStyleSheet("QTabBar::tab { padding: 3px 3px; }")  # seven tab names in a narrow dock
        self.tabs.currentChanged.connect(self._tab_changed)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(2, 2, 2, 2)
        layout.addWidget(self.tabs)
        self.setMinimumWidth(400)

    def _tab_changed(self, index: int) -> None:
        self.preview.live_check.setChecked(self.TABS[index] == "degrade")
        if self.TABS[index] == "finetune":
            self.finetune.ensure_built()

    def show_tab(self, key: str) -> None:
        self.tabs.setCurrentIndex(self.TABS.index(key))
