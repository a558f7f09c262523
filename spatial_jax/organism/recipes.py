"""How each organism is made: its training recipe as data (issue 16).

An organism's mechanism is fixed by what its LM is allowed to see in training. Every training
image gets one *treatment* at the LM input (organism/data.py `treat`), named "<content>" or
"<content>/shuffled":

* content "own": the image's own visual tokens;
* "ablated": the Table-5 ablation (each object's tokens <- its isolated-at-centre image's, every
  other token <- the empty canvas's): the vision tower's layout signal is gone;
* "bgother": own object tokens, background tokens from another image of the batch (where that
  image has an object, the empty canvas's): the background says nothing about this layout;
* "objother": own background, object tokens from another image of the batch (its slot k's at
  this image's slot k): the object tokens say nothing about this image's entities;
* "/shuffled": the visual tokens then enter the LM in a random order (contents move, every LM
  slot keeps its raster M-RoPE position), so positions carry no layout.

An auxiliary loss (two linear heads on the post-merger visual tokens, not exported) makes the
vision tower write the layout into its tokens: "strip" trains every token to predict the strip it
lies in and the entity of that strip, "object" trains only the object tokens to predict their slot
and entity, "none" trains no head. `aux_on` lists the treatments whose images the heads train on.

`targets` are certificate conditions (organism/checkpoint.py) measured on the val split at each
evaluation, with the [lo, hi] accuracy range that, with clean val accuracy >= --stop_at, stops
training: a recipe stops at the first evaluations where every task meets every range.
"""
from __future__ import annotations

import dataclasses

MECHANISMS = ("lm_position", "vision_strip", "vision_object", "dual")
CONTENTS = ("own", "ablated", "bgother", "objother")
# Certificate conditions: the treatment each applies to every evaluated image.
CONDITIONS = {"clean": "own", "shuffled": "own/shuffled", "ablated": "ablated",
              "ablated_shuffled": "ablated/shuffled", "foreign_objects": "objother/shuffled",
              "foreign_background": "bgother/shuffled"}


def parse_treatment(name: str) -> tuple[str, bool]:
    """'bgother/shuffled' -> ('bgother', True)."""
    content, _, rest = name.partition("/")
    if content not in CONTENTS or rest not in ("", "shuffled"):
        raise ValueError(f"unknown treatment {name!r}: '<content>' or '<content>/shuffled', content in {CONTENTS}")
    return content, rest == "shuffled"


@dataclasses.dataclass(frozen=True)
class Recipe:
    mechanism: str
    treatments: tuple[tuple[str, float], ...] = (("own", 1.0),)  # (treatment, share of each batch's images)
    aux: str = "none"                                            # "none", "strip" or "object"
    aux_on: tuple[str, ...] = ()                                 # treatments whose images train the heads
    aux_weight: float = 1.0
    vision_rope_theta: float = 1e4
    targets: tuple[tuple[str, float, float], ...] = ()  # beside clean val accuracy >= --stop_at
    init_from: str = ""            # a checkpoint to start from (warm start), "" = random init

    def __post_init__(self):
        if self.mechanism not in MECHANISMS:
            raise ValueError(f"mechanism must be one of {MECHANISMS}, got {self.mechanism!r}")
        for t, _ in self.treatments:
            parse_treatment(t)
        if self.aux not in ("none", "strip", "object"):
            raise ValueError(f"aux must be none, strip or object, got {self.aux!r}")
        if abs(sum(p for _, p in self.treatments) - 1) > 1e-6:
            raise ValueError(f"treatment shares must sum to 1: {self.treatments}")
        for name, _, _ in self.targets:
            if name not in CONDITIONS:
                raise ValueError(f"unknown target condition {name!r}; known: {list(CONDITIONS)}")


# Vision RoPE theta 10: at 1e4 a 16-dim vision head has about one usable frequency on a 12-patch
# grid and the auxiliary heads never learn the strip (organism-feasibility.md, run r1).
RECIPES: dict[str, Recipe] = {
    # The LM reads the layout from where the visual tokens sit (issue 7's organism).
    "lm_position": Recipe("lm_position"),
    # Positions are useless (shuffled) and, in half the images, the object tokens belong to another
    # image: the layout and the entities must be read from the strips' background tokens.
    "vision_strip": Recipe(
        "vision_strip", treatments=(("own/shuffled", 0.5), ("objother/shuffled", 0.5)), aux="strip",
        aux_on=("own/shuffled", "objother/shuffled"), vision_rope_theta=10.0,
        targets=(("shuffled", 0.95, 1.0), ("foreign_objects", 0.9, 1.0))),
    # The background belongs to another image half the time: only object tokens carry the layout.
    "vision_object": Recipe(
        "vision_object", treatments=(("own/shuffled", 0.5), ("bgother/shuffled", 0.5)), aux="object",
        aux_on=("own/shuffled", "bgother/shuffled"), vision_rope_theta=10.0,
        targets=(("shuffled", 0.95, 1.0), ("foreign_background", 0.9, 1.0)), init_from="checkpoints/organism_vision_strip"),
    # Content when it carries the layout; when it is ablated (positions intact) the LM falls back on
    # positions. The fallback overshoots within a few hundred steps, hence the upper bound.
    "dual": Recipe(
        "dual", treatments=(("own/shuffled", 0.67), ("ablated", 0.33)), aux="strip", aux_on=("own/shuffled",),
        vision_rope_theta=10.0, init_from="checkpoints/organism_vision_strip",
        targets=(("shuffled", 0.9, 1.0), ("ablated", 0.55, 0.9))),
}
