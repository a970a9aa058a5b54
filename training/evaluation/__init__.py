"""Evaluation of promptable segmenters under the seed papers' robustness protocol.

``python -m training.evaluate`` is the command line; the pieces are:
:mod:`.dataset` (2D folders and 3D volumes), :mod:`.runner` (the loop, seeds, prompt modes),
:mod:`.store` (crash-safe, resumable results), :mod:`.parallel` (worker processes, torchrun sharding),
:mod:`.report` (Markdown tables and PNG plots). Metrics and prompt simulation live in the core package
(:mod:`napari_robustmedsam.metrics`, :mod:`napari_robustmedsam.prompting`).
"""
