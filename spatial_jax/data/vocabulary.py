"""The words of every synthetic prompt and answer: the vocabulary a word-level tokenizer needs."""
from __future__ import annotations

from spatial_jax.data.prompts import CLOZE_TEMPLATES, PREPOSITIONS, SYSTEM_TEXT
from spatial_jax.data.synthetic import OBJECTS, SHAPES, SQUARE_COLOURS
from spatial_jax.processing.words import split_words


def synthetic_words(extra: tuple[str, ...] = ()) -> list[str]:
    """Distinct words (and punctuation) of the Squares/Shapes/Objects prompts, their answers in
    lower and Capitalized spelling, the system text and `extra` names, in a fixed order."""
    names = [*SQUARE_COLOURS, *(s for s, _ in SHAPES), *OBJECTS, *extra]
    texts = [SYSTEM_TEXT, *(t.format(prep="", ref="") for t in CLOZE_TEMPLATES.values()), *PREPOSITIONS.values(),
             *names, *(n.capitalize() for n in names)]
    return list(dict.fromkeys(w for text in texts for w in split_words(text)))
