"""Token regions of a three-object image: each object's tokens, each object's strip, the background.

All regions are sorted int32 arrays of visual-token indices (row * n_cols + col) into the
flattened merged token grid; slot 0 is the left (or top) object, slot 2 the right (or bottom).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from spatial_jax.data.geometry import Box, Geometry, box_to_tokens


@dataclass(frozen=True, eq=False)
class Regions:
    """Token regions of one image.

    Attributes:
      grid: (n_rows, n_cols) of the visual-token grid the indices refer to.
      objects: per slot, [K_i] tokens the object occupies.
      strips: per slot, [M_i] tokens of the band through the object across the whole canvas
        (columns for horizontal layouts, rows for vertical ones).
      background: [B] tokens in no object.
    """

    grid: tuple[int, int]
    objects: tuple[np.ndarray, ...]
    strips: tuple[np.ndarray, ...]
    background: np.ndarray

    @property
    def n_tokens(self) -> int:
        return self.grid[0] * self.grid[1]


def _block(grid: tuple[int, int], rows: range, cols: range) -> np.ndarray:
    return np.array([r * grid[1] + c for r in rows for c in cols], dtype=np.int32)


def _background(n_tokens: int, objects: Sequence[np.ndarray]) -> np.ndarray:
    return np.setdiff1d(np.arange(n_tokens, dtype=np.int32), np.concatenate(objects)).astype(np.int32)


def layout_regions(geometry: Geometry, horizontal: bool, shift: tuple[int, int] = (0, 0),
                   spacing: int | None = None) -> Regions:
    """Regions of the synthetic three-slot layout (Squares, Shapes, Objects).

    Objects are the S x S token blocks at `geometry.slot_origins`; strips are the bands of
    `geometry.strip_bounds` (they partition the canvas); `shift` = (along, across) tokens;
    `spacing` (None: the geometry's) between the objects.
    """
    n, s = geometry.n_tokens, geometry.object_tokens
    grid = (n, n)
    objects = tuple(_block(grid, range(r, r + s), range(c, c + s))
                    for r, c in geometry.slot_origins(horizontal, shift, spacing))
    everything = range(n)
    strips = tuple(_block(grid, everything, range(a, b)) if horizontal else _block(grid, range(a, b), everything)
                   for a, b in geometry.strip_bounds(shift[0], spacing))
    return Regions(grid=grid, objects=objects, strips=strips, background=_background(n * n, objects))


def box_regions(boxes: Sequence[Box], image_size: tuple[int, int], grid: tuple[int, int]) -> Regions:
    """Regions of a horizontal scene from pixel boxes (What'sUp): one box per slot, left to right.

    Objects are the tokens each box overlaps; strips are the full-height column bands the boxes
    span (they need not tile the grid: photographed objects leave gaps between them).
    """
    objects = tuple(box_to_tokens(box, image_size, grid) for box in boxes)
    strips = tuple(_block(grid, range(grid[0]), range(int(obj.min() % grid[1]), int(obj.max() % grid[1]) + 1))
                   for obj in objects)
    return Regions(grid=grid, objects=objects, strips=strips, background=_background(grid[0] * grid[1], objects))
