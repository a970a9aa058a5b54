"""Time to first mask: the nearest-first background embedding of a volume (no Qt, no model)."""

from __future__ import annotations

import threading
import time

import numpy as np

from napari_robustmedsam.annotation.prefetch import SlicePrefetcher, prefetch_order
from napari_robustmedsam.annotation.slice_embeddings import SliceEmbeddings


class CountingPredictor:
    """Stands in for the encoder: records which slices it encoded (by the slice's constant value)."""

    def __init__(self, delay_s: float = 0.0):
        self.encoded: list[int] = []
        self.delay_s = delay_s
        self.lock = threading.Lock()

    def compute_embedding(self, image):
        time.sleep(self.delay_s)
        with self.lock:
            self.encoded.append(int(image[0, 0]))
        return f"emb{int(image[0, 0])}"


def volume(n=7):
    return np.arange(n, dtype=np.int16)[:, None, None] * np.ones((1, 8, 8), np.int16)


def test_order_is_current_then_neighbours_nearest_first():
    assert prefetch_order(7, 3) == [3, 4, 2, 5, 1, 6, 0]
    assert prefetch_order(5, 0) == [0, 1, 2, 3, 4]
    assert prefetch_order(5, 4, ready=[3, 4]) == [2, 1, 0]
    assert prefetch_order(4, 99) == [3, 2, 1, 0]  # a slice outside the volume is clamped
    assert prefetch_order(0, 0) == []


def test_prefetch_embeds_the_current_slice_first_and_follows_the_user():
    predictor = CountingPredictor()
    emb = SliceEmbeddings(predictor, volume(), "volume")
    focus = {"z": 3}
    progress = []

    def report(done, total):
        progress.append((done, total))
        if done == 2:
            focus["z"] = 6  # the user scrolled: the front moves there

    n = SlicePrefetcher(emb, lambda: focus["z"]).run(progress=report)
    assert n == 7 and emb.complete
    assert predictor.encoded == [3, 4, 6, 5, 2, 1, 0]
    assert progress[-1] == (7, 7)


def test_a_slice_being_embedded_by_another_thread_is_waited_for_not_encoded_twice():
    predictor = CountingPredictor(delay_s=0.3)
    emb = SliceEmbeddings(predictor, volume(), "volume")
    results = []
    threads = [threading.Thread(target=lambda: results.append(emb.get(2))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert predictor.encoded == [2] and results == ["emb2"] * 3
