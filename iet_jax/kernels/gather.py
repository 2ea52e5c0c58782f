"""The two gather steps of IET's attention, behind one dispatch point.

`gather_qk(q, k, idx)` scores each query against its own candidate list and
`gather_av(a, v, idx)` aggregates values over it. Everything else in the attention
(softmax, cascade, top-k, propagation) is plain JAX between these two calls, so a faster
kernel can replace them without touching the model.

Shapes: q, k, v are (..., N, d); idx and a are (..., N, K) with int32 token indices into N,
-1 marking an empty slot (score -inf, no contribution).

Both ops have a hand-written backward (`jax.custom_vjp`) built from three primitives that
every implementation provides:

    qk(x, y, idx)[i, t]   = x[i] . y[idx[i, t]]                  (0 where idx < 0)
    av(w, y, idx)[i]      = sum_t w[i, t] * y[idx[i, t]]         (skips idx < 0)
    scatter(w, x, idx)[j] = sum over (i, t) with idx[i, t] = j of w[i, t] * x[i]

    gather_qk: dq = av(g, k, idx),    dk = scatter(g, q, idx)
    gather_av: da = qk(g, v, idx),    dv = scatter(a, g, idx)

so the backward never differentiates through a gather (autodiff of the XLA gather would keep
the gathered (N, K, d) blocks of every layer alive, tens of GB for one training step).

Implementations (`impl`): "xla" (take_along_axis + einsum in `iet_jax.kernels.reference`:
the TPU path, the CPU's where the native kernels are not built, and the tests' oracle),
"native" (C++ kernels of `iet_jax.kernels.native` for float32 on CPU, the reference for
other dtypes), "pallas" (Triton kernels of `iet_jax.kernels.pallas_gather`; interpreted on a
CPU, which is how the tests run them) and "auto" (pallas on GPU, native on CPU where it is
built, xla elsewhere). `PRIMITIVES` maps each to its three primitives. `deterministic=True`
selects a backward whose scatter sums in a fixed order (same bits every run) instead of
atomic adds; it matters only for pallas on GPU (the CPU scatters are sequential already).

Under a mesh (`jax.set_mesh`) the Pallas primitives run inside `jax.shard_map`, split along
the leading (batch) axis over the mesh axes named in `BATCH_AXES`.

The attention around these two calls is described in docs/attention.md.
"""

from __future__ import annotations

import functools
import math
import warnings

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from iet_jax.kernels import native, pallas_gather, reference

IMPLEMENTATIONS = ("auto", "xla", "native", "pallas")
# Mesh axes the leading (batch) axis of the attention arrays is split over inside
# `jax.shard_map` (those of them that the current mesh has, while their size divides it):
# the same axes the training loop splits the batch over (`iet_jax.training.sharding`).
BATCH_AXES = ("data", "fsdp")


def resolve(impl: str, deterministic: bool = False) -> str:
    """The key in `PRIMITIVES` that `impl` stands for on the current backend."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"gather implementation {impl!r} is not one of {IMPLEMENTATIONS}")
    if impl == "auto":
        if jax.default_backend() == "gpu":
            impl = "pallas"
        else:
            impl = "native" if native.available() else "xla"
    if impl == "native" and not native.available():
        raise ValueError("gather implementation 'native' runs only where JAX's backend is the "
                         "CPU and the native kernels are built (see the warning above, if "
                         "any); use 'auto' or 'xla'")
    if impl == "pallas":
        return "pallas_deterministic" if deterministic else "pallas"
    if deterministic and jax.default_backend() == "gpu":
        warnings.warn("gather_impl='xla' with deterministic=True: XLA's GPU scatter-add uses "
                      "atomics unless XLA_FLAGS has --xla_gpu_deterministic_ops=true; "
                      "gather_impl='pallas' has a deterministic backward", stacklevel=3)
    return impl


# ----------------------------------------------------------------------------- the primitives


def _float32_or_reference(native_fn, reference_fn):
    """native_fn where both operands are float32, else the XLA reference (float64, bfloat16)."""
    def primitive(a, b, idx):
        if a.dtype == jnp.float32 and b.dtype == jnp.float32:
            return native_fn(a, b, idx)
        return reference_fn(a, b, idx)
    return primitive


# (qk, av, scatter) of each implementation, by the key `resolve` returns.
PRIMITIVES = {
    "xla": (reference.qk, reference.av, reference.scatter),
    "native": (_float32_or_reference(native.qk, reference.qk),
               _float32_or_reference(native.av, reference.av),
               _float32_or_reference(native.scatter, reference.scatter)),
    "pallas": (pallas_gather.qk, pallas_gather.av, pallas_gather.scatter),
    "pallas_deterministic": (pallas_gather.qk, pallas_gather.av,
                             pallas_gather.scatter_deterministic),
}
# Every implementation runs per device in a shard_map over the batch axes: a pallas_call must
# sit in one, and the XLA path, left to XLA's partitioner, gathered every (batch x head) row
# onto every device (all-gathers of q, k, v in a data-parallel step: replicated work).
_SHARD_MAPPED = ("xla", "native", "pallas", "pallas_deterministic")


def _batch_spec(impl: str, x: jax.Array) -> PartitionSpec | None:
    """How `_apply` splits its arrays' leading axis over the current mesh (None: no shard_map)."""
    if impl not in _SHARD_MAPPED:
        return None
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.manual_axes:  # no mesh, or already inside a shard_map
        return None
    axes = [a for a in BATCH_AXES if a in mesh.axis_names]
    while axes and (x.ndim < 3 or x.shape[0] % math.prod(mesh.shape[a] for a in axes)):
        axes.pop()
    return PartitionSpec(tuple(axes)) if axes else PartitionSpec()


def _apply(impl: str, which: int, x: jax.Array, y: jax.Array, idx: jax.Array) -> jax.Array:
    """Primitive `which` (0 qk, 1 av, 2 scatter) of `impl` on unflattened (..., N, .) arrays.

    Returns idx.shape[:-1] + (the primitive's last axis,).
    """
    primitive = PRIMITIVES[impl][which]

    def local(x, y, idx):
        out = primitive(_flat(x, x.shape[-1]), _flat(y, y.shape[-1]), _flat(idx, idx.shape[-1]))
        return out.reshape(idx.shape[:-1] + out.shape[-1:])

    spec = _batch_spec(impl, idx)
    if spec is None:
        return local(x, y, idx)
    return jax.shard_map(local, in_specs=(spec, spec, spec), out_specs=spec,
                         check_vma=False)(x, y, idx)


# ----------------------------------------------------------------------------- the ops


def _flat(t, last: int):
    return t.reshape(-1, t.shape[-2], last)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gather_qk(q, k, idx, impl):
    s = _apply(impl, 0, q, k, idx)
    return jnp.where(idx < 0, -jnp.inf, s)


def _gather_qk_fwd(q, k, idx, impl):
    return _gather_qk(q, k, idx, impl), (q, k, idx)


def _gather_qk_bwd(impl, residuals, g):
    q, k, idx = residuals
    g = jnp.where(idx < 0, 0, g)
    dq = _apply(impl, 1, g, k, idx).reshape(q.shape).astype(q.dtype)
    dk = _apply(impl, 2, g, q, idx).reshape(k.shape).astype(k.dtype)
    return dq, dk, None


_gather_qk.defvjp(_gather_qk_fwd, _gather_qk_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gather_av(a, v, idx, impl):
    return _apply(impl, 1, a, v, idx)


def _gather_av_fwd(a, v, idx, impl):
    return _gather_av(a, v, idx, impl), (a, v, idx)


def _gather_av_bwd(impl, residuals, g):
    a, v, idx = residuals
    da = _apply(impl, 0, g, v, idx).reshape(a.shape).astype(a.dtype)
    dv = _apply(impl, 2, a, g, idx).reshape(v.shape).astype(v.dtype)
    return da, dv, None


_gather_av.defvjp(_gather_av_fwd, _gather_av_bwd)


def gather_qk(q: jax.Array, k: jax.Array, idx: jax.Array, impl: str = "auto",
              deterministic: bool = False) -> jax.Array:
    """scores[..., i, t] = q[..., i, :] . k[..., idx[..., i, t], :]; -inf where idx < 0.

    Scores come out in the accumulation dtype (float32 for bfloat16 inputs).
    `deterministic` picks a backward with a fixed summation order (see module docstring).
    """
    return _gather_qk(q, k, idx, resolve(impl, deterministic))


def gather_av(a: jax.Array, v: jax.Array, idx: jax.Array, impl: str = "auto",
              deterministic: bool = False) -> jax.Array:
    """out[..., i, :] = sum_t a[..., i, t] * v[..., idx[..., i, t], :], skipping idx < 0."""
    return _gather_av(a, v, idx, resolve(impl, deterministic))
