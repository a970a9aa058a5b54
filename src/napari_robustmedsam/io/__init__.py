"""File input/output: images, volumes and masks (atomic writes)."""

from .atomic import atomic_write_path
from .images import read_image, read_image_geometry, write_mask
from .medical import Geometry, read_medical
from .medical_labels import write_labels

__all__ = [
    "Geometry", "atomic_write_path", "read_image", "read_image_geometry", "read_medical", "write_labels", "write_mask",
]
