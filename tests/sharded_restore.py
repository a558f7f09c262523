"""A watched restore of a converted checkpoint into a mesh, shared by every family's parallel tests.

    import sharded_restore
    model = sharded_restore.load_shard_by_shard(converted_dir, mesh, monkeypatch)

`load_shard_by_shard` runs `sj.load(path, mesh=mesh)` while recording every `jax.device_put` and
every host gather of a sharded array, then checks that Orbax put only shard-sized host buffers on
devices (exactly one per parameter and device), that no put had the full shape of a model-sharded
weight, that nothing was gathered to the host, and that the only arrays the restore left alive
are the parameters, each made of shards. It returns the model for further checks.
"""
from __future__ import annotations

import collections
import gc

import jax
import numpy as np
from flax import nnx
from jax._src import array as jax_array
from jax.experimental import multihost_utils

import spatial_jax as sj
from spatial_jax.tree_paths import flatten_paths


def load_shard_by_shard(path: str, mesh, monkeypatch) -> sj.Model:
    puts, gathers = [], []
    real_put = jax.device_put
    real_value = jax_array.ArrayImpl._value

    def spy_put(x, *args, **kwargs):
        puts.append(tuple(np.shape(x)))
        return real_put(x, *args, **kwargs)

    def spy_value(self):
        if not self.is_fully_replicated:
            gathers.append(self.shape)
        return real_value.fget(self)

    def no_gather(*args, **kwargs):
        raise AssertionError("a full-array host gather during restore")

    monkeypatch.setattr(jax, "device_put", spy_put)
    monkeypatch.setattr(jax_array.ArrayImpl, "_value", property(spy_value))
    monkeypatch.setattr(jax, "device_get", no_gather)
    monkeypatch.setattr(multihost_utils, "process_allgather", no_gather)
    gc.collect()
    before = {id(a) for a in jax.live_arrays()}
    model = sj.load(path, mesh=mesh)
    monkeypatch.undo()
    gc.collect()

    flat = flatten_paths(nnx.to_pure_dict(model.params))
    expected = collections.Counter()
    sharded_full_shapes = set()
    for x in flat.values():
        shard_shape = tuple(x.sharding.shard_shape(x.shape))
        expected[shard_shape] += len(x.sharding.device_set)  # one put per device
        if shard_shape != tuple(x.shape):
            sharded_full_shapes.add(tuple(x.shape))
    # Full shapes of sharded weights that no legitimate put has (a q-kernel shard can have the
    # full shape of a narrower k kernel): a put of one of these is a full copy on a device.
    watched = sharded_full_shapes - set(expected)
    assert watched, "no model-sharded weight to watch: the check below would mean nothing"
    assert collections.Counter(puts) == expected
    assert not watched & set(puts), "a full-size copy of a model-sharded weight was put on a device"
    assert gathers == []
    new = [a for a in jax.live_arrays() if id(a) not in before]
    assert {id(a) for a in new} == {id(x) for x in flat.values()}
    for a in new:
        for shard in a.addressable_shards:
            assert shard.data.shape == a.sharding.shard_shape(a.shape)
    return model
