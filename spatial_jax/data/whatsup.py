"""What'sUp, adapted to three objects (paper section 2): two controlled_images photos stitched.

The folder holds What'sUp `controlled_images` files `<obj>_left_of_<middle>.jpeg` and
`<obj>_right_of_<middle>.jpeg`. A scene (left, middle, right) is the left half of
`<left>_left_of_<middle>.jpeg` next to the right half of `<right>_right_of_<middle>.jpeg`, both first
resized (bilinear) to size x size. Items: for each middle, every ordered (target, distractor) pair of
its side objects x {left, right}; horizontal only.
"""
from __future__ import annotations

import functools
import itertools
from pathlib import Path
from typing import Mapping, Sequence

from PIL import Image

from spatial_jax.data.files import open_rgb
from spatial_jax.data.geometry import Box, Geometry
from spatial_jax.data.items import Item
from spatial_jax.data.prompts import HORIZONTAL, cloze_prompt
from spatial_jax.data.regions import box_regions
from spatial_jax.data.scoring import Tokenizer, is_single_token

MIDDLES = ("chair", "table", "armchair")

# Left, middle and right object boxes per middle, as fractions (x0, y0, x1, y1) of the stitched
# image side: the official code's bounding boxes for What'sUp probing (paper App. C.7), drawn on
# a 64x64 patch grid.
DEFAULT_BOXES: dict[str, tuple[Box, Box, Box]] = {
    "chair": ((12 / 64, 48 / 64, 24 / 64, 60 / 64), (24 / 64, 16 / 64, 40 / 64, 60 / 64),
              (40 / 64, 48 / 64, 52 / 64, 60 / 64)),
    "table": ((8 / 64, 40 / 64, 16 / 64, 60 / 64), (16 / 64, 20 / 64, 48 / 64, 60 / 64),
              (48 / 64, 40 / 64, 56 / 64, 60 / 64)),
    "armchair": ((8 / 64, 52 / 64, 20 / 64, 60 / 64), (20 / 64, 24 / 64, 44 / 64, 60 / 64),
                 (44 / 64, 52 / 64, 56 / 64, 60 / 64)),
}


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
                 size: int | None = None, boxes: Sequence[Box] | None = None) -> Item:
    """The scene (left, middle, right) = `entities`, asked about `direction` ("left"/"right") of the middle.

    Args:
      folder: the controlled_images folder.
      geometry: the model's geometry; its token grid for the stitched size maps boxes to tokens.
      size: stitched image side in pixels (default geometry.whatsup_px, the model's native size).
      boxes: (left, middle, right) object boxes in pixels of the stitched image; default
        DEFAULT_BOXES[middle] scaled to `size`.
    """
    if direction not in HORIZONTAL:
        raise ValueError(f"What'sUp is horizontal only; got direction {direction!r}")
    left, middle, right = entities
    size = geometry.whatsup_px if size is None else size
    if boxes is None:
        boxes = [tuple(v * size for v in box) for box in DEFAULT_BOXES[middle]]
    return Item(
        task="whatsup",
        prompt=cloze_prompt("whatsup", direction, middle),
        answer=left if direction == "left" else right,
        direction=direction,
        entities=(left, middle, right),
        attributes=(left, middle, right),
        regions=box_regions(boxes, (size, size), geometry.token_grid((size, size))),
        render=functools.partial(stitch, Path(folder), left, middle, right, size),
    )


def whatsup_items(folder: str | Path, geometry: Geometry, *, tokenizer: Tokenizer | None = None,
                  middles: Sequence[str] = MIDDLES, size: int | None = None,
                  boxes: Mapping[str, Sequence[Box]] | None = None) -> list[Item]:
    """All three-object What'sUp items of a folder (see `whatsup_item` for the arguments).

    Args:
      tokenizer: if given, keep only side objects that are a single token (`single_token_objects`).
      middles: reference objects to use; side objects are discovered per middle.
      boxes: middle -> (left, middle, right) boxes in pixels of the stitched image.
    Returns:
      items, middle-major, then (target, distractor), then direction (left, right).
    """
    items = []
    for middle in middles:
        sides = side_objects(folder, middle)
        if tokenizer is not None:
            sides = single_token_objects(sides, tokenizer)
        for target, distractor in itertools.permutations(sides, 2):
            for direction in HORIZONTAL:
                entities = (target, middle, distractor) if direction == "left" else (distractor, middle, target)
                items.append(whatsup_item(folder, geometry, entities, direction, size=size,
                                          boxes=None if boxes is None else boxes[middle]))
    return items
