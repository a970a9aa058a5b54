"""Hashes of model weights: what a cached embedding's signature records about the model.

Hashes are xxh3-128 (``xxhash``, several GB/s) over names, shapes, dtypes and raw bytes, in name order, so the
tensors of a checkpoint and the module they were loaded into hash alike: a model loaded without its image encoder
(to decode cached embeddings) can still name the encoder's hash without building it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

try:  # xxhash is a dependency of several installed packages; blake2b is the fallback
    import xxhash

    def new_hasher():
        return xxhash.xxh3_128()

    HASH_NAME = "xxh3_128"
except ImportError:  # pragma: no cover - exercised only without xxhash
    import hashlib

    def new_hasher():
        return hashlib.blake2b(digest_size=16)

    HASH_NAME = "blake2b_128"


def hash_state(state, dtype: torch.dtype | None = None) -> str:
    """Hash of a state dict (names, shapes, dtypes, values), in name order, so a checkpoint's tensors and the
    module they were loaded into hash alike. ``dtype``: hash floating-point tensors as converted to it (what
    ``module.to(dtype)`` would make of them)."""
    import torch

    h = new_hasher()
    for name in sorted(state):
        t = state[name].detach()
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        if t.numel():
            t = t.cpu().contiguous()
            if t.dtype == torch.bfloat16:
                t = t.view(torch.int16)
            h.update(memoryview(t.reshape(-1).numpy().view(np.uint8)))
    return h.hexdigest()
