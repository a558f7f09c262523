"""Batched intervention sweeps: many patched variants of one base batch in few compiled calls.

A sweep is a tuple of `Intervention`s whose array fields carry leading variant axes S (e.g.
layers x regions); variant i applies every intervention's i-th slice together. The sweep keeps
only what the metric reads (`Readout`): logits and probabilities of chosen tokens at one
position per row, and the argmax.

Where the speed comes from (docs/design.md):
  * the vision tower and the layers below a variant's first patched layer run once, in a clean
    run; each variant restarts the LM from the clean residual entering that layer, taken before
    any of that layer's taps so that `base` interventions there apply exactly once;
  * a variant computes only the positions its changes can reach (from its first patched
    position on, or earlier where attention runs both ways); the unchanged prefix's keys and
    values come from the clean run;
  * variants are grouped by start layer and by that first position, and run in chunks of one
    jitted, vmapped function (power-of-two sizes up to the chunk size; computed positions in
    buckets, `_row_bucket`), so a new layer or source never recompiles, and a new mask only
    where it moves the first changed position into a bucket not compiled yet;
  * the last layer, the final norm and the unembedding run only at the read positions (the
    last layer's keys and values still come from every position).
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

from spatial_jax import families, parallel, validation
from spatial_jax.batch import Batch
from spatial_jax.forward import Model
from spatial_jax.interventions import sites
from spatial_jax.interventions.ops import Intervention
from spatial_jax.interventions.taps import Taps
from spatial_jax.jitting import jit
from spatial_jax.runner import run, run_layers


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Readout:
    """What each variant keeps. position [B] int: the token read per row; tokens [B, K] or [K]."""

    position: jax.Array | np.ndarray
    tokens: jax.Array | np.ndarray


@dataclasses.dataclass(frozen=True)
class SweepResult:
    """logits/probs [*S, B, K] float32 of the read tokens; argmax [*S, B] over the whole vocabulary."""

    logits: np.ndarray
    probs: np.ndarray
    argmax: np.ndarray


def _read(module, final: jax.Array, tokens: jax.Array):
    """final [B, 1, D]: the final norm's output at the read positions -> the logits and
    probabilities of tokens ([K] or [B, K]) and the argmax."""
    logits = module.unembed(final[:, 0])  # [B, V]
    tokens = jnp.broadcast_to(tokens, (final.shape[0],) + jnp.shape(tokens)[-1:])
    logp = jax.nn.log_softmax(logits, axis=-1)
    return (jnp.take_along_axis(logits, tokens, axis=-1), jnp.exp(jnp.take_along_axis(logp, tokens, axis=-1)),
            jnp.argmax(logits, axis=-1).astype(jnp.int32))


def _variants_from(graphdef, params, batch: Batch, x_start, start, ivs, readout, base=(), prefix=None):
    """vmapped over the leading axis of `ivs`; `base` interventions apply unbatched in every
    variant. x_start None: every variant runs the full forward (vision included, start 0);
    otherwise each restarts the LM at layer `start` from x_start [B, T - P, D], the positions
    after the unchanged prefix [B, L, P, D] (see `runner.run_layers`). The last layer runs at the
    read positions only."""
    module = nnx.merge(graphdef, params)
    ctx = module.lm_context(batch)
    rows = readout.position[:, None].astype(jnp.int32)

    def one(variant_ivs):
        taps = Taps(tuple(base) + tuple(variant_ivs))
        return _read(module, run(module, batch, taps, embeddings=x_start, start=start, rows=rows, prefix=prefix,
                                 ctx=ctx), readout.tokens)

    return jax.vmap(one)(ivs)


_variants_jit = jit(_variants_from, static_argnames=("graphdef",))


def _restart_points(graphdef, params, batch: Batch, base) -> tuple[jax.Array, jax.Array]:
    """The clean run under `base`, as the residual that enters each LM layer before that layer's
    own taps: `stack` [B, L + 1, T, D], stack[:, l] entering layer l (l = 0: the embeddings)
    and stack[:, L] the last layer's output (the input of the final norm); and the run's
    attention mask `allowed` [B, T, T] (which positions a change can spread to).

    The cached lm.resid_pre would not do: it is recorded after the layer's resid_pre
    interventions, which a restart at that layer runs again (twice for add and amplify)."""
    module = nnx.merge(graphdef, params)
    taps = Taps(base, cache=(sites.LM_RESID_POST,))
    embeddings = module.embed_inputs(batch, taps)
    ctx = module.lm_context(batch)
    run_layers(module.layers, embeddings, ctx, taps)
    return jnp.concatenate([embeddings[:, None], taps.collected[sites.LM_RESID_POST]], 1), ctx.allowed


_restart_points_jit = jit(_restart_points, static_argnames=("graphdef",))


def _num_variants(interventions: Sequence[Intervention]) -> tuple[int, ...]:
    shape = np.shape(interventions[0].layer)
    for iv in interventions:
        for leaf in jax.tree.leaves(iv):
            if np.ndim(leaf) and np.shape(leaf)[:len(shape)] != shape:
                raise ValueError(f"every array of a sweep's interventions needs the leading variant "
                                 f"shape {shape}; {iv.site}/{iv.op} has a leaf of shape {np.shape(leaf)}")
    return shape


def start_layers(interventions: Sequence[Intervention], shape: tuple[int, ...], num_layers: int) -> np.ndarray:
    """First LM layer (0..L-1) each variant of a sweep of variant shape S patches at a per-layer LM
    site ([prod(S)] int); L where it patches none (only lm.final or vision sites, or a layer no
    layer has, such as the slot sweeps' "nowhere" = L). A scalar layer is shared by every variant."""
    n = int(math.prod(shape))
    start = np.full((n,), num_layers, np.int64)
    for iv in interventions:
        if iv.site in sites.PER_LAYER_SITES and iv.site.startswith("lm."):
            layer = np.broadcast_to(iv.layer, shape).reshape(n)
            start = np.minimum(start, np.where((layer >= 0) & (layer < num_layers), layer, num_layers))
    return start


ROW_QUANTUM = 8  # computed rows: a power of two up to this, then a multiple of it


def _row_bucket(rows: np.ndarray, T: int, quantum: int = ROW_QUANTUM) -> np.ndarray:
    """How many positions a variant computes for `rows` [n] it needs: the next power of two up
    to `quantum`, above it the next multiple of `quantum`, at most T. A last-token patch keeps
    one row; a region swap wastes at most quantum - 1; the distinct compiled shapes stay at most
    log2(quantum) + T / quantum, so a new mask seldom compiles a new one."""
    pow2 = 1 << np.ceil(np.log2(np.maximum(rows, 1))).astype(np.int64)
    return np.minimum(T, np.where(rows <= quantum, pow2, -(-rows // quantum) * quantum))


def _unchanged_prefixes(variants, readout: Readout, allowed: np.ndarray, n: int,
                        quantum: int = ROW_QUANTUM) -> np.ndarray:
    """P [n]: how many leading positions variant i changes in no row, so that it computes only
    positions P..T-1 (T - P bucketed by `_row_bucket`). A change spreads only to the queries
    that may attend a changed key (allowed [B, T, T]: causal, and both ways within a Gemma 3
    image), layer after layer; the positions before the first it can reach keep their clean
    values. Every position from a variant's first changed one on counts as changed, which can
    only make P smaller. variants: the sweep's interventions, leaves [*S, ...], prod(S) = n."""
    B, T = allowed.shape[:2]
    first = np.full((n, B), T, np.int64)
    for iv in variants:
        if iv.site in sites.ONCE_SITES:  # lm.final acts after every layer
            continue
        if iv.index is None:
            return np.zeros((n,), np.int64)
        hit = (np.asarray(iv.index) >= 0).reshape(n, B, T)
        first = np.minimum(first, np.where(hit.any(-1), hit.argmax(-1), T))
    # reach[b, f]: the first query of row b that may attend a key at f or later (T: none)
    sees_suffix = np.flip(np.logical_or.accumulate(np.flip(allowed, -1), axis=-1), -1)  # [B, q, f]
    sees_suffix = np.concatenate([sees_suffix, np.zeros((B, T, 1), bool)], -1)
    reach = np.where(sees_suffix.any(1), sees_suffix.argmax(1), T)  # [B, T + 1]
    while True:
        spread = np.minimum(first, reach[np.arange(B)[None], first])
        if (spread == first).all():
            break
        first = spread
    first = np.minimum(first.min(1), int(np.min(readout.position)))  # read positions are always computed
    return T - _row_bucket(T - first, T, quantum)


def variant_bytes(model: Model, batch: Batch, variants, n: int) -> int:
    """Rough bytes one variant of a chunk needs: its activations, plus its own slice of every
    intervention array (a chunk gathers one slice per variant, shared sources included).
    variants: the sweep's interventions, every leaf [*S, ...] with prod(S) = n (views are fine)."""
    cfg = model.config
    B, T = np.shape(batch.input_ids)
    width = max(4 * cfg.hidden_size, 2 * cfg.intermediate_size, cfg.num_heads * T)
    return 4 * B * T * width * 3 + sum(a.nbytes for a in jax.tree.leaves(variants)) // n


def default_memory_budget(device: jax.Device | None = None) -> float:
    """Bytes a sweep's chunks may take by default: on GPU/TPU 80% of what the device has free
    now (its memory_stats bytes_limit - bytes_in_use, the params already counted as in use); on
    CPU, or where the backend does not say, CPU_MEMORY_BUDGET."""
    device = device or jax.local_devices()[0]
    if device.platform != "cpu":
        try:
            stats = device.memory_stats() or {}
        except Exception:  # some backends raise instead of returning None
            stats = {}
        if "bytes_limit" in stats:
            return FREE_MEMORY_FRACTION * max(0, stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    return CPU_MEMORY_BUDGET


CPU_MEMORY_BUDGET = 2e9
FREE_MEMORY_FRACTION = 0.8


def _chunk_size(model: Model, batch: Batch, variants, n: int, memory_budget_bytes: float) -> int:
    """Variants per compiled call within the budget (at least 1, at most 256)."""
    return int(max(1, min(256, memory_budget_bytes // variant_bytes(model, batch, variants, n))))


def call_size(n: int, chunk: int, mesh) -> int:
    """Variants one compiled call runs for n real ones (n <= chunk): the next power of two, at
    most the chunk, and a multiple of the mesh's data axis. A start-layer group smaller than the
    chunk is not padded up to it, while the number of distinct compiled sizes stays at most
    log2(chunk) + 1 (a sweep's groups differ in size, e.g. the last slot of a region swap)."""
    size = min(chunk, 1 << (n - 1).bit_length())
    if mesh is None:
        return size
    n_data = parallel.axis_size(mesh, parallel.DATA)
    return -(-size // n_data) * n_data


def _on_mesh(model: Model, mesh: jax.sharding.Mesh) -> Model:
    """The model with its params placed on `mesh` by the family's sharding rules."""
    pure = nnx.to_pure_dict(model.params)
    placed = parallel.place_params(pure, parallel.param_shardings(pure, families.get(model.family).sharding_rules, mesh))
    state = jax.tree.map(lambda x: x, model.params)
    nnx.replace_by_pure_dict(state, placed)
    return dataclasses.replace(model, params=state, mesh=mesh)


def prepare(model: Model, batch: Batch, interventions: Sequence[Intervention], readout: Readout,
            base: Sequence[Intervention], mesh: jax.sharding.Mesh | None):
    """What every sweep does with its arguments first: the model on `mesh` (default: its own),
    the batch with defaults, everything checked on the host (one clear error for bad input).
    Returns (model, batch, interventions, base, readout, mesh, S, variants): S the variant shape,
    variants the interventions with every leaf a read-only view [*S, ...] (S = (1,) when the
    sweep has no variant axes; scalars such as a shared alpha broadcast to S), so that a chunk
    gathers only its own variants and a source broadcast over variants is held once, never
    copied n times; readout with int32 arrays."""
    if mesh is None:
        mesh = model.mesh
    elif mesh != model.mesh:
        model = _on_mesh(model, mesh)
    batch = batch.with_defaults()
    validation.check_batch(model, batch)
    interventions, base = validation.intervention_list(interventions), validation.intervention_list(base)
    shape = _num_variants(interventions)
    validation.check_interventions(model.config, np.shape(batch.input_ids), interventions, shape)
    validation.check_interventions(model.config, np.shape(batch.input_ids), base, name="base")
    validation.check_readout(model.config, np.shape(batch.input_ids), readout.position, readout.tokens)
    vshape = shape or (1,)
    variants = [jax.tree.map(lambda a: np.broadcast_to(a, vshape + np.shape(a)[len(shape):]), iv)
                for iv in interventions]
    readout = Readout(np.asarray(readout.position, np.int32), np.asarray(readout.tokens, np.int32))
    return model, batch, interventions, base, readout, mesh, shape, variants


def patch_sweep(model: Model, batch: Batch, interventions: Sequence[Intervention], readout: Readout, *,
                base: Sequence[Intervention] = (), chunk_size: int | None = None,
                memory_budget_bytes: float | None = None, row_quantum: int = ROW_QUANTUM, progress: bool = False,
                mesh: jax.sharding.Mesh | None = None) -> SweepResult:
    """Runs every variant of a sweep and returns what `readout` asks for, shaped [*S, B, ...].

    interventions: applied together in list order within a variant; all of their arrays carry
    the same leading variant shape S (np.broadcast_to makes shared ones free).
    base: interventions without a variant axis that apply in the clean run and in every variant,
    before the variant's own (e.g. an ablation under which the variants swap regions).
    memory_budget_bytes: what the variants of one chunk may take, beside the clean run's
    residual stack that stays on the device(s) for the whole sweep (counted in it, per device
    over `data`); default `default_memory_budget()` (the free device memory on GPU/TPU, 2 GB on
    CPU). chunk_size overrides it.
    row_quantum: the granularity of the positions a variant computes (`_row_bucket`): smaller
    computes fewer rows, larger compiles fewer shapes as masks change (on an accelerator, where a
    compile costs more than some extra rows, raise it; at T and above only powers of two).
    mesh: the variants of each chunk are split over its `data` axis (the chunk size is rounded
    up to a multiple of it) and the params are used as sharded over `model`. Default: the mesh
    the model was loaded on (`sj.load(..., mesh=)`), if any; a different mesh places the params
    on it first with the family's sharding rules.
    """
    model, batch, interventions, base, readout, mesh, shape, variants = prepare(model, batch, interventions, readout,
                                                                                base, mesh)
    n, vshape = int(math.prod(shape)), shape or (1,)
    n_data = 1 if mesh is None else parallel.axis_size(mesh, parallel.DATA)

    if any(iv.site.startswith("vision.") for iv in interventions):
        starts, prefixes = np.zeros((n,), np.int64), np.zeros((n,), np.int64)
        stack = None
    else:
        starts = start_layers(interventions, shape, model.config.num_layers)
        args = (batch, base) if mesh is None else (parallel.shard_batch(batch, mesh), parallel.put_tree(base, mesh))
        # The residual stack stays where it was computed (over `data` with the batch's rows on
        # a mesh); only the [B, T, T] mask comes to the host, for the prefixes.
        stack, allowed = _restart_points_jit(model.graphdef, model.params, *args)
        prefixes = _unchanged_prefixes(variants, readout, parallel.to_host(allowed), n, row_quantum)

    def prefix_of(P: int):
        """The clean residual entering each layer at the unchanged positions, [B, L, P, D]."""
        return stack[:, :-1, :P] if P else None

    # Once per prefix length, shared by its calls; on the device(s) beside the stack.
    placed = {int(P): prefix_of(int(P)) for P in np.unique(prefixes)}
    if chunk_size:
        chunk = chunk_size
    else:
        budget = default_memory_budget() if memory_budget_bytes is None else memory_budget_bytes
        resident = sum(x.nbytes for x in jax.tree.leaves((stack, placed))) // n_data
        chunk = _chunk_size(model, batch, variants, n, budget - resident)
    chunk = -(-chunk // n_data) * n_data

    results = [None] * n
    order = np.lexsort((prefixes, starts))
    keys = np.stack([starts, prefixes], 1)[order]
    groups = np.split(order, np.flatnonzero((keys[1:] != keys[:-1]).any(1)) + 1)
    calls = [(g[i:i + chunk]) for g in groups for i in range(0, len(g), chunk)]
    for idx in tqdm(calls, disable=not progress, desc="sweep", unit="chunk"):
        padded = np.concatenate([idx, np.full((call_size(len(idx), chunk, mesh) - len(idx),), idx[-1])])
        which = np.unravel_index(padded, vshape)
        ivs = tuple(jax.tree.map(lambda a: a[which], iv) for iv in variants)
        s, P = int(starts[idx[0]]), int(prefixes[idx[0]])
        x_start = None if stack is None else stack[:, s, P:]
        args = (batch, x_start, np.int32(s), ivs, readout, base)
        if mesh is not None:  # variants over `data`, the rest replicated, all as global arrays
            args = (parallel.put_tree(batch, mesh), x_start, np.int32(s), parallel.put_tree(ivs, mesh, data_axis=0),
                    parallel.put_tree(readout, mesh), parallel.put_tree(base, mesh))
        args += (placed[P],)
        got = parallel.to_host(_variants_jit(model.graphdef, model.params, *args))
        for j, v in enumerate(idx):
            results[v] = (got[0][j], got[1][j], got[2][j])
    logits, probs, argmax = (np.stack([r[k] for r in results]).reshape(shape + results[0][k].shape)
                             for k in range(3))
    return SweepResult(logits, probs, argmax)
