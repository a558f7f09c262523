"""Layers shared by the model families, written to match transformers' numerics in float32.

Weights use the [in, out] layout. Norms and softmax run in float32 and cast back, as HF does.
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from spatial_jax.interventions import sites
from spatial_jax.interventions.taps import Taps

LM_LAYER_SITES = frozenset({sites.LM_RESID_PRE, sites.LM_ATTN_OUT, sites.LM_MLP_OUT, sites.LM_RESID_POST})

# float32 matmuls stay float32 on GPU/TPU too (no TF32 / bf16 passes), so parity holds everywhere.
PRECISION = jax.lax.Precision.HIGHEST
NEG_INF = -1e30


def init_normal(rngs: nnx.Rngs, shape: Sequence[int], dtype, std: float = 0.02) -> jax.Array:
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


class Dense(nnx.Module):
    """y = x @ kernel (+ bias); kernel [d_in, d_out]."""

    def __init__(self, d_in: int, d_out: int, *, bias: bool, dtype, rngs: nnx.Rngs):
        self.kernel = nnx.Param(init_normal(rngs, (d_in, d_out), dtype))
        self.bias = nnx.Param(jnp.zeros((d_out,), dtype)) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.matmul(x, self.kernel[...], precision=PRECISION)
        return y if self.bias is None else y + self.bias[...]


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float, dtype):
        self.scale = nnx.Param(jnp.ones((dim,), dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        mean = xf.mean(-1, keepdims=True)
        var = jnp.square(xf - mean).mean(-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


class RMSNorm(nnx.Module):
    """RMSNorm in two flavours.

    Qwen/Llama (`offset=0`): w * cast(x * rsqrt(mean x^2 + eps)), the weight after the cast.
    Gemma (`offset=1`): cast(x * rsqrt(...) * (1 + w)), weights stored zero-centred.
    """

    def __init__(self, dim: int, *, eps: float, dtype, offset: float = 0.0):
        self.scale = nnx.Param(jnp.full((dim,), 1.0 - offset, dtype))
        self.eps = eps
        self.offset = offset

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + self.eps)
        if self.offset:
            return (normed * (self.offset + self.scale[...].astype(jnp.float32))).astype(x.dtype)
        return self.scale[...] * normed.astype(x.dtype)


def rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [..., T, H, hd]; cos/sin broadcastable to [..., T, 1, hd]."""
    return x * cos + rotate_half(x) * sin


def attention(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array | None, scale: float) -> jax.Array:
    """Grouped-query attention with a boolean mask, softmax in float32.

    q [B, T, Hq, hd], k/v [B, S, Hkv, hd], allowed [B, T, S] (True = may attend) or None (all).
    Query head j reads kv head j // (Hq // Hkv), as HF's repeat_kv does. Returns [B, T, Hq, hd].
    """
    B, T, Hq, hd = q.shape
    Hkv = k.shape[2]
    qg = q.reshape(B, T, Hkv, Hq // Hkv, hd)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, precision=PRECISION).astype(jnp.float32) * scale
    if allowed is not None:
        scores = jnp.where(allowed[:, None, None], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, precision=PRECISION)
    return out.reshape(B, T, Hq, v.shape[-1])


def stack_modules(modules: Sequence[nnx.Module]) -> nnx.Module:
    """N modules of one structure -> one module whose params have a leading axis of size N."""
    graphdef, first = nnx.split(modules[0])
    rest = [nnx.state(m) for m in modules[1:]]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), first, *rest)
    return nnx.merge(graphdef, stacked)


def scan_layers(stacked: nnx.Module, step: Callable, carry, xs=None):
    """lax.scan over a stacked module: step(layer_module, carry, layer_index, x) -> (carry, y)."""
    graphdef, state = nnx.split(stacked)
    n = jax.tree.leaves(state)[0].shape[0]

    def body(c, inputs):
        layer_state, idx, x = inputs
        return step(nnx.merge(graphdef, layer_state), c, idx, x)

    return jax.lax.scan(body, carry, (state, jnp.arange(n), xs))


def run_layers(stacked: nnx.Module, x: jax.Array, ctx, taps: Taps, start: jax.Array | None = None) -> jax.Array:
    """Runs decoder layers `layer(x, ctx, taps, idx)` over x [B, T, D].

    From layer 0 it is a scan, and the cached per-layer sites leave it as [B, L, T, D]. With
    `start` (a traced scalar), x is the residual entering layer `start` and only layers
    start..L-1 run: a sweep patching at layer l reuses the clean run below l instead of
    recomputing it. That path caches nothing.
    """
    if start is None:
        def step(layer, h, idx, _):
            t = taps.for_step(LM_LAYER_SITES)
            return layer(h, ctx, t, idx), t.collected

        x, collected = scan_layers(stacked, step, x)
        for site, per_layer in collected.items():
            taps.collected[site] = jnp.moveaxis(per_layer, 0, 1)
        return x

    if taps.cache_sites & LM_LAYER_SITES:
        raise ValueError("per-layer sites cannot be cached when starting above layer 0")
    graphdef, state = nnx.split(stacked)
    n = jax.tree.leaves(state)[0].shape[0]

    def body(idx, h):
        layer_state = jax.tree.map(lambda p: jax.lax.dynamic_index_in_dim(p, idx, keepdims=False), state)
        return nnx.merge(graphdef, layer_state)(h, ctx, taps.for_step(LM_LAYER_SITES), idx)

    return jax.lax.fori_loop(start, n, body, x)
