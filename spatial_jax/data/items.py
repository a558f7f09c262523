"""The item every three-object dataset yields (Squares, Shapes, Objects, What'sUp)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from PIL import Image

from spatial_jax.data.prompts import is_horizontal, target_slot
from spatial_jax.data.regions import Regions


@dataclass(frozen=True, eq=False)
class Item:
    """One image + cloze question.

    Attributes:
      task: "squares", "shapes", "objects" or "whatsup".
      prompt: the user text (no chat template), e.g. "The color of the square to the left of the red square is ".
      answer: lower-case answer word, == attributes[target_slot].
      direction: "left", "right", "above" or "below".
      entities: per slot (left->right or top->bottom), the entity's name, e.g. ("red", "green", "blue"),
        ("red square", "green circle", ...), ("apple", "key", "hat").
      attributes: per slot, the word the cloze would answer if that slot were the target
        (the colour for Squares/Shapes, the name for Objects/What'sUp).
      regions: token regions of the image.
      render: draws the image; called on every `image` access so that items stay small.
    """

    task: str
    prompt: str
    answer: str
    direction: str
    entities: tuple[str, str, str]
    attributes: tuple[str, str, str]
    regions: Regions
    render: Callable[[], Image.Image] = field(repr=False)

    @property
    def image(self) -> Image.Image:
        return self.render()

    @property
    def horizontal(self) -> bool:
        return is_horizontal(self.direction)

    @property
    def target_slot(self) -> int:
        return target_slot(self.direction)
