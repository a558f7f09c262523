"""What'sUp token regions as the official code defines them, per experiment.

- Probing (paper App. C.7, official `probing/src/whatsup.py`): one box per position (left, middle,
  right) and middle object, in normalised [0, 1] image coordinates (drawn on a 64 x 64 patch grid of
  Gemma 3's 896-px input), mapped to an n x n token grid by `bbox_norm_to_patches`. The boxes of
  neighbouring positions may share a column (e.g. the chair's middle and right boxes on 12 x 12);
  such tokens count for both positions.
- Criss-cross (official `criss_cross_patching/src/regions.py`): the left and right object and strip
  regions are hand-labelled per middle object on Qwen2-VL's 12 x 12 and Gemma 3's 16 x 16 grids;
  there is no middle region and no table for any other grid (the official code runs no Pixtral
  What'sUp criss-cross). Gemma 3's "table" strips are 6 and 4 columns wide: the official swap pairs
  clean[left + right] with cf[right + left] position by position, so there the pairing is uneven
  (see `experiments.criss_cross.region_index`).
"""
from __future__ import annotations

import numpy as np

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

# geometry -> middle -> side -> (rows range, cols range) on the geometry's square grid.
HAND_LABELLED_OBJECTS: dict[str, dict[str, dict[str, tuple[range, range]]]] = {
    "qwen2_vl": {  # 12 x 12
        "chair": {"left": (range(8, 11), range(1, 4)), "right": (range(8, 11), range(8, 11))},
        "table": {"left": (range(6, 11), range(0, 3)), "right": (range(6, 11), range(9, 12))},
        "armchair": {"left": (range(9, 11), range(1, 4)), "right": (range(9, 11), range(8, 11))},
    },
    "gemma3": {  # 16 x 16
        "chair": {"left": (range(12, 15), range(3, 6)), "right": (range(12, 15), range(10, 13))},
        "table": {"left": (range(10, 15), range(2, 4)), "right": (range(10, 15), range(12, 14))},
        "armchair": {"left": (range(13, 15), range(2, 5)), "right": (range(13, 15), range(11, 14))},
    },
}
HAND_LABELLED_STRIPS: dict[str, dict[str, dict[str, tuple[range, range]]]] = {
    "qwen2_vl": {
        "chair": {"left": (range(12), range(0, 4)), "right": (range(12), range(8, 12))},
        "table": {"left": (range(12), range(0, 3)), "right": (range(12), range(9, 12))},
        "armchair": {"left": (range(12), range(0, 4)), "right": (range(12), range(8, 12))},
    },
    "gemma3": {
        "chair": {"left": (range(16), range(0, 6)), "right": (range(16), range(10, 16))},
        "table": {"left": (range(16), range(0, 6)), "right": (range(16), range(12, 16))},
        "armchair": {"left": (range(16), range(0, 5)), "right": (range(16), range(11, 16))},
    },
}
HAND_LABELLED_GRIDS = {"qwen2_vl": 12, "gemma3": 16}


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


def hand_labelled_regions(geometry_name: str, middle: str) -> Regions:
    """Criss-cross regions of the official tables: left and right object and strip tokens, the
    middle slot empty (the official swap uses only the sides)."""
    if geometry_name not in HAND_LABELLED_GRIDS:
        raise ValueError(f"no official hand-labelled What'sUp regions for geometry {geometry_name!r} (only "
                         f"{sorted(HAND_LABELLED_GRIDS)}); use the box regions instead")
    n = HAND_LABELLED_GRIDS[geometry_name]
    empty = np.zeros(0, np.int32)

    def sides(table):
        left, right = (block((n, n), *table[geometry_name][middle][s]) for s in ("left", "right"))
        return left, empty, right

    objects = sides(HAND_LABELLED_OBJECTS)
    return Regions(grid=(n, n), objects=objects, strips=sides(HAND_LABELLED_STRIPS),
                   background=complement(n * n, objects))
