"""Answer scoring as the official code does it (behavioral_analysis/src/eval.py), from next-token logits.

- top-1: the arg-max next token, decoded and normalised (`normalize`: strip, lower-case, drop every
  non-alphanumeric character, the official `norm_token`), equals the normalised answer. Every
  decision that compares an answer with a word (behaviour, golden-pair filters, flips, fixes) goes
  through `normalize` of the decoded arg-max, never through one token id: a model that answers
  "Red" or " Red." answers "red".
- answer probability: the next-token probability summed over the spellings
  {lower, Capitalized, " "+lower, " "+Capitalized} of the answer that are a single token, each
  distinct id once (the official `logit_prob` gathers the four ids without deduplicating).

Tokenizers: anything with `encode(text, add_special_tokens=False)` (a `tokenizers.Tokenizer`, whose
result has `.ids`, or a transformers tokenizer, which returns a list) or a callable text -> ids; for
decoding, anything with `decode(ids)` or a callable id -> text. The array functions take numpy or
jax arrays and return the same kind (they trace under jit).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

Tokenizer = Any  # see the module docstring


def encode_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of `text` without special tokens."""
    out = tokenizer.encode(text, add_special_tokens=False) if hasattr(tokenizer, "encode") else tokenizer(text)
    return list(getattr(out, "ids", out))


def decode_id(tokenizer: Tokenizer | Callable[[int], str], token_id: int) -> str:
    return tokenizer.decode([token_id]) if hasattr(tokenizer, "decode") else tokenizer(token_id)


def is_single_token(tokenizer: Tokenizer, word: str) -> bool:
    """True if `word` is one token both lower-case and Capitalized (the What'sUp answer filter)."""
    return all(len(encode_ids(tokenizer, w)) == 1 for w in (word.lower(), word.capitalize()))


_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def normalize(text: str) -> str:
    """The official `norm_token`: strip, lower-case, drop every non-alphanumeric character."""
    return _NON_ALNUM.sub("", text.strip().lower())


def spellings(word: str) -> tuple[str, ...]:
    lower, capital = word.lower(), word.capitalize()
    return (lower, capital, " " + lower, " " + capital)


def spelling_ids(tokenizer: Tokenizer, word: str) -> list[int]:
    """Distinct ids of the single-token spellings of `word`, in `spellings` order.

    Distinct, because tokenizers that drop leading spaces map "red" and " red" to one id,
    which must be counted once.
    """
    ids: list[int] = []
    for spelling in spellings(word):
        encoded = encode_ids(tokenizer, spelling)
        if len(encoded) == 1 and encoded[0] not in ids:
            ids.append(encoded[0])
    return ids


def spelling_table(tokenizer: Tokenizer,
                   words: Sequence[str] | Sequence[Sequence[str]]) -> tuple[np.ndarray, np.ndarray]:
    """Padded spelling ids of candidate answers, for `answer_probs`.

    Args:
      words: [K] words shared by every row, or [B][K] words per row.
    Returns:
      ids: [K, M] or [B, K, M] int32 (padding 0), mask: same shape, bool; M = 4 spellings at most.
    """
    nested = len(words) > 0 and not isinstance(words[0], str)
    rows = [list(r) for r in words] if nested else [list(words)]
    width = len(rows[0])
    if any(len(r) != width for r in rows):
        raise ValueError("every row needs the same number of candidate words")
    ids = np.zeros((len(rows), width, 4), dtype=np.int32)
    mask = np.zeros((len(rows), width, 4), dtype=bool)
    for b, row in enumerate(rows):
        for k, word in enumerate(row):
            word_ids = spelling_ids(tokenizer, word)
            ids[b, k, :len(word_ids)] = word_ids
            mask[b, k, :len(word_ids)] = True
    return (ids, mask) if nested else (ids[0], mask[0])


def _array_module(x):
    if type(x).__module__.startswith(("jax", "jaxlib")):
        import jax.numpy as jnp
        return jnp
    return np


def answer_probs(logits, ids, mask):
    """Next-token probability of each candidate, summed over its single-token spellings.

    Args:
      logits: [B, V] next-token logits (numpy or jax).
      ids, mask: [K, M] or [B, K, M] from `spelling_table`.
    Returns:
      [B, K] float probabilities (softmax in float32 or wider).
    """
    xp = _array_module(logits)
    logits = logits.astype(xp.promote_types(logits.dtype, xp.float32))
    weights = xp.exp(logits - logits.max(axis=-1, keepdims=True))
    probs = weights / weights.sum(axis=-1, keepdims=True)
    ids, mask = xp.asarray(ids), xp.asarray(mask)
    if ids.ndim == 2:
        gathered = probs[:, ids]  # [B, K, M]
    else:
        batch, k, m = ids.shape
        gathered = xp.take_along_axis(probs, ids.reshape(batch, k * m), axis=1).reshape(batch, k, m)
    return (gathered * mask).sum(axis=-1)


def decode_normalized(ids, tokenizer: Tokenizer | Callable[[int], str]) -> np.ndarray:
    """Token ids of any shape -> the same shape of normalised decoded words (object array);
    each distinct id is decoded once."""
    ids = np.asarray(ids)
    distinct, inverse = np.unique(ids, return_inverse=True)
    words = np.array([normalize(decode_id(tokenizer, int(i))) for i in distinct], dtype=object)
    return words[inverse.reshape(ids.shape)]


def answers_match(ids, words: Sequence[str], tokenizer: Tokenizer | Callable[[int], str]) -> np.ndarray:
    """ids [..., B] arg-max token ids, words [B] -> [..., B] bool: the decoded, normalised token
    is the normalised word (how the official code counts a right answer, a flip or a fix)."""
    target = np.array([normalize(w) for w in words], dtype=object)
    return decode_normalized(ids, tokenizer) == target


def top1_tokens(logits, tokenizer: Tokenizer | Callable[[int], str]) -> list[str]:
    """[B] decoded, normalised arg-max tokens of next-token logits [B, V]."""
    return list(decode_normalized(np.asarray(logits).argmax(axis=-1), tokenizer))


@dataclass(frozen=True)
class Candidates:
    """The spelling ids of K candidate words per row, as a sweep reads them.

    ids, mask: [B, K, M] from `spelling_table`; `readout` is the [B, K * M] token list a
    `Readout` carries, and `probs` folds a sweep's probabilities of those tokens back to [.., B, K].
    """

    words: tuple[tuple[str, ...], ...]
    ids: np.ndarray
    mask: np.ndarray

    @classmethod
    def of(cls, tokenizer: Tokenizer, words: Sequence[Sequence[str]]) -> "Candidates":
        ids, mask = spelling_table(tokenizer, [list(w) for w in words])
        return cls(tuple(tuple(w) for w in words), ids, mask)

    @property
    def readout(self) -> np.ndarray:
        return self.ids.reshape(self.ids.shape[0], -1)

    def probs(self, token_probs) -> np.ndarray:
        """token_probs [..., B, K * M] -> [..., B, K] probabilities summed over each word's spellings."""
        token_probs = np.asarray(token_probs)
        return (token_probs.reshape(token_probs.shape[:-1] + self.ids.shape[1:]) * self.mask).sum(-1)

    def word_logits(self, token_logits) -> np.ndarray:
        """token_logits [..., B, K * M] -> [..., B, K]: the log of each word's probability summed
        over its spellings, up to the normaliser all tokens share (a difference is a log-odds)."""
        return word_logits(np.asarray(token_logits, np.float64), self.mask)

    def log_odds_metric(self, towards: int, against: int):
        """The metric read logits [B, K * M] -> [B] log p(word `towards`) - log p(word `against`)
        (`log_odds`), as `attribution_sweep(metric=)` takes it: a Partial whose mask is an array
        argument, so that a new batch of candidates of the same shape compiles nothing new."""
        from jax.tree_util import Partial
        return Partial(log_odds, mask=self.mask, towards=towards, against=against)

    def column(self, k: int) -> list[str]:
        """[B] the k-th candidate word of every row."""
        return [w[k] for w in self.words]


def word_logits(token_logits, mask):
    """token_logits [..., B, K * M], mask [B, K, M] (the spellings a word has) -> [..., B, K]: the
    log of each word's probability summed over its spellings, up to the normaliser all tokens share."""
    xp = _array_module(token_logits)
    t = xp.where(mask, token_logits.reshape(token_logits.shape[:-1] + mask.shape[1:]), -xp.inf)
    top = t.max(-1, keepdims=True)
    return (top + xp.log(xp.exp(t - top).sum(-1, keepdims=True)))[..., 0]


def log_odds(token_logits, mask, towards, against):
    """token_logits [..., B, K * M] -> [..., B]: log p(word `towards`) - log p(word `against`),
    each word's probability summed over its spellings (mask [B, K, M])."""
    words = word_logits(token_logits, mask)
    return words[..., towards] - words[..., against]


def top1_correct(logits, answers: Sequence[str], tokenizer: Tokenizer | Callable[[int], str]) -> np.ndarray:
    """[B] bool: the arg-max next token, normalised, equals the normalised answer."""
    if len(answers) != np.shape(logits)[0]:
        raise ValueError(f"{len(answers)} answers for {np.shape(logits)[0]} rows of logits")
    return answers_match(np.asarray(logits).argmax(axis=-1), answers, tokenizer)
