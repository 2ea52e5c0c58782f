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

# On CPU the XLA path walks (batch, head) pairs one at a time and queries in chunks of this
# many, so the gathered [chunk, K, d] block stays in cache: about 4x faster than one big
# gather there, and memory stays bounded. Other backends get one vmapped gather.
_CPU_QUERY_CHUNK = 256


def _accumulation_dtype(dtype) -> jnp.dtype:
    return jnp.float64 if dtype == jnp.float64 else jnp.float32


def _resolve(impl: str) -> str:
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"gather implementation {impl!r} is not one of {IMPLEMENTATIONS}")
    return "xla"


def _per_query(fn, queries, table, idx):
    """fn(query_row, table_rows_gathered_by_idx_row) over flattened (batch*head, N, ...)."""
    def one_head(args):
        qh, th, ih = args
        rows = lambda qi: fn(qi[0], th[qi[1]])  # noqa: E731
        if jax.default_backend() == "cpu":
            return jax.lax.map(rows, (qh, ih), batch_size=_CPU_QUERY_CHUNK)
        return jax.vmap(rows)((qh, ih))

    if jax.default_backend() == "cpu":
        return jax.lax.map(one_head, (queries, table, idx))
    return jax.vmap(one_head)((queries, table, idx))


def gather_qk(q: jax.Array, k: jax.Array, idx: jax.Array, impl: str = "auto") -> jax.Array:
    """scores[..., i, t] = q[..., i, :] . k[..., idx[..., i, t], :]; -inf where idx < 0."""
    _resolve(impl)
    *lead, n, d = q.shape
    kk = idx.shape[-1]
    acc = _accumulation_dtype(q.dtype)

    def row(qi, keys):  # (d,), (K, d)
        return jnp.einsum("d,kd->k", qi, keys, preferred_element_type=acc)

    flat_idx = idx.reshape(-1, n, kk)
    s = _per_query(row, q.reshape(-1, n, d), k.reshape(-1, n, d), jnp.maximum(flat_idx, 0))
    return jnp.where(flat_idx < 0, -jnp.inf, s).reshape(*lead, n, kk)


def gather_av(a: jax.Array, v: jax.Array, idx: jax.Array, impl: str = "auto") -> jax.Array:
    """out[..., i, :] = sum_t a[..., i, t] * v[..., idx[..., i, t], :], skipping idx < 0."""
    _resolve(impl)
    *lead, n, kk = a.shape
    d = v.shape[-1]
    acc = _accumulation_dtype(a.dtype)

    def row(ai, values):  # (K,), (K, d)
        return jnp.einsum("k,kd->d", ai, values.astype(acc), preferred_element_type=acc)

    flat_idx = idx.reshape(-1, n, kk)
    weights = jnp.where(flat_idx < 0, 0, a.reshape(-1, n, kk)).astype(acc)
    out = _per_query(row, weights, v.reshape(-1, n, d), jnp.maximum(flat_idx, 0))
    return out.reshape(*lead, n, d)
