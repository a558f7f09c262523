"""The scale-out flags of the experiment binaries, and `setup_from_flags()` that turns them into
a mesh (spatial_jax.parallel.setup; the library itself defines no flags).

  --mesh=data:4,model:2     axis sizes (-1 = the rest); empty = default for the model's size
  --distributed             call jax.distributed.initialize() first (multi-host: a TPU pod slice,
                            a SLURM/Open MPI job, or explicit --coordinator_address,
                            --num_processes, --process_id on every host)
"""
from __future__ import annotations

from typing import Optional

from absl import flags
from jax.sharding import Mesh

from spatial_jax import parallel
from spatial_jax.convert.checkpoint import checkpoint_param_bytes

FLAGS = flags.FLAGS
flags.DEFINE_string("mesh", "", "Device mesh, e.g. 'data:4,model:2' or 'data:-1,model:2'. Empty: all "
                    "devices on data, unless the model does not fit on one device.")
flags.DEFINE_bool("distributed", False, "Multi-host: call jax.distributed.initialize() before using JAX.")
flags.DEFINE_string("coordinator_address", None, "With --distributed: host:port of process 0 "
                    "(default: detected from the cluster environment, e.g. TPU pod, SLURM, Open MPI).")
flags.DEFINE_integer("num_processes", None, "With --distributed: number of processes (default: detected).")
flags.DEFINE_integer("process_id", None, "With --distributed: this process's id (default: detected).")


def setup_from_flags(param_bytes: Optional[int] = None, model_path: Optional[str] = None,
                     dtype: Optional[str] = None) -> Mesh:
    """--distributed, then the mesh from --mesh (or the default for `param_bytes`, or for the
    checkpoint at `model_path`). Call it at the top of main(), before anything touches JAX."""
    # Flag values are read through their holders, so this also works where argv was never
    # parsed (a notebook, a test): the defaults or values set in code apply.
    value = lambda name: FLAGS[name].value  # noqa: E731
    if param_bytes is None and model_path and not value("mesh"):
        param_bytes = checkpoint_param_bytes(model_path, dtype)
    return parallel.setup(value("mesh"), distributed=value("distributed"),
                          coordinator_address=value("coordinator_address"), num_processes=value("num_processes"),
                          process_id=value("process_id"), param_bytes=param_bytes)
