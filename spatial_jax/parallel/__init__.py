"""Device meshes and sharding: weights over `model`, activations and sweep variants over `data`.

    from spatial_jax import parallel
    mesh = parallel.setup("data:4,model:2")       # [distributed=True] (binaries: --mesh, --distributed)
    model = sj.load(ckpt_dir, mesh=mesh)          # restored straight into the rule shardings
    sj.patch_sweep(model, batch, ivs, readout)    # each chunk's variants split over `data`
    logits = parallel.to_host(sj.forward(model, batch).logits)   # gathers across hosts if needed

Rules: each family's (path regex -> PartitionSpec) table, `Family.sharding_rules` (`GENERIC_RULES`
for a family without one). The same code runs on one CPU (a 1 x 1 mesh or no mesh at all), on simulated CPU
devices (XLA_FLAGS=--xla_force_host_platform_device_count=8) and on GPU/TPU slices.
"""
from spatial_jax.parallel.setup import initialize_distributed, setup
from spatial_jax.parallel.mesh import (AXES, DATA, MODEL, axis_size, default_mesh_sizes, describe, make_mesh,
                                       parse_mesh_spec, single_device_mesh)
from spatial_jax.parallel.placement import (init_params, place_param, place_params, put, put_data, put_tree, shard_batch,
                                            to_host)
from spatial_jax.parallel.rules import GENERIC_RULES, param_shardings, param_specs, spec_for, unmatched

__all__ = ["AXES", "DATA", "MODEL", "axis_size", "default_mesh_sizes", "describe", "make_mesh",
           "parse_mesh_spec", "single_device_mesh", "init_params", "place_param", "place_params", "put", "put_data",
           "put_tree", "shard_batch", "to_host", "GENERIC_RULES", "param_shardings", "param_specs", "spec_for",
           "unmatched", "initialize_distributed", "setup"]
