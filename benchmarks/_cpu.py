"""CPU placement for the benchmarks' --single_thread modes."""
from __future__ import annotations

import os


def pin_to_one_core() -> int:
    """Pins every thread of this process (and the threads it starts later) to one CPU, the last
    one it may run on; returns that CPU. XLA's CPU client in jax 0.10 sizes its thread pool from
    the affinity mask and ignores --xla_cpu_multi_thread_eigen=false / intra_op_parallelism_threads=1
    (a 2048^3 matmul still ran at cpu/wall 1.97 with them; pinned: 1.00), so pinning is what makes
    "one core each side" true. Call it before jax runs anything."""
    cpu = max(os.sched_getaffinity(0))
    for tid in os.listdir("/proc/self/task"):
        os.sched_setaffinity(int(tid), {cpu})
    return cpu
