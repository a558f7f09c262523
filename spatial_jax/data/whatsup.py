"""What'sUp, adapted to three objects (paper section 2): two controlled_images photos stitched.

The folder holds What'sUp `controlled_images` files `<obj>_left_of_<middle>.jpeg` and
`<obj>_right_of_<middle>.jpeg`. A scene (left, middle, right) is the left half of
`<left>_left_of_<middle>.jpeg` next to the right half of `<right>_right_of_<middle>.jpeg`, both first
resized (bilinear) to size x size. Items: for each middle, every ordered (target, distractor) pair of
its side objects x {left, right}; horizontal only.

Per experiment, as the official code runs it: the stitched side is the model's native size
(`Geometry.whatsup_px`: Qwen2-VL 336, Gemma 3 896, Pixtral 512) for behaviour, last-token and
criss-cross, and its synthetic canvas (`Geometry.canvas_px`: 336, 896, Pixtral 240 = 15 x 15 tokens)
for probing (`probe_items`); token regions come from the probing boxes ("bbox") or, for criss-cross,
the hand-labelled tables ("hand_labelled"; see `whatsup_regions`).
"""
from __future__ import annotations

import functools
import itertools
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from PIL import Image

from spatial_jax.data.files import open_rgb
from spatial_jax.data.geometry import Box, Geometry
from spatial_jax.data.items import Item
from spatial_jax.data.prompts import HORIZONTAL, cloze_prompt
from spatial_jax.data.regions import box_regions
from spatial_jax.data.scoring import Tokenizer, is_single_token
from spatial_jax.data.whatsup_regions import bbox_regions, hand_labelled_regions

MIDDLES = ("chair", "table", "armchair")
REGION_SOURCES = ("bbox", "hand_labelled")
PROBE_TUPLES = 120  # the official probe's images: the first 120 shuffled tuples, 75% of them train
PROBE_TRAIN_FRACTION = 0.75


def photo_path(folder: str | Path, obj: str, direction: str, middle: str) -> Path:
    """Path of the controlled_images photo of `obj` `direction` ("left"/"right") of `middle`."""
    return Path(folder) / f"{obj}_{direction}_of_{middle}.jpeg"


def side_objects(folder: str | Path, middle: str) -> list[str]:
    """Sorted objects that have both a left_of and a right_of photo with `middle`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"What'sUp folder not found: {folder}")
    found = {direction: {p.name[: -len(f"_{direction}_of_{middle}.jpeg")]
                         for p in folder.glob(f"*_{direction}_of_{middle}.jpeg")}
             for direction in HORIZONTAL}
    return sorted(found["left"] & found["right"])


def single_token_objects(names: Sequence[str], tokenizer: Tokenizer) -> list[str]:
    """The names that are one token both lower-case and Capitalized (so top-1 can score them)."""
    return [n for n in names if is_single_token(tokenizer, n)]


def _load_square(path: Path, size: int) -> Image.Image:
    return open_rgb(path, "What'sUp photo").resize((size, size), Image.Resampling.BILINEAR)


def stitch(folder: str | Path, left: str, middle: str, right: str, size: int) -> Image.Image:
    """[size, size] RGB scene: `left` to the left of `middle`, `right` to its right."""
    left_photo = _load_square(photo_path(folder, left, "left", middle), size)
    right_photo = _load_square(photo_path(folder, right, "right", middle), size)
    half = size // 2
    scene = Image.new("RGB", (size, size))
    scene.paste(left_photo.crop((0, 0, half, size)), (0, 0))
    scene.paste(right_photo.crop((half, 0, size, size)), (half, 0))
    return scene


def whatsup_item(folder: str | Path, geometry: Geometry, entities: Sequence[str], direction: str, *,
                 size: int | None = None, boxes: Sequence[Box] | None = None, regions: str = "bbox") -> Item:
    """The scene (left, middle, right) = `entities`, asked about `direction` ("left"/"right") of the middle.

    Args:
      folder: the controlled_images folder.
      geometry: the model's geometry; its token grid for the stitched size maps regions to tokens.
      size: stitched image side in pixels (default geometry.whatsup_px, the model's native size).
      boxes: (left, middle, right) object boxes in pixels of the stitched image (tokens whose centre
        they hold); default: the official regions of `regions`.
      regions: "bbox" (the official probing boxes) or "hand_labelled" (the official criss-cross
        tables, Qwen2-VL and Gemma 3 grids only).
    """
    if direction not in HORIZONTAL:
        raise ValueError(f"What'sUp is horizontal only; got direction {direction!r}")
    left, middle, right = entities
    size = geometry.whatsup_px if size is None else size
    grid = geometry.token_grid((size, size))
    if boxes is not None:
        token_regions = box_regions(boxes, (size, size), grid)
    elif regions == "bbox":
        token_regions = bbox_regions(middle, grid[0])
    elif regions == "hand_labelled":
        token_regions = hand_labelled_regions(geometry, middle)
    else:
        raise ValueError(f"unknown What'sUp regions {regions!r}; expected one of {REGION_SOURCES}")
    if token_regions.grid != grid:
        raise ValueError(f"{geometry.name}: a {size}-px scene is a {grid} token grid, the regions are {token_regions.grid}")
    return Item(
        task="whatsup",
        prompt=cloze_prompt("whatsup", direction, middle),
        answer=left if direction == "left" else right,
        direction=direction,
        entities=(left, middle, right),
        attributes=(left, middle, right),
        regions=token_regions,
        render=functools.partial(stitch, Path(folder), left, middle, right, size),
    )


@dataclass(frozen=True, eq=False)
class WhatsupTask:
    """What'sUp on one geometry, with the interface of a synthetic task (`item`, `items`, `name`).

    Attributes:
      folder: the controlled_images folder.
      geometry: the model's geometry.
      sides: middle -> its side objects (those with both photos; single-token ones if a tokenizer
        was given), sorted.
      size: stitched side in pixels.
      regions: "bbox" or "hand_labelled" (see `whatsup_item`).
      pair_sides: the fewest side objects a middle needs to enter the pair pool (the official
        criss-cross pool 3, the last-token pool 5).
    """

    folder: Path
    geometry: Geometry
    sides: dict[str, tuple[str, ...]]
    size: int
    regions: str = "bbox"
    pair_sides: int = 3
    name: str = "whatsup"

    def item(self, names: Sequence[str], direction: str) -> Item:
        return whatsup_item(self.folder, self.geometry, names, direction, size=self.size, regions=self.regions)

    def items(self, directions: Sequence[str] = HORIZONTAL) -> list[Item]:
        """Middle-major, then (target, distractor), then direction."""
        out = []
        for middle, sides in self.sides.items():
            for target, distractor in itertools.permutations(sides, 2):
                for direction in directions:
                    entities = (target, middle, distractor) if direction == "left" else (distractor, middle, target)
                    out.append(self.item(entities, direction))
        return out

    def pair_pool(self, tokenizer: Tokenizer) -> dict[str, tuple[str, ...]]:
        """The official pair pool (`candidate_pool`): middles that are one token and have at least
        `pair_sides` side objects, in MIDDLES order."""
        return {m: s for m, s in self.sides.items() if is_single_token(tokenizer, m) and len(s) >= self.pair_sides}


def whatsup_task(folder: str | Path, geometry: Geometry, *, tokenizer: Tokenizer | None = None,
                 middles: Sequence[str] = MIDDLES, size: int | None = None, regions: str = "bbox",
                 pair_sides: int = 3) -> WhatsupTask:
    """The What'sUp task of a folder (see WhatsupTask); with a tokenizer, only single-token side objects."""
    sides = {}
    for middle in middles:
        names = side_objects(folder, middle)
        sides[middle] = tuple(single_token_objects(names, tokenizer) if tokenizer is not None else names)
    return WhatsupTask(Path(folder), geometry, sides, geometry.whatsup_px if size is None else size, regions,
                       pair_sides)


def whatsup_items(folder: str | Path, geometry: Geometry, *, tokenizer: Tokenizer | None = None,
                  middles: Sequence[str] = MIDDLES, size: int | None = None) -> list[Item]:
    """All three-object What'sUp items of a folder, middle-major, then (target, distractor), then
    direction (left, right); with a tokenizer, only single-token side objects."""
    return whatsup_task(folder, geometry, tokenizer=tokenizer, middles=middles, size=size).items()


def probe_items(folder: str | Path, geometry: Geometry, seed: int = 0,
                max_tuples: int = PROBE_TUPLES) -> tuple[list[Item], int]:
    """The official What'sUp probe images (`probing/src/whatsup.py`): every (left, middle, right)
    tuple of side objects with both photos (no token filter), shuffled with random.Random(seed), the
    first `max_tuples`, stitched at the synthetic canvas size with the probing boxes.

    Returns:
      (items, n_train): the first n_train = int(0.75 n) items are the training images.
    """
    task = whatsup_task(folder, geometry, size=geometry.canvas_px)
    tuples = [(a, m, b) for m, sides in task.sides.items() for a, b in itertools.permutations(sides, 2)]
    random.Random(seed).shuffle(tuples)
    tuples = tuples[:max_tuples]
    return [task.item(t, "left") for t in tuples], int(PROBE_TRAIN_FRACTION * len(tuples))
