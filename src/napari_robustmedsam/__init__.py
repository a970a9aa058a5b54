"""napari-robustmedsam: robust interactive segmentation of degraded medical images."""

__version__ = "0.1.0"
