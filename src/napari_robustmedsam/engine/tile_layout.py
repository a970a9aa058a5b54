"""Tile geometry of large 2D images: which images are tiled, and the tiles' inner blocks and outer regions.

The rules (threshold, halo, balanced blocks) are described in :mod:`.tiling`, which embeds and decodes the tiles;
this module is geometry only, so a caller can ask whether an image is tiled without importing torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DEFAULT_TILE_THRESHOLD = 2048
DEFAULT_HALO = 256


@dataclass(frozen=True)
class Tile:
    """One tile: ``inner`` and ``outer`` as (y0, y1, x0, x1) half-open pixel ranges of the full image."""

    index: int
    inner: tuple[int, int, int, int]
    outer: tuple[int, int, int, int]

    @property
    def offset(self) -> tuple[int, int]:
        """(x0, y0) of the outer region: subtract from full-image (x, y) to get tile coordinates."""
        return self.outer[2], self.outer[0]

    @property
    def outer_shape(self) -> tuple[int, int]:
        return self.outer[1] - self.outer[0], self.outer[3] - self.outer[2]

    def to_json(self) -> dict:
        return {"index": self.index, "inner": list(self.inner), "outer": list(self.outer)}

    @classmethod
    def from_json(cls, d: dict) -> "Tile":
        return cls(int(d["index"]), tuple(int(v) for v in d["inner"]), tuple(int(v) for v in d["outer"]))


def _splits(length: int, n: int) -> list[tuple[int, int]]:
    edges = [round(i * length / n) for i in range(n + 1)]
    return [(edges[i], edges[i + 1]) for i in range(n)]


def needs_tiling(shape_hw: tuple[int, int], threshold: int | None = DEFAULT_TILE_THRESHOLD) -> bool:
    return threshold is not None and threshold > 0 and max(int(shape_hw[0]), int(shape_hw[1])) > threshold


def tile_layout(
    shape_hw: tuple[int, int],
    threshold: int = DEFAULT_TILE_THRESHOLD,
    halo: int = DEFAULT_HALO,
    tile_shape: tuple[int, int] | int | None = None,
) -> list[Tile]:
    """Tiles covering an image of ``shape_hw`` (H, W).

    ``tile_shape``: the maximal inner block (default ``threshold - 2 * halo`` per axis, so that an outer
    region is at most ``threshold`` px). Block sizes are balanced along each axis.
    """
    h, w = int(shape_hw[0]), int(shape_hw[1])
    if tile_shape is None:
        side = threshold - 2 * halo
        if side < 16:
            raise ValueError(f"halo {halo} is too large for a tile threshold of {threshold} px")
        tile_shape = (side, side)
    elif isinstance(tile_shape, int):
        tile_shape = (tile_shape, tile_shape)
    ny, nx = max(1, math.ceil(h / tile_shape[0])), max(1, math.ceil(w / tile_shape[1]))
    tiles = []
    for iy, (y0, y1) in enumerate(_splits(h, ny)):
        for ix, (x0, x1) in enumerate(_splits(w, nx)):
            outer = (max(0, y0 - halo), min(h, y1 + halo), max(0, x0 - halo), min(w, x1 + halo))
            tiles.append(Tile(iy * nx + ix, (y0, y1, x0, x1), outer))
    return tiles
