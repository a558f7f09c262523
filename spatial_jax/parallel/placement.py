"""Putting host data on a mesh and getting results back, the same way on one or many hosts.

Every process of a multi-host run executes the same Python program on the same host inputs
(SPMD), so a global array is built with `jax.make_array_from_callback`: each process copies only
the slices its own devices hold, and nothing is ever gathered onto one device. Results come back
with `to_host`, which all-gathers across processes only when a process does not hold them all.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from spatial_jax.parallel.mesh import DATA, axis_size


def put(x: Any, mesh: Mesh, spec: P = P()) -> jax.Array:
    """A host array (numpy / jax / scalar) -> a global jax.Array with sharding `spec` on `mesh`.

    A jax.Array already sharded that way is returned as is; otherwise only each device's slice
    is copied to it.
    """
    sharding = NamedSharding(mesh, spec)
    if isinstance(x, jax.Array):
        if x.sharding.is_equivalent_to(sharding, x.ndim):
            return x
        if x.is_fully_addressable:
            return jax.device_put(x, sharding)
        raise ValueError(f"cannot re-place a non-addressable array with sharding {x.sharding}")
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def data_spec(shape: tuple[int, ...], mesh: Mesh, axis: int = 0) -> P:
    """P over `data` on dimension `axis` when the data axis divides it, else replicated."""
    n = axis_size(mesh, DATA)
    if n > 1 and len(shape) > axis and shape[axis] % n == 0:
        return P(*([None] * axis), DATA)
    return P()


def put_data(x: Any, mesh: Mesh, axis: int = 0) -> jax.Array:
    """`put` with the leading (or `axis`) dimension over `data` where it divides."""
    return put(x, mesh, data_spec(np.shape(x), mesh, axis))


def put_tree(tree: Any, mesh: Mesh, data_axis: Optional[int] = None) -> Any:
    """Every array leaf of a pytree placed on `mesh`: over `data` on dimension `data_axis`
    where it divides (None: all replicated). None leaves and Python scalars stay as they are."""
    def one(x):
        if not isinstance(x, (np.ndarray, jax.Array)):
            return x  # Python scalars stay weakly typed; jit replicates them
        if data_axis is None or np.ndim(x) <= data_axis:
            return put(x, mesh)
        return put_data(x, mesh, data_axis)
    return jax.tree.map(one, tree)


# Batch fields with one row per example ([B, T]): sharded over `data`. The image fields are
# laid out per image, not per row (Qwen2-VL concatenates all images' patches), so they stay
# replicated; XLA's partitioner still splits the work that follows them.
ROW_FIELDS = ("input_ids", "attention_mask", "token_type_ids")


def shard_batch(batch, mesh: Mesh):
    """A `Batch` on `mesh`: per-row fields over `data` (when it divides B), the rest replicated."""
    changes = {}
    for f in dataclasses.fields(batch):
        v = getattr(batch, f.name)
        if v is None or f.metadata.get("static"):  # static fields (e.g. image_grid_thw) stay on the host
            continue
        changes[f.name] = put_data(v, mesh) if f.name in ROW_FIELDS else put(v, mesh)
    return dataclasses.replace(batch, **changes)


def to_host(x: Any) -> Any:
    """jax.Array (or a pytree of them) -> numpy, all-gathering across processes if needed."""
    def one(a):
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            from jax.experimental import multihost_utils
            return np.asarray(multihost_utils.process_allgather(a, tiled=True))
        return np.asarray(a)
    return jax.tree.map(one, x)


def place_param(x: Any, sharding: jax.sharding.Sharding) -> jax.Array:
    """A host (numpy) or jax array -> a global array with `sharding`; each device gets its shard only."""
    if isinstance(x, jax.Array) and x.is_fully_addressable:
        return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def place_params(params: Mapping, shardings: Mapping) -> dict:
    """Host (numpy) params -> global arrays with the given shardings; each device gets its shard only."""
    return jax.tree.map(place_param, params, shardings)


def init_params(target: Mapping, shardings: Mapping, seed: int = 0, std: float = 0.02) -> dict:
    """Random parameters created directly in their shardings (nothing full-size on any device):
    normal(0, std) for matrices, ones for norm scales, zeros for biases. For benchmarks of
    real-size configs without a checkpoint. target: pure dict of ShapeDtypeStructs."""
    from spatial_jax.tree_paths import flatten_paths, unflatten_paths

    flat_t, flat_s = flatten_paths(target), flatten_paths(shardings)
    out = {}
    key = jax.random.key(seed)
    for i, (path, sds) in enumerate(sorted(flat_t.items())):
        shape, dtype, sharding = tuple(sds.shape), sds.dtype, flat_s[path]
        leaf = path.rsplit("/", 1)[-1]
        if leaf == "scale":
            fn = lambda k: jnp.ones(shape, dtype)  # noqa: E731
        elif leaf == "bias":
            fn = lambda k: jnp.zeros(shape, dtype)  # noqa: E731
        else:
            fn = lambda k: (std * jax.random.normal(k, shape, jnp.float32)).astype(dtype)  # noqa: E731
        out[path] = jax.jit(fn, out_shardings=sharding)(jax.random.fold_in(key, i))
    return unflatten_paths(out)
