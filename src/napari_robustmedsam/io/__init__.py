"""File input/output: images, volumes and masks (atomic writes)."""

from .atomic import atomic_write_path
from .images import read_image, write_mask

__all__ = ["atomic_write_path", "read_image", "write_mask"]
