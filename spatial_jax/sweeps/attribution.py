"""Attribution patching (AtP): every variant of a sweep estimated to first order from one clean
forward and one backward per read token, with exact verification of the strongest candidates.

    est = attribution_sweep(model, batch, interventions, readout, verify_top=4)
    est.logits   # [*S, B, K] first-order estimate of every variant's read logits
    est.exact    # patch_sweep's result for the 4 variants per row with the largest estimated effect

For a variant that turns the clean activation a into a' at some sites, the read logit y_k moves by
about (a' - a) . dy_k/da, the gradient taken at the clean run (Nanda 2023; Kramar et al. 2024,
arXiv 2403.00745). The gradient comes from a zero perturbation added at every site the sweep
touches (its gradient is the activation's), all layers of a site at once: one runner pass, one
`jax.vjp`, then one cotangent per read token. a' is what the variant's interventions produce from
the clean activation (replace, add and amplify alike, through `ops.apply`), so each variant costs
a contraction, not a forward. Only the positions some variant changes are kept.

Not done: AtP*'s QK-fix (recomputing the attention softmax for key/query patches) and GradDrop.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from spatial_jax import parallel, validation
from spatial_jax.batch import Batch
from spatial_jax.forward import Model
from spatial_jax.interventions import ops, sites
from spatial_jax.interventions.ops import Intervention
from spatial_jax.interventions.taps import Taps
from spatial_jax.jitting import jit
from spatial_jax.nn.layers import select_rows
from spatial_jax.runner import run
from spatial_jax.sweeps import sweep as exact_sweep
from spatial_jax.sweeps.sweep import Readout, SweepResult, patch_sweep


@dataclasses.dataclass(frozen=True)
class AttributionResult:
    """logits [*S, B, K]: the first-order estimate of every variant's read logits; clean [B, K]:
    the clean run's; effect [*S, B]: how strongly each variant is estimated to move row b (see
    `effect_of`). With verify_top = k: top [B, k], the flat indices (into S, `np.unravel_index`)
    of row b's k strongest variants, largest first, and exact, patch_sweep's logits / probs
    [B, k, K] and argmax [B, k] for row b of variant top[b, j]; None otherwise."""

    logits: np.ndarray
    clean: np.ndarray
    effect: np.ndarray
    top: np.ndarray | None = None
    exact: SweepResult | None = None


def effect_of(change: np.ndarray) -> np.ndarray:
    """change [..., K] of the read logits -> [...] the variant's estimated effect: the largest
    change of one read logit relative to the mean change of all K (what their softmax, and any
    logit difference among them, sees; for K = 2 half the change of the logit difference); for
    K = 1 the absolute change of that logit."""
    change = np.asarray(change)
    if change.shape[-1] > 1:
        change = change - change.mean(-1, keepdims=True)
    return np.abs(change).max(-1)


class _Probed(Taps):
    """Taps that add eps[site] (zeros, to be differentiated) after the interventions at every
    probed site; per-layer eps [B, L, ...] is read at the tapped layer."""

    def __init__(self, interventions: Sequence[Intervention], cache: Sequence[str], eps: dict):
        super().__init__(interventions, cache)
        self.eps = eps

    def at(self, site, h, layer=0, rows=None):
        h = super().at(site, h, layer, rows)  # cached before eps is added: equal, as eps is 0
        if site not in self.eps:
            return h
        e = self.eps[site]
        if site not in sites.ONCE_SITES:
            e = jax.lax.dynamic_index_in_dim(e, layer, 1, keepdims=False)
        return h + e.astype(h.dtype)

    def for_step(self, step_sites):
        t = super().for_step(step_sites)
        return _Probed(t.interventions, tuple(t.cache_sites), {s: e for s, e in self.eps.items() if s in step_sites})


def _is_lm(site: str) -> bool:
    return site.startswith("lm.")


def _position_axis(site: str) -> int:
    """The token axis of a site's cached activation ([B, T, ...] once, [B, L, T, ...] per layer)."""
    return 1 if site in sites.ONCE_SITES else 2


# A tag per read token for the row-finding backward (vision sites): generic weights, so that no
# token's weighted gradient sum vanishes by cancellation where its gradients do not.
def _token_weights(K: int) -> jax.Array:
    return 1.0 + jnp.sqrt(2.0) * jnp.arange(K) % 1.0


def _linearise(graphdef, params, batch: Batch, base, readout: Readout, probed: tuple[str, ...],
               positions: jax.Array):
    """The clean run under `base` and the read logits' gradients at the probed sites.

    positions [B, P]: the LM positions kept (acts and grads of LM sites are gathered there).
    Returns clean [B, K]; acts {site: clean activation}; grads {site: [K, *acts[site].shape]};
    rows {vision site: [*token axes] the batch row each vision token feeds (-1: none)}."""
    module = nnx.merge(graphdef, params)
    ctx = module.lm_context(batch)
    B = batch.input_ids.shape[0]
    tokens = jnp.broadcast_to(readout.tokens, (B,) + jnp.shape(readout.tokens)[-1:])

    def read(eps):
        taps = _Probed(base, probed, eps)
        final = run(module, batch, taps, ctx=ctx)
        logits = module.unembed(select_rows(final, readout.position[:, None].astype(jnp.int32))[:, 0])
        return jnp.take_along_axis(logits, tokens, axis=-1), taps.collected

    shapes = jax.eval_shape(lambda: _cache_of(module, batch, base, probed, ctx))
    eps0 = {s: jnp.zeros(a.shape, a.dtype) for s, a in shapes.items()}
    clean, vjp, acts = jax.vjp(read, eps0, has_aux=True)
    K, P = clean.shape[1], positions.shape[1]

    def keep(site, a):
        """An LM site's activation (or gradient) at the kept positions only."""
        if not _is_lm(site):
            return a
        ax = _position_axis(site)
        return jnp.take_along_axis(a, positions.reshape((B,) + (1,) * (ax - 1) + (P,) + (1,) * (a.ndim - ax - 1)), ax)

    def grad_for(cotangent):
        (g,) = vjp(cotangent)
        return g

    grads = jax.lax.map(lambda k: {s: keep(s, g) for s, g in grad_for(
        jnp.zeros_like(clean).at[:, k].set(1.0)).items()}, jnp.arange(K))
    rows = {}
    vision = [s for s in probed if not _is_lm(s)]
    if vision:
        # Each vision token feeds one row; a backward whose cotangent weights row b by b + 1 scales
        # that token's gradient by its row + 1 against the same weights without the row.
        w = _token_weights(K)
        tagged = grad_for(jnp.arange(1, B + 1, dtype=clean.dtype)[:, None] * w)
        for s in vision:
            plain = jnp.einsum("k,k...->...", w, grads[s])
            at = jnp.argmax(jnp.abs(plain), axis=-1)[..., None]
            ratio = jnp.take_along_axis(tagged[s], at, -1)[..., 0] / jnp.take_along_axis(plain, at, -1)[..., 0]
            has = jnp.take_along_axis(plain, at, -1)[..., 0] != 0
            rows[s] = jnp.where(has, jnp.round(ratio).astype(jnp.int32) - 1, -1)
    return clean, {s: keep(s, a) for s, a in acts.items()}, grads, rows


def _cache_of(module, batch, base, probed, ctx):
    taps = Taps(base, probed)
    run(module, batch, taps, ctx=ctx)
    return taps.collected


_linearise_jit = jit(_linearise, static_argnames=("graphdef", "probed"))


def _estimate(ivs: tuple[Intervention, ...], acts: dict, grads: dict, rows: dict, positions: jax.Array,
              valid: jax.Array) -> jax.Array:
    """The estimated change [n, B, K] of the read logits for n variants (ivs' leaves [n, ...]).

    Interventions at one site compose in list order on the clean activation at the layer each
    targets; a layer that several of them target is counted once (at its first)."""
    B, K = positions.shape[0], next(iter(grads.values())).shape[0]

    def one(variant):
        total = jnp.zeros((B, K), jnp.float32)
        for i, iv in enumerate(variant):
            same = [j for j in variant if j.site == iv.site]
            once = iv.site in sites.ONCE_SITES
            a, g = acts[iv.site], grads[iv.site]
            if once:
                layer, counted, h = 0, not any(j.site == iv.site for j in variant[:i]), a
            else:
                layer = jnp.asarray(iv.layer, jnp.int32)
                counted = (layer >= 0) & (layer < a.shape[1])
                for j in variant[:i]:
                    if j.site == iv.site:
                        counted &= jnp.asarray(j.layer) != layer
                h = jax.lax.dynamic_index_in_dim(a, layer, 1, keepdims=False)
                g = jax.lax.dynamic_index_in_dim(g, layer, 2, keepdims=False)
            lm = _is_lm(iv.site)
            patched = h
            for j in same:
                patched = ops.apply(patched, j, layer, rows=positions if lm else None)
            delta = (patched.astype(jnp.float32) - h.astype(jnp.float32))
            if lm:
                delta = jnp.where(valid.reshape(valid.shape + (1,) * (delta.ndim - 2)), delta, 0.0)
                change = jnp.einsum("b...,kb...->bk", delta, g.astype(jnp.float32))
            else:
                per_token = jnp.einsum("...d,k...d->k...", delta, g.astype(jnp.float32))
                row = rows[iv.site] if once else jax.lax.dynamic_index_in_dim(rows[iv.site], layer, 1, keepdims=False)
                change = jnp.einsum("k...,...b->bk", per_token, row[..., None] == jnp.arange(B))
            total = total + jnp.where(counted, change, 0.0)
        return total

    return jax.vmap(one)(ivs)


_estimate_jit = jit(_estimate)


def _kept_positions(interventions: Sequence[Intervention], B: int, T: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """positions [B, P], valid [B, P]: in each row, the LM positions some variant changes (first,
    in order), padded by repeating the last; every position where an LM intervention has no index."""
    hit = np.zeros((B, T), bool)
    for iv in interventions:
        if not _is_lm(iv.site):
            continue
        if iv.index is None:
            hit[:] = True
        else:
            hit |= (np.asarray(iv.index) >= 0).reshape(n, B, T).any(0)
    P = max(1, int(hit.sum(1).max()))
    order = np.argsort(~hit, axis=1, kind="stable")[:, :P]
    valid = np.take_along_axis(hit, order, 1)
    last = order[np.arange(B), np.maximum(valid.sum(1) - 1, 0)]
    return np.where(valid, order, last[:, None]).astype(np.int32), valid


def attribution_sweep(model: Model, batch: Batch, interventions: Sequence[Intervention], readout: Readout, *,
                      base: Sequence[Intervention] = (), verify_top: int = 0,
                      memory_budget_bytes: float | None = None, progress: bool = False,
                      mesh: jax.sharding.Mesh | None = None, **exact_kwargs) -> AttributionResult:
    """First-order estimates of what `patch_sweep(model, batch, interventions, readout, base=base)`
    returns as logits, for every variant, from one clean forward and one backward per read token.

    Takes patch_sweep's arguments (interventions with leading variant axes S, `base` applied in
    the clean run and before every variant's own, the mesh: params as sharded, the clean run's
    rows and the variants over `data`). Any site and op: the variant's patched activation is what
    its interventions make of the clean one. memory_budget_bytes bounds a chunk of variants'
    contractions (default as patch_sweep's). verify_top = k: row b's k variants with the largest
    `effect_of` their estimated change are also run exactly, by patch_sweep (`exact_kwargs` go
    to it), and returned beside the estimate (`AttributionResult`).
    """
    if mesh is None:
        mesh = model.mesh
    elif mesh != model.mesh:
        model = exact_sweep._on_mesh(model, mesh)
    batch = batch.with_defaults()
    validation.check_batch(model, batch)
    interventions, base = validation.intervention_list(interventions), validation.intervention_list(base)
    shape = exact_sweep._num_variants(interventions)
    validation.check_interventions(model.config, np.shape(batch.input_ids), interventions, shape)
    validation.check_interventions(model.config, np.shape(batch.input_ids), base, name="base")
    validation.check_readout(model.config, np.shape(batch.input_ids), readout.position, readout.tokens)
    if verify_top < 0:
        raise ValueError(f"verify_top must be >= 0, got {verify_top}")
    n = int(math.prod(shape))
    vshape = shape or (1,)
    variants = [jax.tree.map(lambda a: np.broadcast_to(a, vshape + np.shape(a)[len(shape):]), iv)
                for iv in interventions]
    readout = Readout(np.asarray(readout.position, np.int32), np.asarray(readout.tokens, np.int32))
    B, T = np.shape(batch.input_ids)
    positions, valid = _kept_positions(variants, B, T, n)
    probed = tuple(sorted({iv.site for iv in interventions}))

    args = (batch, base, readout, probed, positions)
    if mesh is not None:
        args = (parallel.shard_batch(batch, mesh), parallel.put_tree(base, mesh), parallel.put_tree(readout, mesh),
                probed, parallel.put_tree(positions, mesh))
    clean, acts, grads, rows = _linearise_jit(model.graphdef, model.params, *args)

    K = clean.shape[1]
    per_variant = 4 * sum((K + 3) * math.prod(a.shape) // (a.shape[1] if s not in sites.ONCE_SITES else 1)
                          for s, a in acts.items()) + sum(a.nbytes for a in jax.tree.leaves(variants)) // n
    budget = exact_sweep.default_memory_budget() if memory_budget_bytes is None else memory_budget_bytes
    n_data = 1 if mesh is None else parallel.axis_size(mesh, parallel.DATA)
    chunk = -(-int(max(1, min(256, budget // per_variant))) // n_data) * n_data
    placed = (positions, valid) if mesh is None else (parallel.put_tree(positions, mesh), parallel.put_tree(valid, mesh))
    change = np.empty((n, B, K), np.float32)
    for i in tqdm(range(0, n, chunk), disable=not progress, desc="attribution", unit="chunk"):
        idx = np.arange(i, min(n, i + chunk))
        size = exact_sweep._call_size(len(idx), chunk, mesh)
        padded = np.concatenate([idx, np.full((size - len(idx),), idx[-1])])
        which = np.unravel_index(padded, vshape)
        ivs = tuple(jax.tree.map(lambda a: a[which], iv) for iv in variants)
        if mesh is not None:
            ivs = parallel.put_tree(ivs, mesh, data_axis=0)
        change[idx] = parallel.to_host(_estimate_jit(ivs, acts, grads, rows, *placed))[:len(idx)]
    clean = parallel.to_host(clean)
    change = change.reshape(shape + (B, K))
    effect = effect_of(change)
    result = AttributionResult(clean + change, clean, effect)
    if not verify_top:
        return result
    k = min(verify_top, n)
    flat = effect.reshape(n, B)
    top = np.argsort(-flat, axis=0, kind="stable")[:k].T  # [B, k]
    chosen = np.unique(top)
    which = np.unravel_index(chosen, vshape)
    exact = patch_sweep(model, batch, [jax.tree.map(lambda a: a[which], iv) for iv in variants], readout,
                        base=base, mesh=mesh, progress=progress, **exact_kwargs)
    at = np.searchsorted(chosen, top)  # [B, k] rows of `exact`
    b = np.arange(B)[:, None]
    return dataclasses.replace(result, top=top, exact=SweepResult(exact.logits[at, b], exact.probs[at, b],
                                                                   exact.argmax[at, b]))
