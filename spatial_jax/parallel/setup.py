"""Start-up of a (multi-host) run: `setup()` joins the hosts and returns the device mesh.

    from spatial_jax import parallel
    mesh = parallel.setup("data:4,model:2", distributed=True)   # before any other JAX call
    model = sj.load(path, mesh=mesh)                             # sweeps shard themselves

The experiment binaries turn their --mesh / --distributed flags into this call
(experiments/mesh_flags.py); the library itself defines no flags.
"""
from __future__ import annotations

import json
import math
import os
from typing import Optional

import jax
from absl import logging
from flax import nnx
from jax.sharding import Mesh

from spatial_jax.convert.checkpoint import META_FILE, is_converted
from spatial_jax.convert.convert import DTYPES, abstract_model, resolve_config
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


def checkpoint_param_bytes(path: str, dtype: Optional[str] = None) -> int:
    """Bytes of a checkpoint's parameters (converted or HF dir), from its config alone."""
    family, cfg, _ = resolve_config(path)
    if dtype is None:
        dtype = "float32"
        if is_converted(path):
            with open(os.path.join(path, META_FILE)) as f:
                dtype = json.load(f)["dtype"]
    state = nnx.state(abstract_model(family, cfg, DTYPES[dtype]))
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(state))


def setup(mesh_spec: str = "", *, distributed: bool = False, coordinator_address: Optional[str] = None,
          num_processes: Optional[int] = None, process_id: Optional[int] = None,
          param_bytes: Optional[int] = None, model_path: Optional[str] = None,
          dtype: Optional[str] = None) -> Mesh:
    """jax.distributed.initialize (if `distributed`), then the mesh of `mesh_spec` ('' = the
    default for `param_bytes`, or for the checkpoint at `model_path`). Call it before anything
    else touches JAX."""
    if distributed:
        initialize_distributed(coordinator_address, num_processes, process_id)
    if param_bytes is None and model_path and not mesh_spec:
        param_bytes = checkpoint_param_bytes(model_path, dtype)
    mesh = make_mesh(mesh_spec or "", param_bytes=param_bytes)
    logging.info("mesh: %s", describe(mesh))
    return mesh
