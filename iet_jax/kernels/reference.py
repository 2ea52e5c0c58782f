"""The plain-XLA reference of the three gather primitives: the CPU/TPU path and the test oracle.

Shapes are flattened: H = batch * heads leading, N tokens, K candidates, d channels; `idx` is
int32 with -1 marking an empty slot.

    qk(x, y, idx)[h, i, t]    = x[h, i] . y[h, idx[h, i, t]]                 (0 where idx < 0)
    av(w, y, idx)[h, i]       = sum_t w[h, i, t] * y[h, idx[h, i, t]]        (skips idx < 0)
    scatter(w, x, idx)[h, j]  = sum over (i, t) with idx[h, i, t] = j of w[h, i, t] * x[h, i]

`take_along_axis`-style row gathers and einsums, nothing else: the equivalent JAX code of the
Pallas kernels (`iet_jax.kernels.pallas_gather`), which the tests compare them with. Results
come out in the accumulation dtype (`accumulation_dtype`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

# On CPU the XLA path walks (batch, head) pairs one at a time and queries in chunks whose
# gathered [chunk, K, d] block is about this many bytes, so it stays in cache: measured on
# the 2-core CI machine, 2-3x faster than 256-query chunks at K = 914 (which were already
# faster than one big gather), and memory stays bounded. Other backends get one vmapped gather.
_CPU_BLOCK_BYTES = 4 << 20
_CPU_MAX_CHUNK = 256


def accumulation_dtype(dtype) -> jnp.dtype:
    """float64 stays float64; everything else (float32, bfloat16) accumulates in float32."""
    return jnp.dtype(jnp.float64) if dtype == jnp.float64 else jnp.dtype(jnp.float32)


def _on_cpu() -> bool:
    return jax.default_backend() == "cpu"


def _cpu_chunk(kk: int, d: int, dtype) -> int:
    """Queries per chunk on CPU: a power of two whose [chunk, K, d] block is ~_CPU_BLOCK_BYTES."""
    per_query = kk * d * jnp.dtype(accumulation_dtype(dtype)).itemsize
    return int(min(_CPU_MAX_CHUNK, 2 ** max(0, math.floor(math.log2(_CPU_BLOCK_BYTES / per_query)))))


def _per_query(fn, queries, table, idx):
    """fn(query_row, table_rows_gathered_by_idx_row) over (heads, N, ...), -> (heads, N, ...)."""
    chunk = _cpu_chunk(idx.shape[-1], table.shape[-1], table.dtype)

    def one_head(args):
        qh, th, ih = args
        rows = lambda qi: fn(qi[0], th[qi[1]])  # noqa: E731
        if _on_cpu():
            return jax.lax.map(rows, (qh, ih), batch_size=chunk)
        return jax.vmap(rows)((qh, ih))

    if _on_cpu():
        return jax.lax.map(one_head, (queries, table, idx))
    return jax.vmap(one_head)((queries, table, idx))


def qk(x, y, idx):
    """(H, N, d), (H, N, d), (H, N, K) -> (H, N, K) in the accumulation dtype, 0 at idx < 0."""
    acc = accumulation_dtype(x.dtype)

    def row(xi, rows):  # (d,), (K, d)
        return jnp.einsum("d,kd->k", xi, rows, preferred_element_type=acc)

    s = _per_query(row, x, y, jnp.maximum(idx, 0))
    return jnp.where(idx < 0, 0, s)


def av(w, y, idx):
    """(H, N, K), (H, N, d), (H, N, K) -> (H, N, d) in the accumulation dtype."""
    acc = accumulation_dtype(jnp.promote_types(w.dtype, y.dtype))

    def row(wi, rows):  # (K,), (K, d)
        return jnp.einsum("k,kd->d", wi, rows.astype(acc), preferred_element_type=acc)

    weights = jnp.where(idx < 0, 0, w).astype(acc)
    return _per_query(row, weights, y, jnp.maximum(idx, 0))


def scatter(w, x, idx):
    """(H, N, K), (H, N, d), (H, N, K) -> (H, N, d): out[j] += w[i, t] * x[i] at j = idx[i, t].

    On CPU queries are added in chunks so only a (chunk, K, d) block exists at a time; the
    rows left over after whole chunks are added in one more step (padding instead would make
    XLA constant-fold a padded copy of constant candidate lists, seconds per layer).
    """
    acc = accumulation_dtype(jnp.promote_types(w.dtype, x.dtype))
    n, kk = idx.shape[1:]
    d = x.shape[-1]
    chunk = min(_cpu_chunk(kk, d, acc), n) if _on_cpu() else n
    whole = n - n % chunk
    # Empty slots point past the end, where mode="drop" discards them.
    idx = jnp.where(idx < 0, n, idx)

    def add(out, wc, xc, ic):
        contribution = wc.astype(acc)[..., None] * xc.astype(acc)[:, None, :]
        return out.at[ic].add(contribution, mode="drop")

    def one_head(args):
        wh, xh, ih = args

        def add_chunk(out, part):
            return add(out, *part), None

        parts = (wh[:whole].reshape(-1, chunk, kk), xh[:whole].reshape(-1, chunk, d),
                 ih[:whole].reshape(-1, chunk, kk))
        out, _ = jax.lax.scan(add_chunk, jnp.zeros((n, d), acc), parts)
        if whole < n:
            out = add(out, wh[whole:], xh[whole:], ih[whole:])
        return out

    if _on_cpu():
        return jax.lax.map(one_head, (w, x, idx))
    return jax.vmap(one_head)((w, x, idx))
