"""Top-1 and spelling-summed answer scoring with toy tokenizers built with `tokenizers`."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from spatial_jax.data.scoring import (answer_probs, is_single_token, spelling_ids, spelling_table, top1_correct,
                                      top1_tokens)

WORDS = ["red", "Red", "blue", "Blue", "green"]  # "Green" is not a token


@pytest.fixture(scope="module")
def tokenizer():
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    pieces = ["[UNK]", *WORDS, *letters, *(l.upper() for l in letters), *("##" + l for l in letters)]
    tok = Tokenizer(models.WordPiece({p: i for i, p in enumerate(pieces)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


# A tokenizer that keeps leading spaces, like byte-level BPE: all four spellings are distinct tokens.
SPACED = {"red": 0, "Red": 1, " red": 2, " Red": 3, "blue": 4, " blue": 5}


def spaced(text):
    return [SPACED[text]] if text in SPACED else [9, 9]


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_single_token_spellings(tokenizer):
    ids = {w: tokenizer.token_to_id(w) for w in WORDS}
    assert spelling_ids(tokenizer, "red") == [ids["red"], ids["Red"]]  # " red" is the same token as "red"
    assert spelling_ids(tokenizer, "Green") == [ids["green"]]           # "Green" splits: not counted
    assert spelling_ids(spaced, "red") == [0, 1, 2, 3]
    assert spelling_ids(spaced, "blue") == [4, 5]
    assert is_single_token(tokenizer, "blue") and not is_single_token(tokenizer, "green")


def test_answer_probs_sum_the_spellings(tokenizer):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, tokenizer.get_vocab_size())).astype(np.float32)
    probs = softmax(logits.astype(np.float64))
    ids, mask = spelling_table(tokenizer, ["red", "blue", "green"])
    assert ids.shape == mask.shape == (3, 4)
    got = answer_probs(logits, ids, mask)
    v = tokenizer.token_to_id
    expected = np.stack([probs[:, v("red")] + probs[:, v("Red")], probs[:, v("blue")] + probs[:, v("Blue")],
                         probs[:, v("green")]], axis=1)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    jitted = jax.jit(answer_probs)(jnp.asarray(logits), ids, mask)
    assert isinstance(jitted, jax.Array)
    np.testing.assert_allclose(np.asarray(jitted), expected, rtol=1e-5)


def test_answer_probs_with_per_row_candidates():
    logits = np.log(np.array([[0.1, 0.2, 0.3, 0.1, 0.2, 0.05, 0.05],
                              [0.4, 0.0, 0.1, 0.1, 0.1, 0.2, 0.1]]) + 1e-12)
    ids, mask = spelling_table(spaced, [["red", "blue"], ["blue", "red"]])
    assert ids.shape == (2, 2, 4)
    np.testing.assert_allclose(answer_probs(logits, ids, mask), [[0.7, 0.25], [0.3, 0.6]], atol=1e-6)
    np.testing.assert_allclose(answer_probs(jnp.asarray(logits), ids, mask), [[0.7, 0.25], [0.3, 0.6]], atol=1e-6)


def test_top1_is_normalised(tokenizer):
    v = tokenizer.token_to_id
    logits = np.zeros((3, tokenizer.get_vocab_size()))
    logits[0, v("Red")] = logits[1, v("blue")] = logits[2, v("green")] = 5.0
    assert top1_tokens(logits, tokenizer) == ["red", "blue", "green"]
    np.testing.assert_array_equal(top1_correct(logits, ["red", "Blue ", "red"], tokenizer), [True, True, False])
    decode = {0: " Red", 1: "x"}.get
    np.testing.assert_array_equal(top1_correct(np.array([[3.0, 1.0]]), ["red"], decode), [True])
