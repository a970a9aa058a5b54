"""Helpers shared by the GUI tests (viewer screenshots, waiting for workers, one embedding cache)."""

from __future__ import annotations

from pathlib import Path

from napari_robustmedsam.metrics import dice  # noqa: F401  (re-exported for the tests)
from napari_robustmedsam.prompting import tight_box  # noqa: F401

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"


def shared_cache(tmp_path_factory) -> str:
    """One embedding cache for the whole test session: images used by several tests are encoded once."""
    path = tmp_path_factory.getbasetemp() / "robustmedsam-embedding-cache"
    path.mkdir(exist_ok=True)
    return str(path)


def any_running() -> bool:
    from napari_robustmedsam.widgets._common import any_task_running

    return any_task_running()


def wait_idle(qtbot, timeout_ms: int = 300_000) -> None:
    qtbot.waitUntil(lambda: not any_running(), timeout=timeout_ms)


def shot(viewer, name: str) -> Path:
    from qtpy.QtWidgets import QApplication

    for _ in range(3):  # let layouts settle (word-wrapped labels) before grabbing
        QApplication.processEvents()
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    viewer.screenshot(str(path), canvas_only=False)
    return path
