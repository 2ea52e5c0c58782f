"""The plain-XLA reference of the three gather primitives: the CPU/TPU path and the test oracle.

Shapes are flattened: H = batch * heads leading, N tokens, K candidates, d channels; `idx` is
int32 with -1 marking an empty slot.

    qk(x, y, idx)[h, i, t]    = x[h, i] . y[h, idx[h, i, t]]                 (0 where idx < 0)
    av(w, y, idx)[h, i]       = sum_t w[h, i, t] * y[h, idx[h, i, t]]        (skips idx < 0)
    scatter(w, x, idx)[h, j]  = sum over (i, t) with idx[h, i, t] = j of w[h, i, t] * x[h, i]

`take_along_axis`-style row gathers and einsums, nothing else: the equivalent JAX code of the
Pallas kernels (`iet_jax.kernels.pallas_gather`), which the tests compare them with. Results
come out in the accumulation dtype (`accumulation_dtype`). All three walk chunks of queries
sized for the backend (`plan`), so their memory is bounded on every backend.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

# How the XLA path bounds its memory: it walks groups of (batch x head) rows and, within
# them, chunks of queries, so only one gathered (heads, chunk, K, d) block exists at a time.
# `plan` picks the two sizes for the backend the program is compiled for.
#
# On CPU: one (batch x head) row at a time, queries in chunks whose [chunk, K, d] block is
# about this many bytes, so it stays in cache: measured on the 2-core CI machine, 2-3x faster
# than 256-query chunks at K = 914 (which were already faster than one big gather).
_CPU_BLOCK_BYTES = 4 << 20
_CPU_MAX_CHUNK = 256
# Elsewhere (TPU, GPU): every (batch x head) row at once and as many queries as keep the block
# under this many bytes (all N when they fit): thousands of gathered rows per step keep an
# accelerator busy, and one layer's gather_qk + gather_av forward and backward at IET's
# largest lists (B*h = 6, N = 3136, K = 914, d = 40, float32) compiles to 0.38 GiB of
# temporaries, as on CPU (5.4 GiB as one gather; 0.42 GiB with 128 MiB blocks).
_DEVICE_BLOCK_BYTES = 64 << 20

# What `plan` plans for: None, or (backend, block bytes off CPU) from `planned_for`. A jit
# cache key, so a function traced under `planned_for("tpu")` is traced again outside it.
_planned = jax.make_user_context(None)


def accumulation_dtype(dtype) -> jnp.dtype:
    """float64 stays float64; everything else (float32, bfloat16) accumulates in float32."""
    return jnp.dtype(jnp.float64) if dtype == jnp.float64 else jnp.dtype(jnp.float32)


def planned_for(backend: str, block_bytes: int | None = None):
    """Context manager: trace the primitives with the plan of `backend` ("cpu", "tpu", "gpu").

    For compiling another backend's plan on this machine, as the tests do to read the memory
    the off-CPU plan needs (and, with a small `block_bytes`, to run its chunked walk at small
    shapes; None: `_DEVICE_BLOCK_BYTES`). Outside it the primitives plan for
    `jax.default_backend()`.
    """
    return _planned((backend, block_bytes))


def _floor_pow2(x: float) -> int:
    return 2 ** max(0, math.floor(math.log2(max(x, 1))))


def plan(h: int, n: int, kk: int, d: int, dtype, backend: str | None = None,
         block_bytes: int | None = None) -> tuple[int, int]:
    """(rows, queries): how many (batch x head) rows and queries one step gathers for.

    For H = h rows of N = n queries with K = kk candidates of d channels in `dtype`'s
    accumulation dtype. A step's gathered block is rows * queries * K * d elements. `backend`
    and `block_bytes` (the cap off CPU) default to those of `planned_for`, else to
    `jax.default_backend()` and `_DEVICE_BLOCK_BYTES`.
    """
    planned_backend, planned_bytes = _planned.value or (None, None)
    backend = backend or planned_backend or jax.default_backend()
    block_bytes = block_bytes or planned_bytes or _DEVICE_BLOCK_BYTES
    per_query = kk * d * jnp.dtype(accumulation_dtype(dtype)).itemsize
    if backend == "cpu":
        return 1, min(n, _CPU_MAX_CHUNK, _floor_pow2(_CPU_BLOCK_BYTES / per_query))
    fits = block_bytes // per_query  # query rows per block, over all (batch x head) rows
    if fits >= h * n:
        return h, n
    if fits >= h:
        return h, min(n, _floor_pow2(fits / h))
    return max(1, fits), 1


def _map(fn, xs, batch: int):
    """fn over the leading axis of xs, `batch` at a time (vmapped) and the batches in sequence."""
    if batch >= jax.tree.leaves(xs)[0].shape[0]:
        return jax.vmap(fn)(xs)
    if batch == 1:
        return jax.lax.map(fn, xs)
    return jax.lax.map(fn, xs, batch_size=batch)


def _walk(n: int, chunk: int, body, init):
    """carry = body(carry, start, first_new) over the query chunks [start, start + chunk).

    ceil(n / chunk) chunks in order; the last one is moved back to end at n instead of being
    padded (padding would make XLA constant-fold a padded copy of constant candidate lists,
    seconds per layer), so its queries before `first_new` were in the previous chunk already.
    Slices of the whole arrays, never a reshape into chunks: vmapped over (batch x head) rows,
    a scan over reshaped chunks would transpose every (N, K) operand and result.
    """
    if chunk >= n:
        return body(init, 0, 0)

    def step(s, carry):
        return body(carry, jnp.minimum(s * chunk, n - chunk), s * chunk)

    return jax.lax.fori_loop(0, -(-n // chunk), step, init)


def _per_query(fn, queries, table, idx):
    """fn(query_row, table_rows_gathered_by_idx_row) over (heads, N, ...), -> (heads, N, ...)."""
    n = idx.shape[1]
    rows, chunk = plan(*idx.shape, table.shape[-1], table.dtype)

    def one_head(args):
        qh, th, ih = args
        per_query = jax.vmap(lambda qi, ii: fn(qi, th[ii]))
        out = jax.eval_shape(per_query, qh[:1], ih[:1])

        def body(out, start, _):
            part = per_query(jax.lax.dynamic_slice_in_dim(qh, start, chunk),
                             jax.lax.dynamic_slice_in_dim(ih, start, chunk))
            return jax.lax.dynamic_update_slice_in_dim(out, part, start, 0)

        return _walk(n, chunk, body, jnp.zeros((n,) + out.shape[1:], out.dtype))

    return _map(one_head, (queries, table, idx), rows)


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

    Queries are added in chunks (`plan`, `_walk`), so only a (rows, chunk, K, d) block exists
    at a time.
    """
    acc = accumulation_dtype(jnp.promote_types(w.dtype, x.dtype))
    n, kk = idx.shape[1:]
    d = x.shape[-1]
    rows, chunk = plan(w.shape[0], n, kk, d, acc)
    # Empty slots point past the end, where mode="drop" discards them.
    idx = jnp.where(idx < 0, n, idx)

    def one_head(args):
        wh, xh, ih = args

        def add_chunk(out, start, first_new):
            wc, xc, ic = (jax.lax.dynamic_slice_in_dim(a, start, chunk) for a in (wh, xh, ih))
            # Queries the previous chunk added already are dropped like empty slots.
            ic = jnp.where((start + jnp.arange(chunk) >= first_new)[:, None], ic, n)
            contribution = wc.astype(acc)[..., None] * xc.astype(acc)[:, None, :]
            return out.at[ic].add(contribution, mode="drop")

        return _walk(n, chunk, add_chunk, jnp.zeros((n, d), acc))

    return _map(one_head, (w, x, idx), rows)
