"""absl flags for every experiment binary, and `setup_from_flags()` that turns them into a mesh.

    from absl import app
    from spatial_jax import parallel
    import spatial_jax as sj

    def main(argv):
        mesh = parallel.setup_from_flags(model_path=FLAGS.model)   # before any other JAX call
        model = sj.load(FLAGS.model, mesh=mesh)
        ...                                                         # sweeps shard themselves

    app.run(main)

  --mesh=data:4,model:2     axis sizes (-1 = the rest); empty = default for the model's size
  --distributed             call jax.distributed.initialize() first (multi-host: a TPU pod slice,
                            a SLURM/Open MPI job, or explicit --coordinator_address,
                            --num_processes, --process_id on every host)
"""
from __future__ import annotations

from typing import Optional

import jax
from absl import flags, logging
from jax.sharding import Mesh

from spatial_jax.parallel.mesh import describe, make_mesh

FLAGS = flags.FLAGS


def _define(kind, name, default, help_):
    if name not in FLAGS:  # importing twice (or a binary that already has it) is harmless
        getattr(flags, f"DEFINE_{kind}")(name, default, help_)


_define("string", "mesh", "", "Device mesh, e.g. 'data:4,model:2' or 'data:-1,model:2'. Empty: all "
        "devices on data, unless the model does not fit on one device.")
_define("bool", "distributed", False, "Multi-host: call jax.distributed.initialize() before using JAX.")
_define("string", "coordinator_address", None, "With --distributed: host:port of process 0 "
        "(default: detected from the cluster environment, e.g. TPU pod, SLURM, Open MPI).")
_define("integer", "num_processes", None, "With --distributed: number of processes (default: detected).")
_define("integer", "process_id", None, "With --distributed: this process's id (default: detected).")


def initialize_distributed(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
                           process_id: Optional[int] = None) -> None:
    """jax.distributed.initialize once (a second call is a no-op); must precede any device use."""
    from jax._src import distributed
    if distributed.global_state.client is not None:
        return
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
    logging.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())


def checkpoint_param_bytes(path: str, dtype: Optional[str] = None) -> int:
    """Bytes of a checkpoint's parameters (converted or HF dir), from its config alone."""
    import json
    import math
    import os

    from flax import nnx

    from spatial_jax.convert.checkpoint import META_FILE, is_converted
    from spatial_jax.convert.convert import DTYPES, abstract_model, resolve_config

    family, cfg, _ = resolve_config(path)
    if dtype is None:
        dtype = "float32"
        if is_converted(path):
            with open(os.path.join(path, META_FILE)) as f:
                dtype = json.load(f)["dtype"]
    state = nnx.state(abstract_model(family, cfg, DTYPES[dtype]))
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(state))


def setup_from_flags(param_bytes: Optional[int] = None, model_path: Optional[str] = None,
                     dtype: Optional[str] = None) -> Mesh:
    """--distributed, then the mesh from --mesh (or the default for `param_bytes`, or for the
    checkpoint at `model_path`). Call it at the top of main(), before anything touches JAX."""
    # Flag values are read through their holders, so this also works where argv was never
    # parsed (a notebook, a test): the defaults or values set in code apply.
    value = lambda name: FLAGS[name].value  # noqa: E731
    if value("distributed"):
        initialize_distributed(value("coordinator_address"), value("num_processes"), value("process_id"))
    spec = value("mesh") or ""
    if param_bytes is None and model_path and not spec:
        param_bytes = checkpoint_param_bytes(model_path, dtype)
    mesh = make_mesh(spec, param_bytes=param_bytes)
    logging.info("mesh: %s", describe(mesh))
    return mesh
