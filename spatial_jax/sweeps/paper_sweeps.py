"""The two sweeps the paper's experiments are built on, as thin layers over `patch_sweep`.

Both patch at every residual "slot" of the LM, as the official code does: slot 0 is the LM input
(`lm.resid_pre` of layer 0, the "Embed" tick) and slot s >= 1 is the output of layer s - 1, so
a model with L layers has L + 1 slots. Sources come from one cached run of the counterfactual.
method "exact" runs every patch (`patch_sweep`); "attribution" estimates every patch to first
order (`attribution_sweep`, which returns an `AttributionResult`).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from spatial_jax import parallel
from spatial_jax.batch import Batch, last_positions
from spatial_jax.forward import Model, forward
from spatial_jax.interventions import sites
from spatial_jax.interventions.ops import Intervention
from spatial_jax.sweeps.attribution import AttributionResult, attribution_sweep
from spatial_jax.sweeps.sweep import Readout, SweepResult, patch_sweep

SWEEPS = {"exact": patch_sweep, "attribution": attribution_sweep}


def _slot_sweep(model: Model, base: Batch, source: Batch, index: np.ndarray, tokens: np.ndarray,
                base_interventions=(), source_interventions=(), method: str = "exact",
                **kwargs) -> SweepResult | AttributionResult:
    """Replace at every slot with the source run's residual there; index [R, B, T] -> [L+1, R, B, K].

    base_interventions apply in every patched run of `base` (e.g. an ablation), and
    source_interventions in the run the sources are cached from.
    """
    L = model.config.num_layers
    cache = forward(model, source, cache=(sites.LM_RESID_PRE, sites.LM_RESID_POST),
                    interventions=source_interventions, logits=False).cache
    readout = Readout(last_positions(base.with_defaults().attention_mask), tokens)
    R = index.shape[0]
    # [L+1, B, S, D]: slots 0..L-1 are the inputs of layers 0..L-1, slot L the last layer's output.
    acts = np.moveaxis(np.concatenate([parallel.to_host(cache[sites.LM_RESID_PRE]),
                                       parallel.to_host(cache[sites.LM_RESID_POST])[:, L - 1:]], axis=1), 1, 0)
    # One sweep over every slot, so the clean run is shared: each variant carries both
    # replacements, and the one that is not its slot's gets layer L, which no layer has.
    slots = np.arange(L + 1)

    def replace(site, layers):
        return Intervention(site=site, op="replace", layer=np.broadcast_to(layers[:, None], (L + 1, R)),
                            index=np.broadcast_to(index[None], (L + 1,) + index.shape),
                            source=np.broadcast_to(acts[:, None], (L + 1, R) + acts.shape[1:]))

    ivs = [replace(sites.LM_RESID_PRE, slots), replace(sites.LM_RESID_POST, np.where(slots == L, L - 1, L))]
    if method not in SWEEPS:
        raise ValueError(f"unknown method {method!r}; known: {sorted(SWEEPS)}")
    return SWEEPS[method](model, base, ivs, readout, base=base_interventions, **kwargs)


def last_token_sweep(model: Model, clean: Batch, cf: Batch, tokens: np.ndarray,
                     **kwargs) -> SweepResult | AttributionResult:
    """Paper Fig. 3: the cf run's last-token residual patched into the clean run at every slot.

    tokens: [K] or [B, K] answer tokens to track (e.g. the five candidate colours).
    Returns logits/probs [L+1, B, K] and argmax [L+1, B] (method "attribution": logits, effect
    and metric_change [L+1, B, ...]; its `top` indices, over [L+1, 1], are slots).
    """
    clean_mask = clean.with_defaults().attention_mask
    B, T = np.shape(clean_mask)
    index = np.full((1, B, T), -1, np.int32)
    index[0, np.arange(B), last_positions(clean_mask)] = last_positions(cf.with_defaults().attention_mask)
    res = _slot_sweep(model, clean, cf, index, tokens, **kwargs)
    if isinstance(res, AttributionResult):
        return dataclasses.replace(res, **{f: getattr(res, f)[:, 0] for f in ("logits", "effect", "metric_change")
                                           if getattr(res, f) is not None})
    return SweepResult(res.logits[:, 0], res.probs[:, 0], res.argmax[:, 0])


def region_swap_sweep(model: Model, clean: Batch, cf: Batch, index: np.ndarray, tokens: np.ndarray,
                      clean_interventions=(), cf_interventions=(), **kwargs) -> SweepResult | AttributionResult:
    """Paper Figs. 6, 7, 9: visual-token regions of the clean run replaced by the cf run's, at every slot.

    index: [R, B, T] source-index maps, one per region set (e.g. object-only, strip); a criss-cross
    swap maps the left region's tokens to the cf's right region and vice versa (see `swap_index`).
    clean_interventions / cf_interventions: applied to every clean run / the cf run (Fig. 9 swaps
    under an ablation of both). Returns logits/probs [L+1, R, B, K] and argmax [L+1, R, B].
    """
    return _slot_sweep(model, clean, cf, np.asarray(index, np.int32), tokens, clean_interventions,
                       cf_interventions, **kwargs)


def swap_index(T: int, pairs: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """[T] source-index map that swaps token regions: for each (a, b) of equal-size position
    arrays (in matching order), a reads from b and b from a; every other token is kept (-1)."""
    index = np.full((T,), -1, np.int32)
    for a, b in pairs:
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape:
            raise ValueError(f"swapped regions differ in size: {a.shape} vs {b.shape}")
        index[a], index[b] = b, a
    return index
