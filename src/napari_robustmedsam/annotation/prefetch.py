"""Embed a volume's slices nearest-first around the slice the user looks at, so the first click waits for one slice.

Opening a volume starts one worker (:class:`SlicePrefetcher`, wired by :meth:`.controller.AnnotationController.
start_prefetch`): it embeds the current slice first, then its neighbours in the order of :func:`prefetch_order`
(current, +1, -1, +2, -2, ...), re-reading the user's slice after every embedding so that scrolling moves the front.
A click on a slice that the worker is embedding at that moment waits for it instead of encoding it a second time
(:meth:`.slice_embeddings.SliceEmbeddings.get`). Progress is the number of slices ready; Cancel keeps them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from .slice_embeddings import Cancelled


def prefetch_order(n_slices: int, current: int, ready: Iterable[int] = ()) -> list[int]:
    """Slices ``0..n_slices-1`` not in ``ready``, nearest to ``current`` first; at equal distance the one above
    (``current + d``) before the one below, the direction a reader scrolls first."""
    if n_slices <= 0:
        return []
    current = min(max(int(current), 0), n_slices - 1)
    done = set(int(z) for z in ready)
    order = [current]
    for d in range(1, n_slices):
        order.extend(z for z in (current + d, current - d) if 0 <= z < n_slices)
    return [z for z in order if z not in done]


class SlicePrefetcher:
    """Embeds every slice of ``embeddings`` (a :class:`.slice_embeddings.SliceEmbeddings`), nearest to ``focus()``
    first. :meth:`run` is the worker's body."""

    def __init__(self, embeddings, focus: Callable[[], int]) -> None:
        self.embeddings = embeddings
        self.focus = focus
        self.order: list[int] = []  # the slices in the order they were embedded (tests, benchmarks)

    def next_slice(self) -> int | None:
        emb = self.embeddings
        todo = prefetch_order(emb.n_slices, self.focus(), (z for z in range(emb.n_slices) if emb.has(z)))
        return todo[0] if todo else None

    def run(self, progress: Callable[[int, int], None] | None = None,
            is_cancelled: Callable[[], bool] | None = None) -> int:
        """Embed until every slice is ready; return how many this run embedded (or read from the disk cache).
        Raises :class:`Cancelled` when ``is_cancelled()`` turns true (slices already embedded are kept)."""
        emb = self.embeddings
        while True:
            if is_cancelled is not None and is_cancelled():
                raise Cancelled(f"background embedding cancelled with {emb.n_ready} of {emb.n_slices} slices ready")
            z = self.next_slice()
            if z is None:
                return len(self.order)
            emb.get(z)
            self.order.append(z)
            if progress is not None:
                progress(emb.n_ready, emb.n_slices)
