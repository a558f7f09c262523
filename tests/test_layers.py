"""Shared layer functions against plain numpy references."""
from __future__ import annotations

import numpy as np
import pytest

from spatial_jax.nn import layers as L


def _numpy_attention(q, k, v, allowed, scale):
    """q [B, T, Hq, hd], k/v [B, S, Hkv, hd]: query head j reads kv head j // (Hq // Hkv)."""
    G = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)
    scores = np.einsum("bthd,bshd->bhts", q.astype(np.float64), k) * scale
    if allowed is not None:
        scores = np.where(allowed[:, None], scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    return np.einsum("bhts,bshd->bthd", p / p.sum(-1, keepdims=True), v)


@pytest.mark.parametrize("chunk_bytes", [L.CPU_SCORE_CHUNK_BYTES, 1, 4 * 8 * 5 * 7 * 2],
                         ids=["one_call", "row_by_row", "two_rows_a_step"])
@pytest.mark.parametrize("masked", [False, True])
def test_attention_matches_numpy(monkeypatch, chunk_bytes, masked):
    """Grouped-query attention (8 query heads on 2 kv heads, T = 5 queries on S = 7 keys, a
    batch of 6), whether the batch goes in one call or a few rows (strided) per step."""
    monkeypatch.setattr(L, "CPU_SCORE_CHUNK_BYTES", chunk_bytes)
    rng = np.random.default_rng(0)
    B, T, S, Hq, Hkv, hd = 6, 5, 7, 8, 2, 4
    q = rng.standard_normal((B, T, Hq, hd)).astype(np.float32)
    k, v = (rng.standard_normal((B, S, Hkv, hd)).astype(np.float32) for _ in range(2))
    allowed = None
    if masked:  # causal over the last T keys, and each row hides a different key
        allowed = np.arange(S)[None, None] <= np.arange(S - T, S)[None, :, None]
        allowed = allowed & (np.arange(S)[None, None] != np.arange(B)[:, None, None])
    got = np.asarray(L.attention(q, k, v, allowed, 0.5))
    np.testing.assert_allclose(got, _numpy_attention(q, k, v, allowed, 0.5), atol=1e-6)
