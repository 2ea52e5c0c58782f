"""Device mesh and shardings for training.

One mesh over all devices of all processes with axes (data, fsdp). The global batch is split
over both axes (every device gets its own rows), so the batch size must divide by
data * fsdp. Parameters, EMA and optimiser state are either replicated, or with
`param_sharding = "fsdp"` each array is split along its largest dimension that the fsdp axis
divides (arrays with no such dimension, and small ones, stay replicated). XLA inserts the
gathers and reductions this needs inside the jitted train step.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os

import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from iet_jax.kernels.gather import BATCH_AXES
from iet_jax.training.config import ConfigError

AXES = ("data", "fsdp")
FSDP_MIN_SIZE = 2 ** 10  # arrays with fewer elements stay replicated

# The config fields of `config.distributed` that `jax.distributed.initialize` takes, with the
# environment variable each one defaults to.
DISTRIBUTED_ENV = {
    "coordinator_address": "JAX_COORDINATOR_ADDRESS",
    "num_processes": "JAX_NUM_PROCESSES",
    "process_id": "JAX_PROCESS_ID",
    "local_device_ids": "JAX_LOCAL_DEVICE_IDS",
}
DISTRIBUTED_MODES = ("auto", "on", "off")
MPI4PY_LAUNCHER = "MPI (through mpi4py)"  # MPICH, Intel MPI: JAX reads them with mpi4py


class DistributedInitError(RuntimeError):
    """`jax.distributed.initialize` failed (the coordinator unreachable, a port taken, ...)."""


@dataclasses.dataclass(frozen=True)
class DistributedPlan:
    """How this process joins a multi-process run: the values given (config fields or their
    environment variables; None: not given) and the launcher JAX fills the others from."""

    coordinator_address: str | None
    num_processes: int | None
    process_id: int | None
    local_device_ids: tuple[int, ...] | None
    launcher: str | None  # 'SLURM', 'Open MPI', ... (None: everything is given)
    sources: dict  # field -> where its value came from ('--config.distributed.X' or '$VAR')

    def initialize_kwargs(self) -> dict:
        kwargs = dict(coordinator_address=self.coordinator_address,
                      num_processes=self.num_processes, process_id=self.process_id,
                      local_device_ids=(None if self.local_device_ids is None
                                        else list(self.local_device_ids)))
        if self.launcher == MPI4PY_LAUNCHER:
            kwargs["cluster_detection_method"] = "mpi4py"
        return kwargs

    def describe(self) -> str:
        """'coordinator 10.0.0.1:1234 (from $JAX_COORDINATOR_ADDRESS), process 1 of 2 ...'."""
        parts = [f"{what} {value} (from {self.sources[name]})" for name, what, value in (
            ("coordinator_address", "coordinator", self.coordinator_address),
            ("num_processes", "process count", self.num_processes),
            ("process_id", "process id", self.process_id),
            ("local_device_ids", "local devices",
             None if self.local_device_ids is None else
             ",".join(map(str, self.local_device_ids)))) if value is not None]
        if self.launcher:
            parts.append(f"the rest from {self.launcher}")
        return ", ".join(parts)


def _int_env(environ, name: str) -> int | None:
    value = environ.get(name, "")
    return int(value) if value.strip().lstrip("-").isdigit() else None


def _in_cloud_tpu_vm() -> bool:
    """Whether JAX found a Cloud TPU VM when it was imported (its own flag; False if this JAX
    does not have it)."""
    try:
        from jax._src import cloud_tpu_init
    except ImportError:  # pragma: no cover - another JAX layout
        return False
    return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def detect_launcher(environ=None) -> str | None:
    """The multi-process launcher this process runs under, as JAX's cluster auto-detection
    finds it, or None: SLURM (a step of several tasks: srun), Open MPI (mpirun of several
    ranks), MPICH / Intel MPI (PMI_SIZE > 1; JAX reads them through mpi4py), a Cloud TPU
    pod slice (on a TPU VM, or TPU_WORKER_HOSTNAMES naming several hosts) or a Kubernetes
    indexed Job. `environ` defaults to `os.environ` (then a TPU VM is recognised too)."""
    env = os.environ if environ is None else environ
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
             "SLURM_LOCALID")
    if all(k in env for k in slurm) and (_int_env(env, "SLURM_NTASKS") or 0) > 1:
        return "SLURM"
    if (_int_env(env, "OMPI_COMM_WORLD_SIZE") or 0) > 1:
        return "Open MPI"
    if (_int_env(env, "PMI_SIZE") or 0) > 1:
        return MPI4PY_LAUNCHER
    workers = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
    if len([w for w in workers.split(",") if w.strip()]) > 1 or (
            environ is None and _in_cloud_tpu_vm()):
        return "Cloud TPU"
    if "KUBERNETES_SERVICE_HOST" in env and "JOB_COMPLETION_INDEX" in env:
        return "Kubernetes"
    return None


def _given(distributed, environ) -> tuple[dict, dict]:
    """(values, sources) of the fields set in `distributed` or their environment variables;
    ConfigError naming one that is malformed."""
    values, sources = {}, {}
    unset = {"coordinator_address": "", "num_processes": 0, "process_id": -1,
             "local_device_ids": ""}
    for name, var in DISTRIBUTED_ENV.items():
        value = distributed.get(name, unset[name])
        source = f"--config.distributed.{name}"
        if value in (unset[name], None):
            value, source = environ.get(var, "").strip(), f"${var}"
            if not value:
                continue
        if name == "coordinator_address":
            value = str(value).strip()
            host, _, port = value.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ConfigError(f"distributed.coordinator_address {value!r} (from {source}) "
                                  f"is not HOST:PORT, e.g. 10.0.0.1:1234")
        elif name == "local_device_ids":
            items = value if isinstance(value, (list, tuple)) else str(value).split(",")
            ids = tuple(int(v) for v in map(str, items) if v.strip().isdigit())
            if not ids or len(ids) != len(items):
                raise ConfigError(f"distributed.local_device_ids {value!r} (from {source}) is "
                                  f"not a comma-separated list of device numbers, e.g. 0,1")
            value = ids
        else:
            try:
                value = int(str(value).strip())
            except ValueError:
                raise ConfigError(f"distributed.{name} {value!r} (from {source}) is not an "
                                  f"integer") from None
        values[name], sources[name] = value, source
    return values, sources


def distributed_plan(distributed="auto", environ=None) -> DistributedPlan | None:
    """How this process joins a multi-process run, or None for a single-process run.

    `distributed` is the `config.distributed` group (or just its mode, a string). `mode`
    'auto' joins when a coordinator address, process count or id is given or a launcher is
    detected (`detect_launcher`); 'on' always (refused when nothing says how); 'off' never.
    Each of `coordinator_address`, `num_processes`, `process_id` and `local_device_ids` left
    unset ('', 0, -1, '') takes its environment variable (`DISTRIBUTED_ENV`); what neither
    gives is left to JAX's detection of the launcher. Without a launcher the address, count
    and id must all be given: ConfigError names the missing ones, in one line.
    `environ` defaults to `os.environ`.
    """
    env = os.environ if environ is None else environ
    if isinstance(distributed, str):
        distributed = {"mode": distributed}
    mode = distributed.get("mode", "auto")
    if mode not in DISTRIBUTED_MODES:
        raise ConfigError(f"distributed.mode must be 'auto', 'on' or 'off', got {mode!r}")
    if mode == "off":
        return None
    values, sources = _given(distributed, env)
    launcher = detect_launcher(environ)
    joined = [k for k in ("coordinator_address", "num_processes", "process_id") if k in values]
    if mode == "auto" and not joined and launcher is None:
        return None
    count, pid = values.get("num_processes"), values.get("process_id")
    if count is not None and count < 1:
        raise ConfigError(f"distributed.num_processes must be at least 1, got {count} (from "
                          f"{sources['num_processes']})")
    if pid is not None and (pid < 0 or (count is not None and pid >= count)):
        upper = (f"{count - 1} (distributed.num_processes {count}, from "
                 f"{sources['num_processes']})" if count is not None else "num_processes - 1")
        raise ConfigError(f"distributed.process_id {pid} (from {sources['process_id']}) must be "
                          f"in 0..{upper}")
    if len(joined) == 3:
        launcher = None  # nothing left for JAX to detect (but local devices, see README)
    elif launcher is None:
        missing = [f"distributed.{k} (${DISTRIBUTED_ENV[k]})"
                   for k in ("coordinator_address", "num_processes", "process_id")
                   if k not in values]
        given = " and ".join(f"distributed.{k} {values[k]} (from {sources[k]})" for k in joined)
        several = len(missing) > 1
        raise ConfigError(
            f"multi-process run: {given if joined else 'distributed.mode is on'}"
            f"{' are set' if len(joined) > 1 else ' is set' if joined else ''} "
            f"but {', '.join(missing[:-1]) + ' and ' if several else ''}{missing[-1]} "
            f"{'are' if several else 'is'} not, and no launcher that JAX detects (SLURM, Open "
            f"MPI, a Cloud TPU pod, a Kubernetes Job) supplies {'them' if several else 'it'}; "
            f"pass --config.distributed.FIELD=VALUE or set the variable{'s' if several else ''}")
    needs = {"Kubernetes": ("kubernetes", "a Kubernetes Job: JAX reads its coordinator and "
                            "process count through the kubernetes package (pip install "
                            "'jax[k8s]')"),
             MPI4PY_LAUNCHER: ("mpi4py", f"PMI_SIZE={env.get('PMI_SIZE')}: one of several MPI "
                               "processes (MPICH, Intel MPI), which JAX detects through mpi4py "
                               "(pip install mpi4py)")}
    if launcher in needs and importlib.util.find_spec(needs[launcher][0]) is None:
        raise ConfigError(
            f"{needs[launcher][1]}, which is not installed; install it, or set "
            f"distributed.coordinator_address, num_processes and process_id (or "
            f"$JAX_COORDINATOR_ADDRESS, $JAX_NUM_PROCESSES, $JAX_PROCESS_ID)")
    return DistributedPlan(
        coordinator_address=values.get("coordinator_address"), num_processes=count,
        process_id=pid, local_device_ids=values.get("local_device_ids"), launcher=launcher,
        sources=sources)


def maybe_initialize_distributed(distributed="auto") -> bool:
    """Join a multi-process run (`jax.distributed.initialize`) as `distributed_plan` says.

    Must run before any other JAX computation. Returns whether it initialised (False for a
    single-process run, or when `jax.distributed` is already initialised). ConfigError when
    the plan is incomplete; DistributedInitError (one line) when JAX cannot connect.
    """
    plan = distributed_plan(distributed)
    if plan is None or jax.distributed.is_initialized():
        return False
    try:
        jax.distributed.initialize(**plan.initialize_kwargs())
    except Exception as e:  # noqa: BLE001 - JAX raises several types; all end the run here
        text = " ".join(str(e).split()) or type(e).__name__
        raise DistributedInitError(
            f"jax.distributed.initialize failed ({plan.describe()}): {type(e).__name__}: "
            f"{text}") from e
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
