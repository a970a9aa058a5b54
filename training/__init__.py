"""Training and evaluation of napari-robustmedsam models (depends on the core package, never on the UI)."""

import napari_robustmedsam  # noqa: F401  (first: its CPU allocator setting must precede the torch import)
