"""Per-model patch-grid geometry: canvas, slots, strips, and pixel-box -> visual-token mapping.

One `Geometry` per model family (paper Table 4), kept in the family's folder
(`spatial_jax/families/<name>/__init__.py`, `Family.geometry`), which registering the family
enters in `GEOMETRIES`; datasets, regions and experiments all read it from there
(`get_geometry(name)`). The model organism's canvas (`ORGANISM`) is registered here: it is a
property of the organism checkpoints, not of a family.

Visual tokens are numbered row-major over the merged token grid, index = row * n_cols + col:
the order in which Qwen2-VL (after its 2x2 merge) and Gemma 3 (after its 4x4 pooling) feed
them to the language model.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal, Mapping, Optional

import numpy as np

Box = tuple[float, float, float, float]  # (x0, y0, x1, y1) in pixels, x1/y1 exclusive

# How a model's processor turns an image of arbitrary size into a token grid:
#   fixed: always resized to one square size (Gemma 3: 896 px -> 16x16 tokens);
#   round: each side rounded to a multiple of the token size (Qwen2-VL smart_resize, within its
#          min/max pixel budget);
#   ceil:  each side padded up to a multiple of the token size (Pixtral, images <= 1024 px).
GridRounding = Literal["fixed", "round", "ceil"]


@dataclass(frozen=True)
class Geometry:
    """The synthetic canvas of one model, in merged visual tokens.

    Attributes:
      name: registry key.
      n_tokens: N, tokens per canvas side (the canvas is N x N tokens).
      token_px: P, pixels per token side (Qwen2-VL 28 = 2x2 merged 14-px patches).
      object_tokens: S, tokens per object side (objects are S x S tokens, grid aligned).
      spacing: sp, empty tokens between neighbouring objects.
      whatsup_px: side of a stitched What'sUp image (the model's native input size).
      grid_rounding: how an image of another size maps to a token grid (see `token_grid`).
      colours: the official Squares/Shapes palette where a model's differs (name -> RGB; None: the
        default `synthetic.SQUARE_COLOURS`).
      objects: the official Objects set where a model's differs (None: `synthetic.OBJECTS`).
      whatsup_hand_labelled: the official hand-labelled What'sUp criss-cross regions on this grid,
        {"objects" | "strips": {middle: {"left" | "right": (rows range, cols range)}}} (None: the
        official code has none for this model; see data/whatsup_regions.py).
    """

    name: str
    n_tokens: int
    token_px: int
    object_tokens: int
    spacing: int
    whatsup_px: int
    grid_rounding: GridRounding
    colours: Optional[Mapping[str, tuple[int, int, int]]] = None
    objects: Optional[tuple[str, ...]] = None
    whatsup_hand_labelled: Optional[Mapping[str, Mapping[str, Mapping[str, tuple[range, range]]]]] = None

    @property
    def canvas_px(self) -> int:
        return self.n_tokens * self.token_px

    @property
    def n_visual_tokens(self) -> int:
        return self.n_tokens * self.n_tokens

    @property
    def pitch(self) -> int:
        """Tokens from one object's start to the next one's."""
        return self.object_tokens + self.spacing

    @property
    def span(self) -> int:
        """Tokens the row of three objects spans along its axis."""
        return 3 * self.object_tokens + 2 * self.spacing

    def _spaced(self, spacing: int | None) -> "Geometry":
        """This geometry with another spacing between the objects (None: its own)."""
        if spacing is None or spacing == self.spacing:
            return self
        if spacing < 0:
            raise ValueError(f"spacing must be >= 0, got {spacing}")
        return dataclasses.replace(self, spacing=spacing)

    def _start(self) -> tuple[int, int]:
        # (along, across) origin of the unshifted layout, the paper's floor-rounded centring
        return (self.n_tokens - self.span) // 2, (self.n_tokens - self.object_tokens) // 2

    def max_shift(self, spacing: int | None = None) -> tuple[tuple[int, int], tuple[int, int]]:
        """Allowed layout shifts ((along_lo, along_hi), (across_lo, across_hi)), inclusive.

        `along` moves the row of three objects along its own axis, `across` moves it
        perpendicular to it; both keep every object inside the canvas. spacing: of a layout with
        another spacing between its objects (e.g. 0: packed), centred the same way.
        """
        g = self._spaced(spacing)
        along0, across0 = g._start()
        return ((-along0, g.n_tokens - g.span - along0),
                (-across0, g.n_tokens - g.object_tokens - across0))

    def slot_origins(self, horizontal: bool, shift: tuple[int, int] = (0, 0),
                     spacing: int | None = None) -> tuple[tuple[int, int], ...]:
        """(row, col) token origin of the 3 slots, slot 0 = left (horizontal) or top (vertical).

        Paper section 2: y = (N - S)//2, x0 = (N - (3S + 2sp))//2, x_i = x0 + i(S + sp) for the
        horizontal case; the vertical case is the transpose. `shift` = (along, across) tokens;
        `spacing` replaces sp (e.g. 0 packs the objects, so shifts can carry them across strips).
        """
        g = self._spaced(spacing)
        (along_lo, along_hi), (across_lo, across_hi) = g.max_shift()
        along, across = shift
        if not (along_lo <= along <= along_hi and across_lo <= across <= across_hi):
            raise ValueError(f"{self.name}: shift {shift} moves objects off the {self.n_tokens}-token canvas")
        along0, across0 = g._start()
        starts = [along0 + along + i * g.pitch for i in range(3)]
        fixed = across0 + across
        return tuple((fixed, s) if horizontal else (s, fixed) for s in starts)

    def strip_bounds(self, along_shift: int = 0, spacing: int | None = None) -> tuple[tuple[int, int], ...]:
        """[start, stop) of the 3 strips along the layout axis; they tile 0..N.

        Each column (row, for vertical layouts) belongs to the object whose centre is nearest,
        measuring centres in the exactly centred layout (centre N/2 + shift, pitch S + sp) rather
        than the slot formula's floor-rounded one, and a column exactly halfway between two objects
        goes to the middle strip. The outer strips are then mirror images of each other, which the
        left<->right criss-cross swap needs; this gives the official widths Qwen (4,4,4),
        Gemma (5,6,5), Pixtral (5,5,5). Column j (centre j + 1/2) is in the middle strip iff
        |2j + 1 - (N + 2 shift)| <= S + sp; the arithmetic below is that test, doubled to stay integral.
        """
        pitch = self._spaced(spacing).pitch
        twice_centre = self.n_tokens + 2 * along_shift
        lo = -((-(twice_centre - pitch - 1)) // 2)  # ceil
        hi = (twice_centre + pitch - 1) // 2 + 1
        lo, hi = (min(max(b, 0), self.n_tokens) for b in (lo, hi))
        return ((0, lo), (lo, hi), (hi, self.n_tokens))

    def strip_widths(self) -> tuple[int, int, int]:
        return tuple(stop - start for start, stop in self.strip_bounds())

    def token_grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """(rows, cols) of merged visual tokens for an image of (width, height) pixels."""
        width, height = image_size
        if self.grid_rounding == "fixed":
            return self.n_tokens, self.n_tokens
        if self.grid_rounding == "round":
            return max(1, round(height / self.token_px)), max(1, round(width / self.token_px))
        return math.ceil(height / self.token_px), math.ceil(width / self.token_px)

    def box_tokens(self, box: Box, image_size: tuple[int, int]) -> np.ndarray:
        """Token indices [K] covered by a pixel box of an image of (width, height) pixels."""
        return box_to_tokens(box, image_size, self.token_grid(image_size))


def box_to_tokens(box: Box, image_size: tuple[int, int], grid: tuple[int, int]) -> np.ndarray:
    """Sorted int32 indices (row * n_cols + col) of the grid cells whose centre lies in a pixel box.

    Centres, not any overlap, so that boxes which only touch (What'sUp's left/middle/right) get
    disjoint tokens, and a grid-aligned object box gets exactly its cells. A box too small to hold
    any centre gets the cell its own centre lies in. (The official COCO code counts any overlap,
    one ring of border cells more.)

    Args:
      box: (x0, y0, x1, y1) pixels with x1, y1 exclusive.
      image_size: (width, height) of the image the box is in.
      grid: (n_rows, n_cols) of visual tokens the image becomes.
    Returns:
      [K] int32, K >= 1.
    """
    width, height = image_size
    n_rows, n_cols = grid
    x0, y0, x1, y1 = box
    if x1 < x0 or y1 < y0:
        raise ValueError(f"box {box} has x1 < x0 or y1 < y0")

    def cells(lo: float, hi: float, extent: float, n: int) -> range:
        # cell c is in iff lo <= (c + 1/2) * extent / n < hi; rounding absorbs float noise on borders
        start, stop = (min(max(math.ceil(round(v * n / extent - 0.5, 9)), 0), n) for v in (lo, hi))
        if start < stop:
            return range(start, stop)
        centre = min(max(math.floor((lo + hi) / 2 * n / extent), 0), n - 1)
        return range(centre, centre + 1)

    rows = cells(y0, y1, height, n_rows)
    cols = cells(x0, x1, width, n_cols)
    return np.array([r * n_cols + c for r in rows for c in cols], dtype=np.int32)


# The model organism: a small Qwen2-VL on a 6x6 merged-token (168 px) canvas.
ORGANISM = Geometry("organism", n_tokens=6, token_px=28, object_tokens=1, spacing=1, whatsup_px=168,
                    grid_rounding="round")

# The optional config.json key naming a checkpoint's canvas geometry (the organisms have one of their
# own); without it a checkpoint's geometry is its family's.
GEOMETRY_KEY = "spatial_jax_geometry"

# name -> Geometry: the families' (entered by `spatial_jax.families` as it registers them) and the organism's.
GEOMETRIES: dict[str, Geometry] = {}


def register_geometry(geometry: Geometry) -> None:
    """Makes `geometry` known by its name; a second geometry under a taken name is an error."""
    if GEOMETRIES.get(geometry.name, geometry) != geometry:
        raise ValueError(f"a different geometry is already registered as {geometry.name!r}")
    GEOMETRIES[geometry.name] = geometry


def get_geometry(name: str) -> Geometry:
    """The registered geometry called `name` (one of GEOMETRIES)."""
    try:
        return GEOMETRIES[name]
    except KeyError:
        raise KeyError(f"unknown geometry {name!r}; known: {sorted(GEOMETRIES)}") from None


register_geometry(ORGANISM)
