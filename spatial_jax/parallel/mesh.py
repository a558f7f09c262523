"""Device meshes: two named axes, `data` (intervention variants, batch rows) and `model` (weights).

A mesh is written `data:4,model:2`; `-1` takes the devices left over (`data:-1,model:2`), an
axis not named has size 1, and the empty string picks a default from the devices present: every
device on `data`, unless the parameters do not fit on one device, in which case `model` grows to
the smallest divisor of the device count that fits them.

The axes are always laid out (data, model), model last, so that the devices that share a
weight's shards are neighbours in `jax.make_mesh`'s topology-aware order (same host, fastest
links).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import jax
from jax.sharding import AxisType, Mesh

DATA = "data"
MODEL = "model"
AXES = (DATA, MODEL)

# Fraction of a device's memory the parameters may take; the rest is for activations.
PARAM_MEMORY_FRACTION = 0.5


def parse_mesh_spec(spec: str, n_devices: int) -> dict[str, int]:
    """'data:4,model:2' -> {'data': 4, 'model': 2}; one axis may be -1 (the rest); checks the product."""
    sizes = {DATA: 1, MODEL: 1}
    seen, rest = set(), None
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, value = part.partition(":")
        name = name.strip()
        if not sep or name not in AXES:
            raise ValueError(f"--mesh {spec!r}: each entry is AXIS:SIZE with AXIS one of {AXES}, got {part!r}")
        if name in seen:
            raise ValueError(f"--mesh {spec!r}: axis {name!r} given twice")
        seen.add(name)
        try:
            size = int(value)
        except ValueError:
            raise ValueError(f"--mesh {spec!r}: size of {name!r} is not an integer: {value!r}") from None
        if size == -1:
            if rest is not None:
                raise ValueError(f"--mesh {spec!r}: only one axis may be -1")
            rest = name
        elif size < 1:
            raise ValueError(f"--mesh {spec!r}: size of {name!r} must be >= 1 or -1, got {size}")
        else:
            sizes[name] = size
    fixed = math.prod(sizes[a] for a in AXES if a != rest)
    if rest is not None:
        if n_devices % fixed:
            raise ValueError(f"--mesh {spec!r}: {n_devices} devices do not divide by {fixed}")
        sizes[rest] = n_devices // fixed
    if math.prod(sizes.values()) != n_devices:
        raise ValueError(f"--mesh {spec!r} has {math.prod(sizes.values())} devices, but {n_devices} "
                         f"are present (use -1 for the rest)")
    return sizes


def device_memory_bytes(device: jax.Device) -> Optional[int]:
    """The memory one device can allocate, or None where the backend does not say (CPU)."""
    try:
        stats = device.memory_stats()
    except Exception:  # some backends raise instead of returning None
        return None
    return (stats or {}).get("bytes_limit")


def default_mesh_sizes(n_devices: int, param_bytes: Optional[int] = None,
                       device_bytes: Optional[int] = None,
                       fraction: float = PARAM_MEMORY_FRACTION) -> dict[str, int]:
    """All devices on `data`, unless `param_bytes` exceed `fraction` of one device's memory: then
    `model` is the smallest divisor of `n_devices` whose shards fit (all of them if none does)."""
    model = 1
    if param_bytes and device_bytes:
        budget = fraction * device_bytes
        divisors = [m for m in range(1, n_devices + 1) if n_devices % m == 0]
        model = next((m for m in divisors if param_bytes / m <= budget), n_devices)
    return {DATA: n_devices // model, MODEL: model}


def make_mesh(spec: str = "", devices: Optional[Sequence[jax.Device]] = None,
              param_bytes: Optional[int] = None) -> Mesh:
    """A (data, model) mesh from a `--mesh` string ('' = the default for `param_bytes`).

    The axes are `AxisType.Auto`: shardings are layouts that XLA's partitioner propagates, so
    the model code needs no sharding annotations and results do not depend on the mesh.
    """
    devices = list(devices if devices is not None else jax.devices())
    if spec.strip():
        sizes = parse_mesh_spec(spec, len(devices))
    else:
        sizes = default_mesh_sizes(len(devices), param_bytes, device_memory_bytes(devices[0]))
    return jax.make_mesh((sizes[DATA], sizes[MODEL]), AXES, axis_types=(AxisType.Auto,) * 2, devices=devices)


def single_device_mesh(device: Optional[jax.Device] = None) -> Mesh:
    """A 1 x 1 mesh: the same code path as a sharded run, on one device."""
    return make_mesh("data:1,model:1", devices=[device or jax.devices()[0]])


def axis_size(mesh: Mesh, axis: str) -> int:
    return int(mesh.shape.get(axis, 1))


def describe(mesh: Mesh) -> str:
    """'data:4,model:2 over 8 cpu devices (1 process)': the mesh in --mesh syntax, for logs."""
    kinds = sorted({d.platform for d in mesh.devices.flat})
    return (",".join(f"{a}:{axis_size(mesh, a)}" for a in AXES) + f" over {mesh.devices.size} "
            f"{'/'.join(kinds)} devices ({jax.process_count()} process{'es' if jax.process_count() > 1 else ''})")
