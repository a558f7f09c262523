"""Attribution patching (AtP): every variant of a sweep estimated to first order from one clean
forward and one backward per read token (or one in all for a scalar metric), with exact
verification of the strongest candidates, and AtP*'s two fixes as flags.

    est = attribution_sweep(model, batch, interventions, readout, verify_top=4)
    est.logits   # [*S, B, K] first-order estimate of every variant's read logits
    est.exact    # patch_sweep's result for the 4 variants per row with the largest estimated effect
    est = attribution_sweep(model, batch, interventions, readout, metric=lambda y: y[:, 0] - y[:, 1])
    est.metric_change   # [*S, B] the estimated change of the metric: one backward, whatever K

For a variant that turns the clean activation a into a' at some sites, the read logit y_k moves by
about (a' - a) . dy_k/da, the gradient taken at the clean run (Nanda 2023; Kramar et al. 2024,
arXiv 2403.00745). The gradient comes from a zero perturbation added at every site the sweep
touches (its gradient is the activation's), all layers of a site at once: one runner pass, one
`jax.vjp`, then one cotangent per read token, or one cotangent of ones through `metric(read
logits)` [B] (a word's log-odds: the chain rule done by the backward, not K backwards). a' is
what the variant's interventions produce from the clean activation (replace, add and amplify
alike, through `ops.apply`), so each variant costs a contraction, not a forward. Only the
positions some variant changes are kept.

AtP* (Kramar et al. 2024):
  * qk_fix: the layer whose attention first reads the patched activation is run exactly for
    each variant (from the clean residual entering the variant's first patched layer: one layer
    for sites before the attention softmax, resid_pre and the head sites q/k/v; two for those
    after it, whose change reaches the next layer's attention), and only the rest is linearised,
    from that layer's output. The paper recomputes the attention pattern exactly and linearises
    from it; for residual-level sites a whole layer costs about the same (1/L of a forward per
    variant, every row) and is exact through the layer's MLP too. Vision and lm.final
    interventions stay first order.
  * grad_drop: L more linearisations, each with the gradient through one layer's contributions
    to the residual (lm.attn_out and lm.mlp_out, the node itself included) stopped; the effect
    used for ranking (verify_top) is then sum_l |estimate_l| / (L - 1) (the paper's Eq. 11), a
    magnitude that a cancellation of paths cannot hide. The estimate itself stays plain AtP.
    Each linearisation repeats the forward (the backward's primal), so this costs L forwards
    and L backwards per read metric, where the paper counts L - 1 backwards.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from spatial_jax import parallel
from spatial_jax.batch import Batch
from spatial_jax.forward import Model
from spatial_jax.interventions import ops, sites
from spatial_jax.interventions.ops import Intervention
from spatial_jax.interventions.taps import Taps
from spatial_jax.jitting import jit
from spatial_jax.nn.layers import select_rows
from spatial_jax.runner import run, run_span
from spatial_jax.sweeps import sweep as exact_sweep
from spatial_jax.sweeps.sweep import Readout, SweepResult, patch_sweep


@dataclasses.dataclass(frozen=True)
class AttributionResult:
    """logits [*S, B, K]: the first-order estimate of every variant's read logits (None with a
    metric); clean [B, K]: the clean run's; effect [*S, B]: how strongly each variant is
    estimated to move row b (see `effect_of`; with a metric |metric_change|; with grad_drop the
    GradDrop score). With a metric: metric_change [*S, B], the estimated change of the metric
    from metric_clean [B]. With verify_top = k: top [B, k], the flat indices (into S,
    `np.unravel_index`) of row b's k strongest variants, largest first, and exact, patch_sweep's
    logits / probs [B, k, K] and argmax [B, k] for row b of variant top[b, j]; None otherwise."""

    logits: np.ndarray | None
    clean: np.ndarray
    effect: np.ndarray
    metric_change: np.ndarray | None = None
    metric_clean: np.ndarray | None = None
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


# A layer's contributions to the residual, whose gradient GradDrop stops.
_CONTRIBUTIONS = frozenset({sites.LM_ATTN_OUT, sites.LM_MLP_OUT})
# Sites read before the attention softmax of their own layer: QK-fix runs that one layer.
_BEFORE_SOFTMAX = frozenset({sites.LM_RESID_PRE, sites.LM_ATTN_Q, sites.LM_ATTN_K, sites.LM_ATTN_V})


class _Probed(Taps):
    """Taps that add eps[site] (zeros, to be differentiated) after the interventions at every
    probed site; per-layer eps [B, L, ...] is read at the tapped layer. drop (traced int, or
    None): the layer whose contributions to the residual pass no gradient (GradDrop)."""

    def __init__(self, interventions: Sequence[Intervention], cache: Sequence[str], eps: dict, drop=None):
        super().__init__(interventions, cache)
        self.eps = eps
        self.drop = drop

    def at(self, site, h, layer=0, rows=None):
        h = super().at(site, h, layer, rows)  # cached before eps is added: equal, as eps is 0
        if site in self.eps:
            e = self.eps[site]
            if site not in sites.ONCE_SITES:
                e = jax.lax.dynamic_index_in_dim(e, layer, 1, keepdims=False)
            h = h + e.astype(h.dtype)
        if self.drop is not None and site in _CONTRIBUTIONS:
            h = jnp.where(jnp.asarray(layer) == self.drop, jax.lax.stop_gradient(h), h)
        return h

    def for_step(self, step_sites):
        t = super().for_step(step_sites)
        return _Probed(t.interventions, tuple(t.cache_sites), {s: e for s, e in self.eps.items() if s in step_sites},
                       self.drop)


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
               positions: jax.Array, metric, drop, full_post: bool):
    """The clean run under `base` and the gradients of what is read at the probed sites.

    positions [B, P]: the LM positions kept (acts and grads of LM sites are gathered there).
    metric: None (the K read logits are read, one backward each) or read logits [B, K] -> [B]
    (one backward). drop: GradDrop's layer (see `_Probed`), or None.
    Returns read [B, K'] (K' = K, or 1: the metric); clean [B, K] the read logits; acts {site:
    clean activation}; grads {site: [K', *acts[site].shape]}; rows {vision site: [*token axes]
    the batch row each vision token feeds (-1: none)}; with full_post (QK-fix) qk: entering [B,
    L, T, D] the residual entering each layer, post [B, L, T, D] the one leaving it, grad [K', B,
    L, T, D] the gradient there, at every position (else None)."""
    module = nnx.merge(graphdef, params)
    ctx = module.lm_context(batch)
    B = batch.input_ids.shape[0]
    tokens = jnp.broadcast_to(readout.tokens, (B,) + jnp.shape(readout.tokens)[-1:])

    def read(eps):
        taps = _Probed(base, probed, eps, drop)
        embeddings = module.embed_inputs(batch, taps)
        final = run(module, batch, taps, embeddings=embeddings, ctx=ctx)
        logits = jnp.take_along_axis(
            module.unembed(select_rows(final, readout.position[:, None].astype(jnp.int32))[:, 0]), tokens, axis=-1)
        return (logits if metric is None else metric(logits)[:, None]), (logits, taps.collected, embeddings)

    shapes = jax.eval_shape(lambda: _cache_of(module, batch, base, probed, ctx))
    eps0 = {s: jnp.zeros(a.shape, a.dtype) for s, a in shapes.items()}
    out, vjp, (clean, acts, embeddings) = jax.vjp(read, eps0, has_aux=True)
    K, P = out.shape[1], positions.shape[1]

    def keep(site, a):
        """An LM site's activation (or gradient) at the kept positions only."""
        if not _is_lm(site):
            return a
        ax = _position_axis(site)
        return jnp.take_along_axis(a, positions.reshape((B,) + (1,) * (ax - 1) + (P,) + (1,) * (a.ndim - ax - 1)), ax)

    def grad_for(cotangent):
        (g,) = vjp(cotangent)
        return g

    def kept_grads(k):
        g = grad_for(jnp.zeros_like(out).at[:, k].set(1.0))
        return {s: keep(s, x) for s, x in g.items()}, (g[sites.LM_RESID_POST] if full_post else None)

    grads, post_grad = jax.lax.map(kept_grads, jnp.arange(K))
    qk = None
    if full_post:
        post = acts[sites.LM_RESID_POST]
        qk = {"entering": jnp.concatenate([embeddings[:, None], post[:, :-1]], 1), "post": post, "grad": post_grad}
    rows = {}
    vision = [s for s in probed if not _is_lm(s)]
    if vision:
        # Each vision token feeds one row; a backward whose cotangent weights row b by b + 1 scales
        # that token's gradient by its row + 1 against the same weights without the row.
        w = _token_weights(K)
        tagged = grad_for(jnp.arange(1, B + 1, dtype=out.dtype)[:, None] * w)
        for s in vision:
            plain = jnp.einsum("k,k...->...", w, grads[s])
            at = jnp.argmax(jnp.abs(plain), axis=-1)[..., None]
            ratio = jnp.take_along_axis(tagged[s], at, -1)[..., 0] / jnp.take_along_axis(plain, at, -1)[..., 0]
            has = jnp.take_along_axis(plain, at, -1)[..., 0] != 0
            rows[s] = jnp.where(has, jnp.round(ratio).astype(jnp.int32) - 1, -1)
    return out, clean, {s: keep(s, a) for s, a in acts.items()}, grads, rows, qk


def _cache_of(module, batch, base, probed, ctx):
    taps = Taps(base, probed)
    run(module, batch, taps, ctx=ctx)
    return taps.collected


_linearise_jit = jit(_linearise, static_argnames=("graphdef", "probed", "full_post"))


def _estimate(graphdef, params, batch: Batch, base, ivs: tuple[Intervention, ...], acts: dict, grads: dict,
              rows: dict, positions: jax.Array, valid: jax.Array, qk: dict | None, first: jax.Array | None,
              span: int) -> jax.Array:
    """The estimated change [n, B, K] of what is read for n variants (ivs' leaves [n, ...]).

    Interventions at one site compose in list order on the clean activation at the layer each
    targets; a layer that several of them target is counted once (at its first). span > 0
    (QK-fix, qk from `_linearise`): the variants' first patched LM layer l = first (a scalar,
    shared by the chunk: `sweep.start_layers`; so one slice of the stacked weights serves every
    variant, where a per-variant layer would gather a copy of them per variant) and the layers up
    to a = l + span - 1 run exactly from the clean residual entering l, under base and all of the
    variant's interventions; the change of the residual leaving a is linearised from there, and
    only the interventions outside l..a are estimated at their own sites."""
    B, K = positions.shape[0], jax.tree.leaves(grads)[0].shape[0]
    if span:
        module = nnx.merge(graphdef, params)
        ctx = module.lm_context(batch)
        L = qk["post"].shape[1]

    def exact_layers(variant):
        """-> the change [B, K] through the variant's exactly run layers, and per intervention
        whether they covered it."""
        layered = [i for i, iv in enumerate(variant) if _is_lm(iv.site) and iv.site not in sites.ONCE_SITES]
        if not span or not layered:
            return jnp.zeros((B, K), jnp.float32), [False] * len(variant)
        layer = {i: jnp.asarray(variant[i].layer, jnp.int32) for i in layered}
        x = jax.lax.dynamic_index_in_dim(qk["entering"], jnp.minimum(first, L - 1), 1, keepdims=False)
        out = run_span(module.layers, x, ctx, Taps(tuple(base) + tuple(variant)), first, span)
        last = jnp.minimum(first + span - 1, L - 1)
        delta = out.astype(jnp.float32) - jax.lax.dynamic_index_in_dim(qk["post"], last, 1, keepdims=False)
        g = jax.lax.dynamic_index_in_dim(qk["grad"], last, 2, keepdims=False)
        change = jnp.where(first < L, jnp.einsum("b...,kb...->bk", delta, g.astype(jnp.float32)), 0.0)
        covered = [(first < L) & (layer[i] >= first) & (layer[i] <= last) if i in layer else False
                   for i in range(len(variant))]
        return change, covered

    def one(variant):
        total, covered = exact_layers(variant)
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
            counted = jnp.logical_and(counted, jnp.logical_not(covered[i]))
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


_estimate_jit = jit(_estimate, static_argnames=("graphdef", "span"))


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


def _qk_span(interventions: Sequence[Intervention]) -> int:
    """Layers QK-fix runs per variant: 1 when every per-layer LM site of the sweep is read before
    its layer's attention softmax, else 2 (the change reaches attention in the next layer)."""
    layered = {iv.site for iv in interventions if _is_lm(iv.site) and iv.site not in sites.ONCE_SITES}
    return 1 if layered <= _BEFORE_SOFTMAX else 2


def attribution_sweep(model: Model, batch: Batch, interventions: Sequence[Intervention], readout: Readout, *,
                      base: Sequence[Intervention] = (), verify_top: int = 0,
                      metric: Callable[[jax.Array], jax.Array] | None = None, qk_fix: bool = False,
                      grad_drop: bool = False, memory_budget_bytes: float | None = None, progress: bool = False,
                      mesh: jax.sharding.Mesh | None = None, **exact_kwargs) -> AttributionResult:
    """First-order estimates of what `patch_sweep(model, batch, interventions, readout, base=base)`
    returns as logits, for every variant, from one clean forward and one backward per read token
    (or, with a metric, of the metric's change from one backward).

    Takes patch_sweep's arguments (interventions with leading variant axes S, `base` applied in
    the clean run and before every variant's own, the mesh: params as sharded, the clean run's
    rows and the variants over `data`). Any site and op: the variant's patched activation is what
    its interventions make of the clean one. memory_budget_bytes bounds a chunk of variants'
    contractions (default as patch_sweep's). verify_top = k: row b's k variants with the largest
    `effect` are also run exactly, by patch_sweep (`exact_kwargs` go to it), and returned beside
    the estimate (`AttributionResult`).
    metric: a pure jnp function of the read logits [B, K] -> [B] (row b's value from row b's
    logits only), e.g. a log-odds between two words: one backward in all gives the estimated
    change of the metric for every variant (`metric_change`; `logits` is then None). Each new
    function object compiles anew; a `jax.tree_util.Partial` carries arrays as arguments
    (`Candidates.log_odds_metric`).
    qk_fix, grad_drop: AtP*'s fixes (module docstring); qk_fix adds a few layers per variant and
    the gradient at every position of lm.resid_post, grad_drop L more forward-backward passes.
    """
    model, batch, interventions, base, readout, mesh, shape, variants = exact_sweep.prepare(
        model, batch, interventions, readout, base, mesh)
    if verify_top < 0:
        raise ValueError(f"verify_top must be >= 0, got {verify_top}")
    L = model.config.num_layers
    if grad_drop and L < 2:
        raise ValueError(f"grad_drop needs at least 2 LM layers (its score divides by L - 1), the model has {L}")
    n, vshape = int(math.prod(shape)), shape or (1,)
    B, T = np.shape(batch.input_ids)
    if metric is not None:
        metric = metric if isinstance(metric, jax.tree_util.Partial) else jax.tree_util.Partial(metric)
        K = np.shape(readout.tokens)[-1]
        got = jax.eval_shape(metric, jax.ShapeDtypeStruct((B, K), jnp.float32))
        if getattr(got, "shape", None) != (B,):
            raise ValueError(f"metric must map the read logits [B, K] = [{B}, {K}] to [B] = [{B}], "
                             f"got {getattr(got, 'shape', type(got).__name__)}")
    positions, valid = _kept_positions(variants, B, T, n)
    span = _qk_span(interventions) if qk_fix else 0
    firsts = exact_sweep.start_layers(interventions, shape, L) if span else None
    probed = tuple(sorted({iv.site for iv in interventions} | ({sites.LM_RESID_POST} if span else set())))

    args = (batch, base, readout, probed, positions)
    placed = (positions, valid)
    if mesh is not None:
        args = (parallel.shard_batch(batch, mesh), parallel.put_tree(base, mesh), parallel.put_tree(readout, mesh),
                probed, parallel.put_tree(positions, mesh))
        placed = (parallel.put_tree(positions, mesh), parallel.put_tree(valid, mesh))

    def linearise(drop):
        return _linearise_jit(model.graphdef, model.params, *args, metric, drop, bool(span))

    budget = exact_sweep.default_memory_budget() if memory_budget_bytes is None else memory_budget_bytes
    n_data = 1 if mesh is None else parallel.axis_size(mesh, parallel.DATA)

    def estimate(acts, grads, rows, qk) -> np.ndarray:
        """[n, B, K'] the estimated change of every variant, in chunks within the budget."""
        Kr = jax.tree.leaves(grads)[0].shape[0]
        per_variant = 4 * sum((Kr + 3) * math.prod(a.shape) // (a.shape[1] if s not in sites.ONCE_SITES else 1)
                              for s, a in acts.items()) + sum(a.nbytes for a in jax.tree.leaves(variants)) // n
        if span:  # the exactly run layers' activations and the full-position gradient they contract with
            per_variant += span * exact_sweep.variant_bytes(model, batch, variants, n) // L + 4 * (Kr + 2) * (
                qk["post"].size // L)
        chunk = -(-int(max(1, min(256, budget // per_variant))) // n_data) * n_data
        change = np.empty((n, B, Kr), np.float32)
        # QK-fix: each call's variants share their first patched layer (see `_estimate`)
        groups = [np.flatnonzero(firsts == f) for f in np.unique(firsts)] if span else [np.arange(n)]
        calls = [g[i:i + chunk] for g in groups for i in range(0, len(g), chunk)]
        for idx in tqdm(calls, disable=not progress, desc="attribution", unit="chunk"):
            size = exact_sweep.call_size(len(idx), chunk, mesh)
            padded = np.concatenate([idx, np.full((size - len(idx),), idx[-1])])
            which = np.unravel_index(padded, vshape)
            ivs = tuple(jax.tree.map(lambda a: a[which], iv) for iv in variants)
            if mesh is not None:
                ivs = parallel.put_tree(ivs, mesh, data_axis=0)
            change[idx] = parallel.to_host(_estimate_jit(model.graphdef, model.params, args[0], args[1], ivs, acts,
                                                         grads, rows, *placed, qk,
                                                         np.int32(firsts[idx[0]]) if span else None, span))[:len(idx)]
        return change

    def strength(change: np.ndarray) -> np.ndarray:
        return np.abs(change[..., 0]) if metric is not None else effect_of(change)

    read, clean, *linear = linearise(None)
    change = estimate(*linear)
    effect = strength(change)
    if grad_drop:  # Eq. 11 of the paper: the mean over dropped layers of |estimate|, over L - 1
        effect = sum(strength(estimate(*linearise(np.int32(layer))[2:])) for layer in range(L)) / (L - 1)
    clean = parallel.to_host(clean)
    if metric is None:
        result = AttributionResult(clean + change.reshape(shape + (B, -1)), clean, effect.reshape(shape + (B,)))
    else:
        read = parallel.to_host(read)[:, 0]
        result = AttributionResult(None, clean, effect.reshape(shape + (B,)), change[..., 0].reshape(shape + (B,)), read)
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
