"""The word-level split of plain text that the tiny test tokenizers and the organism's use."""
from __future__ import annotations

from tokenizers import Regex, pre_tokenizers

# Each "\n" is a token, a run of word characters is a word, any other non-space character is a
# token by itself; spaces and tabs only separate.
PRE_TOKENIZER_PATTERN = r"\n|\w+|[^\w\s]"
PRE_TOKENIZER = pre_tokenizers.Split(Regex(PRE_TOKENIZER_PATTERN), behavior="removed", invert=True)


def split_words(text: str) -> list[str]:
    """The word-level tokens of plain text (no special tokens), e.g. to collect a vocabulary from prompts."""
    return [piece for piece, _ in PRE_TOKENIZER.pre_tokenize_str(text)]
