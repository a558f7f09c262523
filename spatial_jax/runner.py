"""The one forward runner: every caller (`forward.apply`, `next_token_logits`, the sweeps, the
organism's training step) runs a model through `run`, and its LM layers through `run_layers`.

    h = run(model, batch, taps)                                   # final-norm output [B, T, D]
    h = run(model, batch, taps, rows=position[:, None])           # the last layer at those rows only
    h = run(model, batch, taps, embeddings=x, start=l, rows=r)    # restart at layer l (a sweep variant)

`model` keeps the VLM contract (families/contract.py): embed_inputs, lm_context, stacked layers,
final, unembed.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from spatial_jax.families.contract import VLM
from spatial_jax.interventions.taps import Taps
from spatial_jax.nn.context import LMContext
from spatial_jax.nn.layers import LM_LAYER_SITES, select_rows


def run(model: VLM, batch, taps: Taps, *, embeddings: Optional[jax.Array] = None, start=0,
        rows: Optional[jax.Array] = None, prefix: Optional[jax.Array] = None,
        ctx: Optional[LMContext] = None) -> jax.Array:
    """embed_inputs (unless `embeddings`, the residual entering layer `start`, is given) -> layers
    from `start` on (`run_layers`) -> final norm. Returns the final norm's output [B, T, D], or
    [B, Q, D] at rows [B, Q]. ctx: the batch's LM context if already computed."""
    ctx = model.lm_context(batch) if ctx is None else ctx
    x = model.embed_inputs(batch, taps) if embeddings is None else embeddings
    x = run_layers(model.layers, x, ctx, taps, start=start, rows=rows, prefix=prefix)
    return model.final(x, taps, rows)


def run_layers(layers: nnx.Module, x: jax.Array, ctx: LMContext, taps: Taps, *, start=0,
               rows: Optional[jax.Array] = None, prefix: Optional[jax.Array] = None) -> jax.Array:
    """The stacked decoder layers from layer `start` on: each is called layer(h, ctx, taps, l, rows).

    x: the residual entering layer `start`, [B, T, D] (or [B, T - P, D] with a prefix).
    start: a Python int (a scan: differentiable, and the per-layer sites can be cached, as
      [B, L, T, D], when the run starts at 0 and computes every row) or a traced scalar (a
      fori_loop: one compiled function for every start, as the sweeps need; forward-only).
    rows [B, Q]: the last layer computes only these query positions (keys and values still from
      every position) and [B, Q, D] is returned: what a readout of a few positions needs.
    prefix [B, L, P, D]: the clean run's residual entering each layer at positions < P, which the
      caller's change cannot reach (causal attention): x then holds positions P.. only and each
      layer computes just those, the prefix supplying their keys and values. rows count from 0.
    """
    graphdef, state = nnx.split(layers)
    n = jax.tree.leaves(state)[0].shape[0]
    P = 0 if prefix is None else prefix.shape[2]
    changed = None if prefix is None else jnp.broadcast_to(jnp.arange(P, P + x.shape[1]), x.shape[:2])

    def call(idx, layer_state, h, step_taps, at_rows):
        entering = h if prefix is None else jnp.concatenate([jax.lax.dynamic_index_in_dim(prefix, idx, 1, False), h], 1)
        return nnx.merge(graphdef, layer_state)(entering, ctx, step_taps, idx, at_rows)

    def layer_at(idx):
        return _layer_at(state, idx)

    def last(h):
        return call(n - 1, layer_at(n - 1), h, taps.for_step(LM_LAYER_SITES), rows)

    caching = bool(taps.cache_sites & LM_LAYER_SITES)
    if isinstance(start, int):
        if caching and (start != 0 or rows is not None or prefix is not None):
            raise ValueError("per-layer sites can be cached only by a run from layer 0 that computes every row")
        stop = n if rows is None else n - 1

        def body(h, inputs):
            layer_state, idx = inputs
            t = taps.for_step(LM_LAYER_SITES)
            return call(idx, layer_state, h, t, changed), t.collected

        sliced = jax.tree.map(lambda p: p[start:stop], state)
        x, collected = jax.lax.scan(body, x, (sliced, jnp.arange(start, max(start, stop))))
        for site, per_layer in collected.items():
            taps.collected[site] = jnp.moveaxis(per_layer, 0, 1)
        if rows is None:
            return x
        return last(x) if start < n else select_rows(x, rows - P)

    if caching:
        raise ValueError("per-layer sites cannot be cached when starting at a traced layer")
    if rows is None:
        raise ValueError("a run from a traced start layer needs rows (the positions it returns)")
    x = jax.lax.fori_loop(start, n - 1, lambda idx, h: call(idx, layer_at(idx), h, taps.for_step(LM_LAYER_SITES),
                                                             changed), x)
    return jax.lax.cond(start < n, last, lambda h: select_rows(h, rows - P), x)


def run_span(layers: nnx.Module, x: jax.Array, ctx: LMContext, taps: Taps, start: jax.Array, count: int) -> jax.Array:
    """Layers start .. start + count - 1 (those that exist) on x [B, T, D], the residual entering
    layer `start` (traced), every row computed: a few layers of one variant run exactly
    (attribution's QK-fix). Returns the residual leaving the last of them [B, T, D]."""
    graphdef, state = nnx.split(layers)
    n = jax.tree.leaves(state)[0].shape[0]
    for j in range(count):
        idx = jnp.minimum(start + j, n - 1)
        layer = nnx.merge(graphdef, _layer_at(state, idx))
        x = jnp.where(start + j < n, layer(x, ctx, taps.for_step(LM_LAYER_SITES), idx, None), x)
    return x


def _layer_at(state, idx: jax.Array):
    """Layer idx's parameters out of the stacked [L, ...] state."""
    return jax.tree.map(lambda p: jax.lax.dynamic_index_in_dim(p, idx, keepdims=False), state)
