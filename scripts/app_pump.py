"""Driving the launched napari app from a script: run Qt's event loop until a condition holds, or until the app is
idle. Shared by the screenshot scripts (import after the app exists: it needs a QApplication)."""

from __future__ import annotations

import time


def event_pump():
    """(pump_until(cond, timeout=900.0), idle()): the first runs the event loop until ``cond()`` is true and raises
    TimeoutError after ``timeout`` seconds; the second waits for every task to end, then for 0.6 s of quiet."""
    from qtpy.QtCore import QEventLoop, QTimer

    from napari_robustmedsam.widgets._common import any_task_running

    loop = QEventLoop()

    def pump_until(cond, timeout=900.0):
        start = time.perf_counter()
        timer = QTimer()
        timer.setInterval(20)
        timer.timeout.connect(lambda: (cond() or time.perf_counter() - start > timeout) and loop.quit())
        timer.start()
        while not cond() and time.perf_counter() - start <= timeout:
            loop.exec()
        timer.stop()
        if not cond():
            raise TimeoutError("the app did not get there in time")

    def idle():
        pump_until(lambda: not any_task_running())
        settle = time.perf_counter()
        pump_until(lambda: time.perf_counter() - settle > 0.6)

    return pump_until, idle
