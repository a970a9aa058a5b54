"""napari-robustmedsam: robust interactive segmentation of degraded medical images."""

import os as _os
import sys as _sys

__version__ = "0.1.0"

# PyTorch's CPU allocator reads THP_MEM_ALLOC_ENABLE once, at its first allocation: ask it to back large
# tensors with transparent huge pages (fewer page faults; the LiteMedSAM encoder moves ~70 MB tensors).
# Only possible before torch is imported, and never overriding a user's own setting (set it to 0 to opt out).
# See engine/fast_cpu.py and docs/benchmarks.md for the measurements.
if "torch" not in _sys.modules:
    _os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
