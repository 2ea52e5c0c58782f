"""Device mesh and shardings for training.

One mesh over all devices of all processes with axes (data, fsdp). The global batch is split
over both axes (every device gets its own rows), so the batch size must divide by
data * fsdp. Parameters, EMA and optimiser state are either replicated, or with
`param_sharding = "fsdp"` each array is split along its largest dimension that the fsdp axis
divides (arrays with no such dimension, and small ones, stay replicated). XLA inserts the
gathers and reductions this needs inside the jitted train step.
"""

from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from iet_jax.kernels.gather import BATCH_AXES
from iet_jax.training.config import ConfigError

AXES = ("data", "fsdp")
FSDP_MIN_SIZE = 2 ** 10  # arrays with fewer elements stay replicated

_CLUSTER_ENV = ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE",
                "PMI_SIZE", "TPU_WORKER_HOSTNAMES")


def maybe_initialize_distributed(mode: str = "auto") -> bool:
    """Call `jax.distributed.initialize()` when there are several processes.

    "auto": when the environment describes a multi-process job (SLURM, Open MPI, PMI, a
    TPU slice, or JAX_COORDINATOR_ADDRESS); "on": always; "off": never. Must run before any
    other JAX call. Returns whether it initialised.
    """
    if mode not in ("auto", "on", "off"):
        raise ConfigError(f"distributed must be 'auto', 'on' or 'off', got {mode!r}")
    if mode == "off":
        return False
    if mode == "auto":
        sizes = [os.environ.get(k) for k in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")]
        multi = any(s is not None and s.isdigit() and int(s) > 1 for s in sizes)
        multi = multi or bool(os.environ.get("JAX_COORDINATOR_ADDRESS"))
        workers = os.environ.get("TPU_WORKER_HOSTNAMES", "")
        multi = multi or len([w for w in workers.split(",") if w]) > 1
        if not multi:
            return False
    if jax.distributed.is_initialized():
        return False
    jax.distributed.initialize()
    return True


def mesh_shape(mesh_config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int]:
    """(data, fsdp) sizes; one of them may be -1 (the remaining devices)."""
    data, fsdp = int(mesh_config.data), int(mesh_config.fsdp)
    if data == -1 and fsdp == -1:
        raise ConfigError("mesh.data and mesh.fsdp cannot both be -1")
    for name, size in (("mesh.data", data), ("mesh.fsdp", fsdp)):
        if size == 0 or size < -1:
            raise ConfigError(f"{name} must be a positive size or -1, got {size}")
    if data == -1 or fsdp == -1:
        known = fsdp if data == -1 else data
        if num_devices % known:
            name = "mesh.fsdp" if data == -1 else "mesh.data"
            raise ConfigError(f"{name} = {known} does not divide the {num_devices} devices")
        other = num_devices // known
        data, fsdp = (other, fsdp) if data == -1 else (data, other)
    if data * fsdp != num_devices:
        raise ConfigError(
            f"mesh.data x mesh.fsdp = {data} x {fsdp} = {data * fsdp} but there are "
            f"{num_devices} devices; use -1 for one of them")
    return data, fsdp


def make_mesh(mesh_config: ml_collections.ConfigDict, devices=None) -> jax.sharding.Mesh:
    devices = jax.devices() if devices is None else list(devices)
    shape = mesh_shape(mesh_config, len(devices))
    if devices == jax.devices():
        return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * 2)
    return jax.sharding.Mesh(np.asarray(devices).reshape(shape), AXES,
                             axis_types=(AxisType.Auto,) * 2)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def array_spec(shape: tuple[int, ...], fsdp_size: int) -> P:
    """Split the largest dimension divisible by the fsdp axis; replicate otherwise."""
    if fsdp_size <= 1 or int(np.prod(shape, dtype=np.int64)) < FSDP_MIN_SIZE:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[dim] = "fsdp"
            return P(*spec)
    return P()


def state_shardings(tree, mesh: jax.sharding.Mesh, mode: str):
    """NamedShardings for every array leaf of `tree` (arrays or ShapeDtypeStructs)."""
    if mode not in ("replicate", "fsdp"):
        raise ConfigError(f"param_sharding must be 'replicate' or 'fsdp', got {mode!r}")
    fsdp = mesh.shape["fsdp"] if mode == "fsdp" else 1
    return jax.tree.map(lambda x: NamedSharding(mesh, array_spec(tuple(x.shape), fsdp)), tree)


def check_batch(batch_size: int, mesh: jax.sharding.Mesh, grad_accum_steps: int = 1,
                process_count: int = 1) -> None:
    """The global batch must split evenly over devices, micro-batches and processes."""
    devices = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size < 1 or batch_size % (devices * grad_accum_steps):
        raise ConfigError(
            f"batch_size {batch_size} is not divisible by the batch axes of the mesh "
            f"(data {mesh.shape['data']} x fsdp {mesh.shape['fsdp']} = {devices} devices)"
            + (f" times optim.grad_accum_steps {grad_accum_steps}" if grad_accum_steps > 1
               else "") + f"; use a multiple of {devices * grad_accum_steps}")
    if batch_size % process_count:
        raise ConfigError(f"batch_size {batch_size} is not divisible by the {process_count} "
                          "processes")


def global_batch(local: dict, sharding: NamedSharding) -> dict:
    """This process's rows of the global batch -> one global array per key."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local.items()}
