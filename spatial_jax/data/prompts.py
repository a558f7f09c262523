"""Prompt text of the paper's tasks (paper.md section 2), as the official code writes it.

The cloze templates end in a space ("... is "), as in the official code: the model then
answers with a word that carries no leading space in most tokenizers, and `scoring` counts
both spellings anyway. Names in prompts are lower-case.
"""
from __future__ import annotations

DIRECTIONS = ("left", "right", "above", "below")
HORIZONTAL = ("left", "right")
PREPOSITIONS = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}

# The chat system message of the synthetic and What'sUp tasks.
SYSTEM_TEXT = "You are a helpful assistant. You respond in one token."

# {prep}: a PREPOSITIONS value; {ref}: the middle (reference) entity's name.
CLOZE_TEMPLATES = {
    "squares": "The color of the square {prep} the {ref} square is ",
    "shapes": "The color of the shape {prep} the {ref} is ",
    "objects": "The object {prep} the {ref} is a(n) ",
    "whatsup": "The object on the floor {prep} the {ref} is a(n) ",
}


def is_horizontal(direction: str) -> bool:
    if direction not in PREPOSITIONS:
        raise ValueError(f"unknown direction {direction!r}; expected one of {DIRECTIONS}")
    return direction in HORIZONTAL


def target_slot(direction: str) -> int:
    """Slot holding the answer: 0 (left/top) for left/above, 2 (right/bottom) for right/below."""
    return 0 if direction in ("left", "above") else 2


def cloze_prompt(task: str, direction: str, reference: str) -> str:
    """The cloze question of `task` about the entity `direction` of `reference`."""
    is_horizontal(direction)
    return CLOZE_TEMPLATES[task].format(prep=PREPOSITIONS[direction], ref=reference.lower())


# COCO-spatial two-option questions (paper.md section 2, COCO), in the two styles the official code
# uses (each family's `Family.prompt_style` names its own). {a} and {b} are the axis' two options in
# the asked order.
COCO_TEMPLATES = {
    ("direct", "horizontal"): "Is the {subj} to the {a} or to the {b} of the {obj}? Answer with one word.",
    ("direct", "vertical"): "Is the {subj} {a} or {b} the {obj}? Answer with one word.",
    ("anchor", "horizontal"): "Using the {obj} as the reference point, which side is the {subj} on? "
                              "Answer with one word: {a} or {b}.",
    ("anchor", "vertical"): "Using the {obj} as the reference point, where is the {subj} located? "
                            "Answer with one word: {a} or {b}.",
}
COCO_PROMPT_STYLES = ("direct", "anchor")
# model name -> its style: each family's `Family.prompt_style` (entered as the family registers), and
# the organism's.
MODEL_PROMPT_STYLES: dict[str, str] = {"organism": "anchor"}


def register_prompt_style(model: str, style: str) -> None:
    """Makes `model` (a family name) usable as a `coco_prompt` style, meaning `style`."""
    if style not in COCO_PROMPT_STYLES:
        raise ValueError(f"unknown prompt style {style!r}; expected one of {COCO_PROMPT_STYLES}")
    MODEL_PROMPT_STYLES[model] = style
AXIS_OPTIONS = {"horizontal": ("left", "right"), "vertical": ("above", "below")}
# "lr" asks the options in AXIS_OPTIONS order ("left or right", "above or below"), "rl" reversed;
# the paper's strict protocol asks both.
COCO_ORDERS = ("lr", "rl")


def coco_prompt(subject: str, obj: str, axis: str, style: str, order: str) -> str:
    """The question whether `subject` is on one side or the other of `obj`.

    Args:
      axis: "horizontal" or "vertical"; style: "direct" or "anchor", or a model name
        (MODEL_PROMPT_STYLES: a family's `prompt_style`); order: "lr" or "rl".
    """
    style = MODEL_PROMPT_STYLES.get(style, style)
    if style not in COCO_PROMPT_STYLES:
        raise ValueError(f"unknown prompt style {style!r}; expected one of {COCO_PROMPT_STYLES} or a model "
                         f"name in {sorted(MODEL_PROMPT_STYLES)}")
    if order not in COCO_ORDERS:
        raise ValueError(f"unknown option order {order!r}; expected one of {COCO_ORDERS}")
    a, b = AXIS_OPTIONS[axis] if order == "lr" else AXIS_OPTIONS[axis][::-1]
    return COCO_TEMPLATES[style, axis].format(subj=subject, obj=obj, a=a, b=b)
