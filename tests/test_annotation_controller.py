"""The annotator's decisions without a viewer: :class:`AnnotationController` with a recording view, a queued
worker runner and manual timers; the decoder is a stand-in that paints a square around the last point."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import numpy as np
import pytest

from napari_robustmedsam.annotation import controller as controller_module
from napari_robustmedsam.annotation import volume_propagation
from napari_robustmedsam.annotation.controller import AnnotationController, AnnotatorSettings, DecodeScheduler
from napari_robustmedsam.annotation.prompt_decoding import SliceResult
from napari_robustmedsam.annotation.session import SlicePrompts


class ManualTimer:
    def __init__(self, interval_ms, callback):
        self.interval_ms, self.callback, self.active = interval_ms, callback, False

    def start(self):
        self.active = True

    def stop(self):
        self.active = False

    def isActive(self):  # noqa: N802 - QTimer's name
        return self.active

    def fire(self):
        self.active = False
        self.callback()


class Workers:
    """run_task stand-in: the work runs when the test says so (``finish``), as a thread worker would finish later."""

    def __init__(self):
        self.queue = []

    def __call__(self, work, done, failed, name, kind):
        handle = SimpleNamespace(done=False, cancelled=False, report=lambda *a: None, is_cancelled=lambda: False)
        handle.cancel = lambda: setattr(handle, "cancelled", True)
        self.queue.append((work, done, failed, name, kind, handle))
        return handle

    def finish(self, index=0):
        work, done, failed, name, kind, handle = self.queue.pop(index)
        handle.done = True
        try:
            value = work(handle)
        except Exception as err:  # noqa: BLE001
            failed(err, "")
            return
        done(value)


class View:
    def __init__(self, shape):
        self.prompts = {}
        self.status, self.errors, self.done, self.propagations, self.changed = "", [], [], [], []
        self.model = SimpleNamespace(box_primary=False, name="stand-in")
        self.options = AnnotatorSettings(local_corrections="off", click_guard="off", zoom_small_objects=False)
        self.z = 0
        self.shape = shape

    def slice_prompts(self, z):
        return self.prompts.get(z, SlicePrompts())

    def current_z(self):
        return self.z

    def settings(self):
        return self.options

    def loaded_model(self):
        return self.model

    def with_model(self, then):
        then()
        return True

    def live(self):
        return True

    def show_error(self, err):
        self.errors.append(str(err))

    def show_hint(self, text):
        pass

    def clear_message(self):
        pass

    def set_status(self, text):
        self.status = text

    def mask_changed(self, z=None):
        self.changed.append(z)

    def labels_changed(self):
        pass

    def embeddings_changed(self):
        pass

    def clear_prompts(self, z=None):
        if z is None:
            self.prompts.clear()
        else:
            self.prompts.pop(z, None)

    def slice_done(self, z, seconds):
        self.done.append(z)

    def propagation_done(self, result):
        self.propagations.append(result)


class Embeddings:
    predictor = None

    def __init__(self, n):
        self.n_slices = n

    def has(self, z):
        return True

    def get(self, z):
        return None

    def slice_image(self, z):  # what the click refinement reads
        return np.zeros((32, 32), np.float32)


def fake_segment_slice(predictor=None, embedding=None, prompts=None, previous_mask=None, **kw):
    """A square of side 9 around the last point, added to the previous mask; one call recorded per decode."""
    fake_segment_slice.calls += 1
    x, y = (int(v) for v in prompts.points[-1])
    mask = np.zeros((32, 32), bool) if previous_mask is None else previous_mask.copy()
    mask[max(0, y - 4):y + 5, max(0, x - 4):x + 5] = prompts.labels[-1] == 1
    return SliceResult(mask, np.full((1, 1, 4, 4), float(fake_segment_slice.calls)), 0.9, previous_mask is not None,
                       prompts)


@pytest.fixture
def setup(monkeypatch):
    fake_segment_slice.calls = 0
    monkeypatch.setattr(controller_module, "segment_slice", fake_segment_slice)

    def make(shape=(32, 32), slow_ms=None):
        view, workers = View(shape), Workers()
        timers = []

        def make_timer(interval, callback):
            timers.append(ManualTimer(interval, callback))
            return timers[-1]

        ctl = AnnotationController(view, workers, make_timer, decode_context=contextlib.nullcontext)
        ctl.open_image(shape)
        ctl.set_embeddings(Embeddings(shape[0] if len(shape) == 3 else 1))
        if slow_ms is not None:
            ctl.scheduler.sync_ms[:] = [slow_ms] * 5  # the model measured slow on the GUI thread
        return ctl, view, workers

    return make


def click(view, z, points, labels):
    view.prompts[z] = SlicePrompts(np.asarray(points, float), np.asarray(labels, np.int64), None, "user")


def test_scheduler_measures_on_the_gui_thread_then_moves_slow_models_to_a_worker_and_probes_back():
    s = DecodeScheduler(limit_ms=100, probe_every=3)
    for _ in range(3):
        assert s.on_gui_thread()
        s.record(300.0, on_gui_thread=True)
    assert [s.on_gui_thread() for _ in range(6)] == [False, False, True, False, False, True]  # a probe every 3rd
    s.sync_ms[:] = [1000.0] * 5  # far too slow for the GUI thread: no probes
    assert not any(s.on_gui_thread() for _ in range(6))
    s.reset()
    assert s.on_gui_thread() and s.decoder_ms == []


def test_a_fast_model_decodes_inside_the_request_and_a_slow_one_in_a_worker(setup):
    ctl, view, workers = setup()
    click(view, 0, [[10, 10]], [1])
    ctl.segment(0)
    assert view.done == [0] and not workers.queue and ctl.scheduler.modes == {"sync": 1, "worker": 0}
    assert ctl.session.current[10, 10]
    ctl, view, workers = setup(slow_ms=5000.0)
    click(view, 0, [[10, 10]], [1])
    ctl.segment(0)
    assert view.done == [] and len(workers.queue) == 1 and ctl.running
    workers.finish()
    assert view.done == [0] and not ctl.running and ctl.scheduler.modes["worker"] == 1


def test_requests_during_a_worker_decode_wait_and_only_the_newest_runs(setup):
    ctl, view, workers = setup(slow_ms=5000.0)
    click(view, 0, [[10, 10]], [1])
    ctl.segment(0)
    for x in (20, 25):  # two more clicks while the first decode runs
        click(view, 0, [[10, 10], [x, 20]], [1, 1])
        ctl.segment(0)
    assert len(workers.queue) == 1 and ctl.pending is not None
    workers.finish()  # the first result lands, then the newest pending request starts
    assert len(workers.queue) == 1 and ctl.pending is None
    workers.finish()
    assert fake_segment_slice.calls == 2 and ctl.session.current[20, 25]


def test_a_result_that_arrives_after_clear_is_dropped(setup):
    ctl, view, workers = setup(slow_ms=5000.0)
    click(view, 0, [[10, 10]], [1])
    ctl.segment(0)
    ctl.clear()
    workers.finish()
    assert not ctl.session.current.any() and view.done == []


def test_taking_a_click_back_restores_the_earlier_state_without_decoding(setup):
    ctl, view, workers = setup()
    click(view, 0, [[10, 10]], [1])
    ctl.segment(0)
    first = (ctl.session.current.copy(), ctl.session.current_logits[0])
    click(view, 0, [[10, 10], [25, 25]], [1, 1])
    ctl.segment(0)
    assert ctl.session.current[25, 25] and fake_segment_slice.calls == 2
    click(view, 0, [[10, 10]], [1])  # the last click removed
    ctl.segment(0)
    assert fake_segment_slice.calls == 2  # no decode
    assert np.array_equal(ctl.session.current, first[0]) and ctl.session.current_logits[0] is first[1]
    assert "back to the mask before that click" in view.status


def test_propagation_starts_from_the_user_slices_and_reopens_the_last_commit(setup):
    ctl, view, workers = setup(shape=(5, 32, 32))
    assert ctl.propagation.seeds() is None and "nothing to propagate" in view.errors[-1]
    click(view, 2, [[10, 10]], [1])
    ctl.segment(2)
    assert sorted(ctl.propagation.seeds()) == [2]
    ctl.commit()
    assert not ctl.session.has_current
    seeds = ctl.propagation.seeds()  # nothing current: the committed object comes back, its non-empty slices
    assert sorted(seeds) == [2] and "Re-opened object 1" in view.status


def test_a_correction_after_propagation_starts_the_re_propagation_timer(setup, monkeypatch):
    ctl, view, workers = setup(shape=(5, 32, 32))
    click(view, 2, [[10, 10]], [1])
    ctl.segment(2)
    masks = np.zeros((5, 32, 32), bool)
    masks[1:4, 8:13, 8:13] = True
    result = SimpleNamespace(slices={1: SimpleNamespace(score=0.8), 3: SimpleNamespace(score=0.8)}, masks=masks,
                             logits={}, z_range=(1, 3), propagated=[1, 3], stopped={"down": "iou"})
    monkeypatch.setattr(volume_propagation, "predictor_segment_fn", lambda predictor, emb: None)
    monkeypatch.setattr(volume_propagation, "propagate_object", lambda *a, **k: result)
    ctl.propagation.propagate()
    workers.finish()
    assert view.propagations == [result] and ctl.propagation.propagated_once and ctl.session.current[1].any()
    assert not ctl.propagation.repropagate_timer.isActive()
    click(view, 3, [[20, 20]], [1])  # a correction on a propagated slice
    ctl.segment(3)
    assert ctl.propagation.changed_since_propagation == {3} and ctl.propagation.repropagate_timer.isActive()
    ctl.propagation.repropagate_timer.fire()  # the pause is over: only the stretches next to slice 3 run again
    assert len(workers.queue) == 1 and workers.queue[0][4] == "propagate"
    ctl.clear()  # a clear supersedes the running propagation: its result is dropped
    assert workers.queue[0][5].cancelled
    workers.finish()
    assert len(view.propagations) == 1 and not ctl.session.current.any()


def test_propagation_of_a_2d_image_is_refused_with_a_message(setup):
    ctl, view, workers = setup()
    assert ctl.propagation.propagate() is None and "3D volume" in view.errors[-1]


def test_prefetch_starts_at_the_users_slice_and_is_cancelled_with_the_embeddings(setup):
    from napari_robustmedsam.annotation.slice_embeddings import SliceEmbeddings

    class Encoder:
        encoded: list = []

        def compute_embedding(self, image):
            self.encoded.append(int(image[0, 0]))
            return None

    ctl, view, workers = setup((5, 32, 32))
    encoder = Encoder()
    vol = np.arange(5, dtype=np.int16)[:, None, None] * np.ones((1, 32, 32), np.int16)
    ctl.set_embeddings(SliceEmbeddings(encoder, vol, "volume"))
    view.z = 3
    ctl.start_prefetch()
    assert len(workers.queue) == 1 and workers.queue[0][4] == "prefetch"
    ctl.start_prefetch()  # one at a time
    assert len(workers.queue) == 1
    workers.finish()
    assert encoder.encoded == [3, 4, 2, 1, 0] and ctl.embeddings.complete and ctl.prefetch_handle is None
    encoder.encoded.clear()
    ctl.set_embeddings(SliceEmbeddings(encoder, vol, "volume"))
    ctl.start_prefetch()
    ctl.set_focus(1)  # the user moved before the worker got to run: it starts there
    workers.finish()
    assert encoder.encoded == [1, 2, 0, 3, 4]
    ctl.set_embeddings(SliceEmbeddings(encoder, vol, "volume"))
    ctl.start_prefetch()
    handle = workers.queue[-1][5]
    ctl.set_embeddings(None)  # another model / image: the running prefetch is cancelled
    assert handle.cancelled


def test_embedding_the_whole_volume_decodes_again_only_a_slice_whose_prompts_were_not_decoded(setup):
    from napari_robustmedsam.annotation.slice_embeddings import SliceEmbeddings

    class Encoder:
        def compute_embedding(self, image):
            return None

    vol = np.zeros((3, 32, 32), np.int16)
    ctl, view, workers = setup((3, 32, 32))
    ctl.set_embeddings(SliceEmbeddings(Encoder(), vol, "volume"))
    view.z = 1
    click(view, 1, [[10, 10]], [1])
    ctl.segment(1)  # the slice is embedded first, then decoded
    workers.finish()
    assert fake_segment_slice.calls == 1 and ctl.session.current[1, 10, 10]
    shown = view.status
    ctl.compute_embeddings()  # "Compute embeddings" (or the launcher's) ends after the box was decoded
    workers.finish()
    assert fake_segment_slice.calls == 1, "the slice's mask already answers its prompts: nothing to decode again"
    assert "Embedded 2 slice(s)" in view.status and "unchanged" not in view.status and "px" in shown
    # prompts drawn while nothing could decode them are decoded once the embeddings are there
    ctl.set_embeddings(SliceEmbeddings(Encoder(), vol, "volume"))
    click(view, 1, [[10, 10], [20, 20]], [1, 1])
    ctl.compute_embeddings()
    workers.finish()
    assert fake_segment_slice.calls == 2 and ctl.session.current[1, 20, 20]
