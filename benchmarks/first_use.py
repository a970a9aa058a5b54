"""First use of the app: how soon the window paints, and whether the GUI freezes before or at the first box.

Starts the launcher (``napari-robustmedsam --phantom``) in a fresh process, as a user would, and records:

- ``painted_s``: seconds from the script's start to the first frame the canvas draws;
- ``ready_s``: to the plugin docked, the model loaded and the embedding computed (no task running);
- ``max_stall_*_ms``: the longest time the GUI thread did not run its event loop (a 20 ms heartbeat timer
  measures the gaps between its ticks): after the first paint until ready, and during the first and second box;
- ``box_*_ms``: from a box added to the box layer (as the mouse does) to the mask layer updated.

``--fresh-numba`` gives the child an empty numba cache (``NUMBA_CACHE_DIR``): napari's compiled drawing code as
on a machine where napari never ran. Without it, numba's on-disk cache from earlier runs is used.
Target (issue 25): window painted within 10 s, no stall over 1 s after it, the first box included.

    xvfb-run -a -s "-screen 0 1600x1000x24" python benchmarks/first_use.py [--fresh-numba] [--runs 1] [--json out]

To measure other code (e.g. before a change), put its ``src`` first on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

T0 = time.perf_counter()


def child(out_path: str) -> None:
    from napari_robustmedsam import launch

    result: dict = {}
    ready_obj = launch.setup(launch.parse_args(["--phantom"]))
    viewer, handle, _fit = ready_obj
    result["setup_returned_s"] = time.perf_counter() - T0
    from qtpy.QtCore import QEventLoop, QTimer

    from napari_robustmedsam.widgets._common import any_task_running

    ticks: list[float] = []
    heartbeat = QTimer()
    heartbeat.setInterval(20)
    heartbeat.timeout.connect(lambda: ticks.append(time.perf_counter()))
    heartbeat.start()
    painted: list[float] = []
    try:
        canvas = viewer.window._qt_viewer.canvas._scene_canvas
        canvas.events.draw.connect(lambda event: painted.append(time.perf_counter()))
    except AttributeError:  # another napari layout: the first heartbeat is when the event loop ran
        pass
    loop = QEventLoop()

    def pump_until(cond, timeout=900.0):
        t = time.perf_counter()
        timer = QTimer()
        timer.setInterval(5)
        timer.timeout.connect(lambda: (cond() or time.perf_counter() - t > timeout) and loop.quit())
        timer.start()
        while not cond() and time.perf_counter() - t <= timeout:
            loop.exec()
        timer.stop()
        if not cond():
            raise TimeoutError("timed out")

    def annotator():
        if hasattr(handle, "annotator"):  # a launcher that returns the docked widget
            return handle.annotator
        return handle.widget.annotator if getattr(handle, "widget", None) is not None else None

    def is_ready():
        return getattr(handle, "ready", True) and annotator() is not None and not any_task_running()

    pump_until(lambda: bool(painted) or len(ticks) > 2)
    result["painted_s"] = (painted[0] if painted else ticks[0]) - T0
    t_paint = painted[0] if painted else ticks[0]
    pump_until(is_ready)
    result["ready_s"] = time.perf_counter() - T0

    def max_gap(start, end):
        inside = [t for t in ticks if start <= t <= end]
        edges = [start, *inside, end]
        return max(b - a for a, b in zip(edges, edges[1:])) * 1000

    result["max_stall_until_ready_ms"] = max_gap(t_paint, time.perf_counter())
    # where the long stalls were (seconds since start, ms), and the launcher's own milestones if it has any
    result["stalls_over_300ms"] = [(round(a - T0, 2), round((b - a) * 1000)) for a, b in zip(ticks, ticks[1:])
                                   if b - a > 0.3]
    result["milestones_s"] = {k: round(v + getattr(handle, "_t0", T0) - T0, 2) for k, v in getattr(handle, "seconds", {}).items()}
    ann = annotator()
    for name, box in (("first", (60, 70, 190, 200)), ("second", (70, 60, 200, 190))):
        done: list[float] = []

        def on_segmented(z, s, done=done):
            done.append(time.perf_counter())
            loop.quit()

        ann.segmented.connect(on_segmented)
        t = time.perf_counter()
        ann.add_box(box)
        pump_until(lambda: bool(done) and not any_task_running())
        end = time.perf_counter()
        pump_until(lambda: time.perf_counter() - end > 0.2)  # the frame after it
        result[f"box_{name}_ms"] = (done[0] - t) * 1000
        result[f"max_stall_{name}_box_ms"] = max_gap(t, time.perf_counter())
        ann.segmented.disconnect(on_segmented)
        ann.clear()
    with open(out_path, "w") as fh:
        json.dump(result, fh)
    viewer.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fresh-numba", action="store_true", help="an empty numba cache, as on a first launch ever")
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--json", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child)
        return
    rows = []
    for run in range(args.runs):
        with tempfile.TemporaryDirectory() as tmp:
            env = dict(os.environ)
            if args.fresh_numba:
                env["NUMBA_CACHE_DIR"] = os.path.join(tmp, "numba")
            env.setdefault("ROBUSTMEDSAM_CACHE_DIR", os.path.join(tmp, "cache"))  # the embedding computed too
            out = os.path.join(tmp, "result.json")
            proc = subprocess.run([sys.executable, __file__, "--child", out], env=env, capture_output=True, text=True)
            if proc.returncode != 0 or not os.path.exists(out):
                raise SystemExit(f"child failed:\n{proc.stderr[-3000:]}")
            with open(out) as fh:
                row = json.load(fh)
        row["load_average"] = os.getloadavg()[0]
        rows.append(row)
        print(f"run {run}: " + ", ".join(
            f"{k} {v}" if not isinstance(v, float) else f"{k} {v:.2f}" if k.endswith("_s") or k == "load_average"
            else f"{k} {v:.0f}" for k, v in row.items()))
    worst = max(max(r["max_stall_until_ready_ms"], r["max_stall_first_box_ms"], r["max_stall_second_box_ms"]) for r in rows)
    painted = max(r["painted_s"] for r in rows)
    print(f"window painted within {painted:.1f} s (target 10 s: {'met' if painted <= 10 else 'NOT met'}); "
          f"longest GUI stall after it {worst:.0f} ms (target 1000 ms: {'met' if worst <= 1000 else 'NOT met'})")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
