"""Start-up of a (multi-host) run: `setup()` joins the hosts and returns the device mesh.

    from spatial_jax import parallel
    mesh = parallel.setup("data:4,model:2", distributed=True)   # before any other JAX call
    model = sj.load(path, mesh=mesh)                             # sweeps shard themselves

The experiment binaries turn their --mesh / --distributed flags into this call
(experiments/mesh_flags.py); the library itself defines no flags.
"""
from __future__ import annotations

from typing import Optional

import jax
from absl import logging
from jax.sharding import Mesh

from spatial_jax.parallel.mesh import describe, make_mesh


def initialize_distributed(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
                           process_id: Optional[int] = None) -> None:
    """jax.distributed.initialize once (a second call is a no-op); must precede any device use."""
    if jax.distributed.is_initialized():
        return
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
    logging.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())


def setup(mesh_spec: str = "", *, distributed: bool = False, coordinator_address: Optional[str] = None,
          num_processes: Optional[int] = None, process_id: Optional[int] = None,
          param_bytes: Optional[int] = None) -> Mesh:
    """jax.distributed.initialize (if `distributed`), then the mesh of `mesh_spec` ('' = the
    default for `param_bytes`, e.g. `convert.checkpoint.checkpoint_param_bytes(path)`). Call it
    before anything else touches JAX."""
    if distributed:
        initialize_distributed(coordinator_address, num_processes, process_id)
    mesh = make_mesh(mesh_spec or "", param_bytes=param_bytes)
    logging.info("mesh: %s", describe(mesh))
    return mesh
