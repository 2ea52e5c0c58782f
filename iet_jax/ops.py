"""The two gather steps of IET's attention, behind one dispatch point.

`gather_qk(q, k, idx)` scores each query against its own candidate list and
`gather_av(a, v, idx)` aggregates values over it. Everything else in the attention
(softmax, cascade, top-k, propagation) is plain JAX between these two calls, so a faster
kernel (Pallas on GPU, issue #3) can replace them without touching the model.

Shapes: q, k, v are (..., N, d); idx and a are (..., N, K) with int32 token indices into N,
-1 marking an empty slot (score -inf, no contribution).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "xla")

# Elements of the gathered [N, K, d] tensor the XLA path builds at once. lax.map walks the
# (batch, head) pairs in groups that stay under this, which bounds CPU memory.
_GATHER_BUDGET = 1 << 26


def _accumulation_dtype(dtype) -> jnp.dtype:
    return jnp.float64 if dtype == jnp.float64 else jnp.float32


def _resolve(impl: str) -> str:
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"gather implementation {impl!r} is not one of {IMPLEMENTATIONS}")
    return "xla"


def _map_heads(fn, arrays, n: int, k: int, d: int):
    """Apply `fn` to each (N, ...) slice of the flattened leading axes, in bounded groups."""
    batch_size = max(1, _GATHER_BUDGET // max(1, n * k * d))
    return jax.lax.map(fn, arrays, batch_size=batch_size)


def gather_qk(q: jax.Array, k: jax.Array, idx: jax.Array, impl: str = "auto") -> jax.Array:
    """scores[..., i, t] = q[..., i, :] . k[..., idx[..., i, t], :]; -inf where idx < 0."""
    _resolve(impl)
    *lead, n, d = q.shape
    kk = idx.shape[-1]
    acc = _accumulation_dtype(q.dtype)

    def one(args):
        q1, k1, i1 = args
        keys = k1[jnp.maximum(i1, 0)]  # (N, K, d)
        s = jnp.einsum("nd,nkd->nk", q1, keys, preferred_element_type=acc)
        return jnp.where(i1 < 0, -jnp.inf, s)

    flat = (q.reshape(-1, n, d), k.reshape(-1, n, d), idx.reshape(-1, n, kk))
    return _map_heads(one, flat, n, kk, d).reshape(*lead, n, kk)


def gather_av(a: jax.Array, v: jax.Array, idx: jax.Array, impl: str = "auto") -> jax.Array:
    """out[..., i, :] = sum_t a[..., i, t] * v[..., idx[..., i, t], :], skipping idx < 0."""
    _resolve(impl)
    *lead, n, kk = a.shape
    d = v.shape[-1]
    acc = _accumulation_dtype(a.dtype)

    def one(args):
        a1, v1, i1 = args
        values = v1[jnp.maximum(i1, 0)]  # (N, K, d)
        w = jnp.where(i1 < 0, 0, a1).astype(acc)
        return jnp.einsum("nk,nkd->nd", w, values.astype(acc), preferred_element_type=acc)

    flat = (a.reshape(-1, n, kk), v.reshape(-1, n, d), idx.reshape(-1, n, kk))
    return _map_heads(one, flat, n, kk, d).reshape(*lead, n, d)
