"""Squares, Shapes and Objects: three equal entities on a white canvas, one cloze question each.

Every ordered triple of distinct entities x 4 directions: Squares 6 colours -> 480 items,
Shapes 6 (shape, colour) pairs -> 480, Objects 8 objects -> 1344 (paper section 2); on Pixtral's
geometry the official palette swaps Brown for Orange (Squares and the Shapes cross) and the
official object set drops the bomb (840 items). The default
items involve no randomness; `jitter` (random whole-token layout shifts, seeded per item) and
extra colours are opt-in for training the model organism and leave the default items unchanged.

    task = make_task("squares", get_geometry("qwen2_vl"))
    train, held_out = split_triples(task.triples(), n_held_out=20, seed=0)
    items = task.items(triples=train, jitter=1, seed=epoch)
"""
from __future__ import annotations

import functools
import itertools
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

from PIL import Image

from spatial_jax.data import sprites
from spatial_jax.data.geometry import Geometry, get_geometry
from spatial_jax.data.items import Item
from spatial_jax.data.prompts import DIRECTIONS, cloze_prompt, is_horizontal, target_slot
from spatial_jax.data.regions import layout_regions

TASKS = ("squares", "shapes", "objects")

# The official default palette (shared/palette.py); a model whose official palette differs says so in
# its Geometry (Geometry.colours).
SQUARE_COLOURS: dict[str, sprites.RGB] = {
    "red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255),
    "black": (0, 0, 0), "brown": (150, 75, 0), "gray": (128, 128, 128),
}
# The colour pool of the official last-token pairs (last_token_exp COLOR_RGB without White), for
# every model: the default palette plus Orange.
LAST_TOKEN_COLOURS: dict[str, sprites.RGB] = {**SQUARE_COLOURS, "orange": (255, 165, 0)}
# Shape i is painted in colour i of the palette (the official zip of shapes and palette).
SHAPE_NAMES: tuple[str, ...] = ("square", "circle", "triangle", "star", "cross", "heart")
SHAPES: tuple[tuple[str, str], ...] = tuple(zip(SHAPE_NAMES, SQUARE_COLOURS))
OBJECTS: tuple[str, ...] = ("orange", "apple", "pot", "bell", "hat", "rose", "key", "bomb")

Triple = tuple[str, str, str]


@dataclass(frozen=True)
class Entity:
    """One thing that can stand in a slot.

    Attributes:
      name: how prompts refer to it ("red", "red square", "apple"); unique within a task.
      attribute: the word a cloze about it answers ("red", "red", "apple").
      sprite: side in pixels -> RGBA sprite filling one slot.
    """

    name: str
    attribute: str
    sprite: Callable[[int], Image.Image]


@dataclass(frozen=True, eq=False)
class SyntheticTask:
    """One synthetic task on one geometry; `entities` is keyed by entity name, in catalogue order."""

    name: str
    geometry: Geometry
    entities: Mapping[str, Entity]

    def triples(self) -> list[Triple]:
        """Every ordered triple of distinct entity names, slot 0 first."""
        return list(itertools.permutations(self.entities, 3))

    def item(self, names: Sequence[str], direction: str, shift: tuple[int, int] = (0, 0),
             spacing: int | None = None) -> Item:
        """The item with entities `names` in slots 0, 1, 2, asked about `direction` of slot 1.

        `shift` = (along, across) moves the whole layout by whole tokens, `spacing` (None: the
        geometry's) sets the tokens between objects (see Geometry.slot_origins).
        """
        if len(names) != 3:
            raise ValueError(f"expected 3 entity names, got {names}")
        entities = tuple(self._entity(n) for n in names)
        horizontal = is_horizontal(direction)
        return Item(
            task=self.name,
            prompt=cloze_prompt(self.name, direction, entities[1].name),
            answer=entities[target_slot(direction)].attribute,
            direction=direction,
            entities=tuple(e.name for e in entities),
            attributes=tuple(e.attribute for e in entities),
            regions=layout_regions(self.geometry, horizontal, shift, spacing),
            render=functools.partial(render_layout, self.geometry, tuple(e.sprite for e in entities),
                                     horizontal, shift, spacing),
        )

    def items(self, triples: Sequence[Sequence[str]] | None = None, directions: Sequence[str] = DIRECTIONS,
              jitter: int = 0, seed: int = 0) -> list[Item]:
        """Items for `triples` (default: all) x `directions`, triple-major.

        jitter: largest layout shift in tokens along each axis (clipped to the canvas); each item
          draws its own shift from (seed, task, triple, direction), so a subset of triples gets the
          same shifts as in the full set. 0 (default) gives the paper's fixed layout.
        """
        chosen = self.triples() if triples is None else [tuple(t) for t in triples]
        return [self.item(t, d, self._shift(t, d, jitter, seed)) for t in chosen for d in directions]

    def _entity(self, name: str) -> Entity:
        try:
            return self.entities[name]
        except KeyError:
            raise KeyError(f"{self.name}: unknown entity {name!r}; known: {list(self.entities)}") from None

    def _shift(self, names: Sequence[str], direction: str, jitter: int, seed: int) -> tuple[int, int]:
        if jitter == 0:
            return (0, 0)
        rng = random.Random(f"{seed}|{self.name}|{'|'.join(names)}|{direction}")
        return tuple(rng.randint(max(lo, -jitter), min(hi, jitter)) for lo, hi in self.geometry.max_shift())


def render_layout(geometry: Geometry, slot_sprites: Sequence[Callable[[int], Image.Image]], horizontal: bool,
                  shift: tuple[int, int] = (0, 0), spacing: int | None = None) -> Image.Image:
    """White [canvas_px, canvas_px] RGB canvas with one sprite pasted at each slot origin."""
    canvas = Image.new("RGB", (geometry.canvas_px, geometry.canvas_px), (255, 255, 255))
    side = geometry.object_tokens * geometry.token_px
    for (row, col), sprite in zip(geometry.slot_origins(horizontal, shift, spacing), slot_sprites):
        image = sprite(side)
        canvas.paste(image, (col * geometry.token_px, row * geometry.token_px), image)
    return canvas


def palette_for(geometry: Geometry) -> dict[str, sprites.RGB]:
    """The official Squares/Shapes palette of a model's geometry (`Geometry.colours`, else the default)."""
    return dict(SQUARE_COLOURS if geometry.colours is None else geometry.colours)


def objects_for(geometry: Geometry) -> tuple[str, ...]:
    """The official object set of a model's geometry (`Geometry.objects`, else all of OBJECTS)."""
    return OBJECTS if geometry.objects is None else geometry.objects


# How the official code builds a task in the experiments that differ from behaviour's default:
# probing/ uses the default palette and all 8 objects for every model; last_token_exp's Squares
# pool is LAST_TOKEN_COLOURS for every model.
SETUPS = ("behaviour", "probing", "last_token")


def setup_task(name: str, geometry: Geometry | str, setup: str = "behaviour") -> "SyntheticTask":
    """`make_task` with the entities the official code uses in `setup` (one of SETUPS)."""
    if setup == "probing":
        return make_task(name, geometry, colours=SQUARE_COLOURS, objects=OBJECTS)
    if setup == "last_token" and name == "squares":
        return make_task(name, geometry, colours=LAST_TOKEN_COLOURS)
    if setup not in SETUPS:
        raise ValueError(f"unknown setup {setup!r}; expected one of {SETUPS}")
    return make_task(name, geometry)


def make_task(name: str, geometry: Geometry | str, *, colours: Mapping[str, sprites.RGB] | None = None,
              shapes: Sequence[tuple[str, str]] | None = None, objects: Sequence[str] | None = None,
              thumbnail_dir: str | Path | None = None) -> SyntheticTask:
    """A synthetic task.

    Args:
      name: "squares", "shapes" or "objects".
      geometry: a Geometry or its registry name.
      colours: colour name -> RGB; the Squares palette, and the colours Shapes are painted in;
        default `palette_for(geometry)`. Pass a superset to add colours (e.g. for training).
      shapes: (shape, colour) pairs of the Shapes task, shapes from sprites.SHAPE_PAINTERS;
        default: shape i of SHAPE_NAMES in colour i of `colours`.
      objects: object names of the Objects task; default `objects_for(geometry)`.
      thumbnail_dir: a folder of `<object>.png` thumbnails to use instead of the drawings.
    """
    geometry = get_geometry(geometry) if isinstance(geometry, str) else geometry
    colours = palette_for(geometry) if colours is None else colours
    shapes = tuple(zip(SHAPE_NAMES, colours)) if shapes is None else shapes
    objects = objects_for(geometry) if objects is None else objects
    if name == "squares":
        entities = [Entity(c, c, functools.partial(sprites.square_sprite, rgb)) for c, rgb in colours.items()]
    elif name == "shapes":
        entities = [Entity(f"{colour} {shape}", colour, functools.partial(sprites.shape_sprite, shape, colours[colour]))
                    for shape, colour in shapes]
    elif name == "objects" and thumbnail_dir is not None:
        folder = Path(thumbnail_dir)
        missing = [str(folder / f"{o}.png") for o in objects if not (folder / f"{o}.png").is_file()]
        if missing:
            raise FileNotFoundError(f"object thumbnails not found: {', '.join(missing)}")
        entities = [Entity(o, o, functools.partial(sprites.thumbnail_sprite, folder, o)) for o in objects]
    elif name == "objects":
        entities = [Entity(o, o, functools.partial(sprites.object_sprite, o)) for o in objects]
    else:
        raise ValueError(f"unknown synthetic task {name!r}; expected one of {TASKS}")
    return SyntheticTask(name=name, geometry=geometry, entities={e.name: e for e in entities})


def generate(name: str, geometry: Geometry | str, *, triples: Sequence[Sequence[str]] | None = None,
             directions: Sequence[str] = DIRECTIONS, jitter: int = 0, seed: int = 0, **task_options) -> list[Item]:
    """Items of a synthetic task: `make_task(name, geometry, **task_options).items(...)`."""
    return make_task(name, geometry, **task_options).items(triples, directions, jitter, seed)


def split_triples(triples: Sequence[Triple], n_held_out: int, seed: int = 0) -> tuple[list[Triple], list[Triple]]:
    """(train, held_out): `n_held_out` triples drawn with random.Random(seed), both in input order."""
    held = set(random.Random(seed).sample(list(triples), n_held_out))
    return [t for t in triples if t not in held], [t for t in triples if t in held]
