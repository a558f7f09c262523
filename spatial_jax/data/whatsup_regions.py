"""What'sUp token regions as the official code defines them, per experiment.

- Probing (paper App. C.7, official `probing/src/whatsup.py`): one box per position (left, middle,
  right) and middle object, in normalised [0, 1] image coordinates (drawn on a 64 x 64 patch grid of
  Gemma 3's 896-px input), mapped to an n x n token grid by `bbox_norm_to_patches`. The boxes of
  neighbouring positions may share a column (e.g. the chair's middle and right boxes on 12 x 12);
  such tokens count for both positions.
- Criss-cross (official `criss_cross_patching/src/regions.py`): the left and right object and strip
  regions are hand-labelled per middle object on Qwen2-VL's 12 x 12 and Gemma 3's 16 x 16 grids
  (the tables live with those families' geometries: `Geometry.whatsup_hand_labelled`);
  there is no middle region and no table for any other grid (the official code runs no Pixtral
  What'sUp criss-cross). Gemma 3's "table" strips are 6 and 4 columns wide: the official swap pairs
  clean[left + right] with cf[right + left] position by position, so there the pairing is uneven
  (see `experiments.criss_cross.region_index`).
"""
from __future__ import annotations

import numpy as np

from spatial_jax.data.geometry import GEOMETRIES, Geometry
from spatial_jax.data.regions import Regions, block, complement, object_regions

POSITIONS = ("left", "middle", "right")

# middle -> position -> ((row0, row1), (col0, col1)), fractions of the image side.
BBOX_NORM: dict[str, dict[str, tuple[tuple[float, float], tuple[float, float]]]] = {
    "chair": {"left": ((48 / 64, 60 / 64), (12 / 64, 24 / 64)),
              "middle": ((16 / 64, 60 / 64), (24 / 64, 40 / 64)),
              "right": ((48 / 64, 60 / 64), (40 / 64, 52 / 64))},
    "table": {"left": ((40 / 64, 60 / 64), (8 / 64, 16 / 64)),
              "middle": ((20 / 64, 60 / 64), (16 / 64, 48 / 64)),
              "right": ((40 / 64, 60 / 64), (48 / 64, 56 / 64))},
    "armchair": {"left": ((52 / 64, 60 / 64), (8 / 64, 20 / 64)),
                 "middle": ((24 / 64, 60 / 64), (20 / 64, 44 / 64)),
                 "right": ((52 / 64, 60 / 64), (44 / 64, 56 / 64))},
}

def bbox_norm_to_patches(box: tuple[tuple[float, float], tuple[float, float]], n: int) -> np.ndarray:
    """The official `bbox_norm_to_patches`: a normalised ((r0, r1), (c0, c1)) box -> int32 indices
    on an n x n grid, rows int(r0 n) .. round(r1 n) (exclusive; at least one), columns alike."""
    (r0, r1), (c0, c1) = box
    pr0 = max(0, int(r0 * n))
    pr1 = max(pr0 + 1, min(n, int(round(r1 * n))))
    pc0 = max(0, int(c0 * n))
    pc1 = max(pc0 + 1, min(n, int(round(c1 * n))))
    return block((n, n), range(pr0, pr1), range(pc0, pc1))


def bbox_regions(middle: str, n: int) -> Regions:
    """Probing regions of a stitched scene on an n x n grid: each position's box tokens, and as its
    strip the full-height band of the box's columns (for the heatmap; the official code has none)."""
    return object_regions(tuple(bbox_norm_to_patches(BBOX_NORM[middle][p], n) for p in POSITIONS), (n, n))


def hand_labelled_regions(geometry: Geometry, middle: str) -> Regions:
    """Criss-cross regions of the official tables (`geometry.whatsup_hand_labelled`, on its
    n_tokens x n_tokens grid): left and right object and strip tokens, the middle slot empty (the
    official swap uses only the sides)."""
    tables = geometry.whatsup_hand_labelled
    if tables is None:
        known = sorted(name for name, g in GEOMETRIES.items() if g.whatsup_hand_labelled is not None)
        raise ValueError(f"no official hand-labelled What'sUp regions for geometry {geometry.name!r} (only "
                         f"{known}); use the box regions instead")
    n = geometry.n_tokens
    empty = np.zeros(0, np.int32)

    def sides(table):
        left, right = (block((n, n), *table[middle][s]) for s in ("left", "right"))
        return left, empty, right

    objects = sides(tables["objects"])
    return Regions(grid=(n, n), objects=objects, strips=sides(tables["strips"]),
                   background=complement(n * n, objects))
