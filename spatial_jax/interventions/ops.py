"""Interventions as data, and the one function that applies any of them at a site.

An `Intervention` is a pytree: `site` and `op` are static, everything else is an array, so a
batch of interventions (a leading axis on `layer`, `index`, `source`, ...) can be vmapped and
jitted without recompiling when only the layer or the token map changes.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from spatial_jax.interventions import sites

OPS = ("replace", "add", "amplify")
_EPS = 1e-8


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Intervention:
    """One intervention at one site.

    Attributes:
      site: a site name from `sites.ALL_SITES`.
      op: "replace" (also ablation with given values), "add" or "amplify".
      layer: int scalar array; the layer (LM) or block (vision) it applies at; a number no layer
        has (e.g. the number of layers) never applies. Ignored for the once-per-forward sites
        `vision.tokens` and `lm.final`.
      index: [B, T] int; for each destination token, the source token to read (replace/add) or
        any value >= 0 to act there (amplify); -1 keeps the token. None acts on every token with
        the identity map.
      source: [B, S, D] activations to read from (replace/add), or a [D] vector (add) that is
        added at every chosen token. At a head site D is (H, hd): [B, S, H, hd] or [H, hd].
      directions: [D, K] (amplify): h += alpha * sum_k (h.w_k / |w_k|^2) w_k. At a head site
        [hd, K]: each head's vector is amplified along the same directions in its own hd space
        (pick the heads with head_mask).
      alpha: scalar multiplier for add and amplify.
      head_mask: [H] bool, head sites only (`sites.HEAD_SITES`); the op changes only these heads
        (None: every head). At lm.attn_k / lm.attn_v, H counts key/value heads: with grouped-query
        attention, changing KV head j changes what every query head of its group reads (query
        heads j * G .. j * G + G - 1, G = query heads / KV heads), as repeat_kv shares it.

    `lm.attn_pattern` is cache only: an intervention there is refused.
    """

    site: str = dataclasses.field(metadata=dict(static=True))
    op: str = dataclasses.field(metadata=dict(static=True))
    layer: jax.Array | int = 0
    index: Optional[jax.Array] = None
    source: Optional[jax.Array] = None
    directions: Optional[jax.Array] = None
    alpha: jax.Array | float = 1.0
    head_mask: Optional[jax.Array] = None

    def __post_init__(self):
        sites.check_site(self.site)
        if self.site in sites.CACHE_ONLY_SITES:
            raise ValueError(f"site {self.site!r} can be cached but not intervened on; intervene at "
                             f"{sorted(sites.HEAD_SITES)} instead")
        if self.head_mask is not None and self.site not in sites.HEAD_SITES:
            raise ValueError(f"head_mask: site {self.site!r} has no head axis; head_mask applies at "
                             f"{sorted(sites.HEAD_SITES)} only")
        if self.op not in OPS:
            raise ValueError(f"unknown op {self.op!r}; known ops: {OPS}")
        if self.op in ("replace", "add") and self.source is None:
            raise ValueError(f"op {self.op!r} needs `source` activations")
        if self.op == "amplify" and self.directions is None:
            raise ValueError("op 'amplify' needs `directions` [D, K]")


def mask_index(mask: jax.Array) -> jax.Array:
    """[B, T] bool -> [B, T] int: the identity source map where `mask`, -1 elsewhere."""
    return jnp.where(mask, jnp.arange(mask.shape[-1]), -1)


def _per_token(a: jax.Array, n_features: int) -> jax.Array:
    """a [B, T] -> [B, T, 1, ...] with n_features trailing unit axes (broadcasts over a token's features)."""
    return a.reshape(a.shape + (1,) * n_features)


def _gather_tokens(source: jax.Array, index: jax.Array) -> jax.Array:
    """source [B, S, *F], index [B, T] (>= 0) -> [B, T, *F]."""
    return jnp.take_along_axis(source, _per_token(index, source.ndim - 2), axis=1)


def apply(h: jax.Array, iv: Intervention, layer: jax.Array | int, rows: jax.Array | None = None) -> jax.Array:
    """Applies `iv` to activations h [B, T, *F] if `iv.layer == layer`; returns the new h.

    F is a token's features: (D,), or (H, hd) at a head site, where `iv.head_mask` [H] keeps
    the heads it leaves out. rows [B, Q] int: h holds only these token positions ([B, Q, *F],
    a forward that computes some rows of a layer only); `iv.index` still speaks of every
    position and is read at them.
    """
    B, T = h.shape[:2]
    n_features = h.ndim - 2
    if rows is None:
        index = iv.index if iv.index is not None else jnp.broadcast_to(jnp.arange(T), (B, T))
    else:
        index = rows if iv.index is None else jnp.take_along_axis(iv.index, rows, axis=1)
    chosen = _per_token(index >= 0, n_features)
    src_index = jnp.maximum(index, 0)
    if iv.op == "replace":
        new = jnp.where(chosen, _gather_tokens(iv.source.astype(h.dtype), src_index), h)
    elif iv.op == "add":
        source = iv.source.astype(jnp.float32)
        delta = source if source.ndim == n_features else _gather_tokens(source, src_index)
        new = h + jnp.where(chosen, iv.alpha * delta, 0.0).astype(h.dtype)
    else:
        w = iv.directions.astype(jnp.float32)
        coeff = h.astype(jnp.float32) @ w / (jnp.sum(w * w, axis=0) + _EPS)
        new = h + jnp.where(chosen, iv.alpha * (coeff @ w.T), 0.0).astype(h.dtype)
    if iv.head_mask is not None:  # head axis -2 of [B, T, H, hd]
        new = jnp.where(jnp.asarray(iv.head_mask)[:, None], new, h)
    if iv.site in sites.ONCE_SITES:
        return new
    return jnp.where(jnp.asarray(iv.layer) == layer, new, h)
