"""Background tasks of the widgets: a task that ends after its panel was closed must not touch the panel."""

import threading

import pytest


def _held_task():
    """A task body that returns 42 once ``release`` is set, so that a test can close a panel while it runs."""
    release = threading.Event()

    def work(handle):
        release.wait(30)
        return 42

    return release, work


@pytest.mark.gui
def test_a_task_that_ends_after_its_panel_closed_is_dropped_quietly(qtbot):
    from qtpy import sip

    from napari_robustmedsam.widgets._common import TaskRow, run_task

    row = TaskRow()  # not given to qtbot: the test deletes it
    release, work = _held_task()
    results = []

    handle = run_task(work, on_done=results.append, name="slow", row=row)
    assert row.busy
    sip.delete(row)  # the panel is closed while the task runs
    release.set()
    qtbot.waitUntil(lambda: handle.done, timeout=30_000)
    assert results == []  # nothing was delivered into the deleted panel, and no exception reached Qt's loop


@pytest.mark.gui
def test_a_task_without_a_row_is_dropped_when_its_owner_panel_closed(qtbot):
    from qtpy import sip
    from qtpy.QtWidgets import QWidget

    from napari_robustmedsam.widgets._common import run_task

    owner, kept = QWidget(), QWidget()
    qtbot.addWidget(kept)
    release, work = _held_task()
    results = []

    dropped = run_task(work, on_done=results.append, name="slow", owner=owner)
    delivered = run_task(work, on_done=results.append, name="slow too", owner=kept)
    sip.delete(owner)
    release.set()
    qtbot.waitUntil(lambda: dropped.done and delivered.done, timeout=30_000)
    assert results == [42]  # only the task whose panel is still open delivered


@pytest.mark.gui
def test_a_task_delivers_its_result_and_hides_its_row(qtbot):
    from napari_robustmedsam.widgets._common import TaskRow, run_task

    row = TaskRow()
    qtbot.addWidget(row)
    results = []
    handle = run_task(lambda handle: 42, on_done=results.append, name="quick", row=row)
    qtbot.waitUntil(lambda: handle.done, timeout=30_000)
    assert results == [42] and not row.busy
