"""Pallas (Triton backend) kernels for the three gather primitives of `iet_jax.kernels.gather`.

All functions work on flattened arrays: H = batch * heads leading, N tokens, K candidates,
d channels; `idx` is int32 with -1 marking an empty slot.

    qk(x, y, idx)[h, i, t]    = x[h, i] . y[h, idx[h, i, t]]                 (0 where idx < 0)
    av(w, y, idx)[h, i]       = sum_t w[h, i, t] * y[h, idx[h, i, t]]        (skips idx < 0)
    scatter(w, x, idx)[h, j]  = sum over (i, t) with idx[h, i, t] = j of w[h, i, t] * x[h, i]

Kernels. One program per (head row h, block of `block_q` queries). A program walks its
queries' candidate lists in chunks of `block_k` slots; for each chunk it loads the slot
indices, gathers the candidate rows of y straight from HBM with integer-array indexing
(`pltriton.load(y_ref.at[rows, cols], mask=...)`), and reduces in registers, so no
(N, K, d) block ever exists. Triton wants power-of-two array sizes: the head dim is padded
to the next power of two and the padding masked; K never appears as an array size (only the
power-of-two chunk does), the last chunk is masked. Inputs may be float32, bfloat16 or
float64; arithmetic is in float32 (float64 for float64 inputs).

Scatter, two ways:
- `scatter` (default): `jax.ref.addupdate` of each (query, slot) contribution into a
  zero-initialised float32 buffer. On GPU this lowers to atomic adds (fast, but the order of
  the adds, hence the last bits, varies from run to run); in interpret mode it is a plain
  sequential add, correct with repeated indices. Empty slots and out-of-range queries add to a
  spare row N, and the buffer's columns are padded to the power of two; both are sliced off.
- `scatter_deterministic`: sort the (key = idx, payload = flat slot i*K + t) pairs of each head
  (stable XLA sort, so equal keys keep slot order), find each key's segment with a
  searchsorted, and reduce with a Pallas kernel in which each program owns `block_j` output rows
  and walks their segments in sorted order, chunk by chunk. No atomics, a fixed summation order:
  the same bits every run. Expected cost on GPU (not measured, issue #7): one sort of H*N*K
  int32 key/value pairs (8 bytes each, a few passes; for IET's first layers 48 * 4096 * 914
  = 180 M pairs, i.e. a few GB of sort traffic) plus a gather pass that reads the same bytes
  as `av` (one key, one slot position, one weight and one x row per pair), so a few times the
  atomic scatter's time; the atomic scatter's own cost is that gather pass plus the atomics.

Interpret mode: every kernel is staged through `jax.lax.platform_dependent`, with
`interpret=True` on CPU and the compiled Triton kernel everywhere else, so the same jitted
function runs interpreted on a CPU and exports for `cuda` (tests do both).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

# Tile sizes. A program holds a (block_q, block_k, padded d) tile of gathered rows in
# registers: 16 * 16 * 64 = 16 K values over 4 warps. To be tuned on a GPU (issue #7).
BLOCK_Q = 16
BLOCK_K = 16
BLOCK_J = 16  # output rows per program of the deterministic scatter
BLOCK_S = 16  # sorted entries per step of the deterministic scatter
NUM_WARPS = 4


def accumulation_dtype(dtype) -> jnp.dtype:
    return jnp.dtype(jnp.float64) if dtype == jnp.float64 else jnp.dtype(jnp.float32)


def _pow2(n: int) -> int:
    return max(1, pl.next_power_of_2(int(n)))


def _compiler_params():
    return pltriton.CompilerParams(num_warps=NUM_WARPS, num_stages=1)


def _staged(make_call):
    """`make_call(interpret)` -> callable; run interpreted on CPU, compiled elsewhere."""

    def run(*args):
        return jax.lax.platform_dependent(
            *args, cpu=make_call(True), default=make_call(False))

    return run


def _load(ref, rows, cols, mask, other):
    shape = mask.shape
    return pltriton.load(
        ref.at[jnp.broadcast_to(rows, shape), jnp.broadcast_to(cols, shape)],
        mask=mask, other=other)


def _store(ref, rows, cols, value, mask):
    shape = mask.shape
    pltriton.store(
        ref.at[jnp.broadcast_to(rows, shape), jnp.broadcast_to(cols, shape)], value, mask=mask)


def _head_spec(*trailing):
    """The whole (trailing) block of one head row; kernels index inside it themselves."""
    return pl.BlockSpec((None, *trailing), lambda h, b: (h,) + (0,) * len(trailing))


def _query_rows(n, block_q):
    rows = pl.program_id(1) * block_q + jax.lax.broadcasted_iota(jnp.int32, (block_q,), 0)
    return rows, rows < n


def _load_queries(ref, rows, row_ok, d, dp, acc):
    """(block_q, dp) rows of `ref`, zero in the padding."""
    cols = jax.lax.broadcasted_iota(jnp.int32, (dp,), 0)
    mask = row_ok[:, None] & (cols < d)[None, :]
    return _load(ref, rows[:, None], cols[None, :], mask, 0).astype(acc)


def _chunk(idx_ref, rows, row_ok, c, k, block_k):
    """Slot numbers, mask and indices (-1 outside) of chunk c of the block's lists."""
    slots = c * block_k + jax.lax.broadcasted_iota(jnp.int32, (block_k,), 0)
    in_range = row_ok[:, None] & (slots < k)[None, :]
    ids = _load(idx_ref, rows[:, None], slots[None, :], in_range, -1)
    return slots, in_range, ids


def _gather_rows(ref, ids, d, dp, acc):
    """(block_q, block_k, dp): ref rows at ids, zero where ids < 0 and in the padding."""
    cols = jax.lax.broadcasted_iota(jnp.int32, (dp,), 0)
    valid = ids >= 0
    mask = valid[:, :, None] & (cols < d)[None, None, :]
    safe = jnp.where(valid, ids, 0)
    return _load(ref, safe[:, :, None], cols[None, None, :], mask, 0).astype(acc)


# ----------------------------------------------------------------------------- qk


def _qk_kernel(x_ref, y_ref, idx_ref, o_ref, *, n, k, d, dp, block_q, block_k, acc):
    rows, row_ok = _query_rows(n, block_q)
    xq = _load_queries(x_ref, rows, row_ok, d, dp, acc)

    def body(c, carry):
        slots, in_range, ids = _chunk(idx_ref, rows, row_ok, c, k, block_k)
        ky = _gather_rows(y_ref, ids, d, dp, acc)
        s = jnp.sum(xq[:, None, :] * ky, axis=-1)  # 0 where ids < 0: the row loaded as 0
        _store(o_ref, rows[:, None], slots[None, :], s.astype(o_ref.dtype), in_range)
        return carry

    jax.lax.fori_loop(0, pl.cdiv(k, block_k), body, 0)


def _qk_call(interpret, x, y, idx, *, block_q, block_k):
    h, n, d = x.shape
    k = idx.shape[-1]
    acc = accumulation_dtype(jnp.promote_types(x.dtype, y.dtype))
    kernel = functools.partial(_qk_kernel, n=n, k=k, d=d, dp=_pow2(d), block_q=block_q,
                               block_k=block_k, acc=acc)
    return pl.pallas_call(
        kernel,
        grid=(h, pl.cdiv(n, block_q)),
        in_specs=[_head_spec(n, d), _head_spec(y.shape[1], d), _head_spec(n, k)],
        out_specs=_head_spec(n, k),
        out_shape=jax.ShapeDtypeStruct((h, n, k), acc),
        compiler_params=_compiler_params(),
        interpret=interpret,
        name="iet_gather_qk",
    )(x, y, idx)


def qk(x, y, idx, *, block_q: int = BLOCK_Q, block_k: int = BLOCK_K):
    """(H, N, d), (H, M, d), (H, N, K) -> (H, N, K) scores, 0 at empty slots."""
    make = lambda interpret: functools.partial(  # noqa: E731
        _qk_call, interpret, block_q=block_q, block_k=block_k)
    return _staged(make)(x, y, idx.astype(jnp.int32))


# ----------------------------------------------------------------------------- av


def _av_kernel(w_ref, y_ref, idx_ref, o_ref, *, n, k, d, dp, block_q, block_k, acc):
    rows, row_ok = _query_rows(n, block_q)

    def body(c, total):
        slots, in_range, ids = _chunk(idx_ref, rows, row_ok, c, k, block_k)
        w = _load(w_ref, rows[:, None], slots[None, :], ids >= 0, 0).astype(acc)
        vy = _gather_rows(y_ref, ids, d, dp, acc)
        return total + jnp.sum(w[:, :, None] * vy, axis=1)

    total = jax.lax.fori_loop(0, pl.cdiv(k, block_k), body, jnp.zeros((block_q, dp), acc))
    cols = jax.lax.broadcasted_iota(jnp.int32, (dp,), 0)
    _store(o_ref, rows[:, None], cols[None, :], total.astype(o_ref.dtype),
           row_ok[:, None] & (cols < d)[None, :])


def _av_call(interpret, w, y, idx, *, block_q, block_k):
    h, n, k = idx.shape
    d = y.shape[-1]
    acc = accumulation_dtype(jnp.promote_types(w.dtype, y.dtype))
    kernel = functools.partial(_av_kernel, n=n, k=k, d=d, dp=_pow2(d), block_q=block_q,
                               block_k=block_k, acc=acc)
    return pl.pallas_call(
        kernel,
        grid=(h, pl.cdiv(n, block_q)),
        in_specs=[_head_spec(n, k), _head_spec(y.shape[1], d), _head_spec(n, k)],
        out_specs=_head_spec(n, d),
        out_shape=jax.ShapeDtypeStruct((h, n, d), acc),
        compiler_params=_compiler_params(),
        interpret=interpret,
        name="iet_gather_av",
    )(w, y, idx)


def av(w, y, idx, *, block_q: int = BLOCK_Q, block_k: int = BLOCK_K):
    """(H, N, K), (H, M, d), (H, N, K) -> (H, N, d) weighted sums of gathered rows."""
    make = lambda interpret: functools.partial(  # noqa: E731
        _av_call, interpret, block_q=block_q, block_k=block_k)
    return _staged(make)(w, y, idx.astype(jnp.int32))


# ----------------------------------------------------------------------------- scatter (atomic)


def _scatter_kernel(w_ref, x_ref, idx_ref, zeros_ref, o_ref, *, n, k, d, dp, block_q, block_k,
                    acc):
    del zeros_ref  # aliased with o_ref: the zero-initialised accumulator
    rows, row_ok = _query_rows(n, block_q)
    xq = _load_queries(x_ref, rows, row_ok, d, dp, acc)

    def body(c, carry):
        slots, _, ids = _chunk(idx_ref, rows, row_ok, c, k, block_k)
        valid = ids >= 0
        w = _load(w_ref, rows[:, None], slots[None, :], valid, 0).astype(acc)
        target = jnp.where(valid, ids, n)  # empty slots go to the spare row n
        contribution = w[:, :, None] * xq[:, None, :]  # (block_q, block_k, dp)
        jax.ref.addupdate(o_ref, (target, slice(None)), contribution)
        return carry

    jax.lax.fori_loop(0, pl.cdiv(k, block_k), body, 0)


def _scatter_call(interpret, w, x, idx, *, block_q, block_k):
    h, n, k = idx.shape
    d = x.shape[-1]
    dp = _pow2(d)
    acc = accumulation_dtype(jnp.promote_types(w.dtype, x.dtype))
    kernel = functools.partial(_scatter_kernel, n=n, k=k, d=d, dp=dp, block_q=block_q,
                               block_k=block_k, acc=acc)
    out = pl.pallas_call(
        kernel,
        grid=(h, pl.cdiv(n, block_q)),
        in_specs=[_head_spec(n, k), _head_spec(n, d), _head_spec(n, k), _head_spec(n + 1, dp)],
        out_specs=_head_spec(n + 1, dp),
        out_shape=jax.ShapeDtypeStruct((h, n + 1, dp), acc),
        input_output_aliases={3: 0},
        compiler_params=_compiler_params(),
        interpret=interpret,
        name="iet_gather_scatter",
    )(w, x, idx, jnp.zeros((h, n + 1, dp), acc))
    return out[:, :n, :d]


def scatter(w, x, idx, *, block_q: int = BLOCK_Q, block_k: int = BLOCK_K):
    """(H, N, K), (H, N, d), (H, N, K) -> (H, N, d): out[j] += w[i, t] x[i] at j = idx[i, t].

    Atomic adds on GPU: correct, not bitwise reproducible run to run.
    """
    make = lambda interpret: functools.partial(  # noqa: E731
        _scatter_call, interpret, block_q=block_q, block_k=block_k)
    return _staged(make)(w, x, idx.astype(jnp.int32))


# ----------------------------------------------------------------------------- scatter (sorted)


def _segments(idx):
    """Per head: keys sorted ascending (stable), their flat slots i*K+t, segment starts (N+1)."""
    h, n, k = idx.shape
    keys = idx.reshape(h, n * k)
    slots = jax.lax.broadcasted_iota(jnp.int32, keys.shape, 1)
    keys, slots = jax.lax.sort((keys, slots), dimension=1, num_keys=1, is_stable=True)
    bounds = jnp.arange(n + 1, dtype=jnp.int32)
    starts = jax.vmap(lambda kk: jnp.searchsorted(kk, bounds, side="left"))(keys)
    return keys, slots, starts.astype(jnp.int32)


def _sorted_kernel(w_ref, x_ref, keys_ref, slots_ref, starts_ref, o_ref, *, n, k, d, dp,
                   block_j, block_s, acc):
    j0 = pl.program_id(1) * block_j
    lo = starts_ref[j0]
    hi = starts_ref[jnp.minimum(j0 + block_j, n)]
    out_rows = j0 + jax.lax.broadcasted_iota(jnp.int32, (block_j,), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (dp,), 0)
    col_ok = cols < d
    zero = jnp.zeros((), jnp.int32)

    def body(c, total):
        pos = lo + c * block_s + jax.lax.broadcasted_iota(jnp.int32, (block_s,), 0)
        ok = pos < hi
        key = pltriton.load(keys_ref.at[pos], mask=ok, other=-1)
        slot = pltriton.load(slots_ref.at[pos], mask=ok, other=0)
        i, t = slot // k, slot % k
        w = pltriton.load(w_ref.at[i, t], mask=ok, other=0).astype(acc)
        xi = _load(x_ref, i[:, None], cols[None, :], ok[:, None] & col_ok[None, :], 0)
        contribution = w[:, None] * xi.astype(acc)  # (block_s, dp)
        mine = key[None, :] == out_rows[:, None]  # (block_j, block_s), fixed order
        picked = jnp.where(mine[:, :, None], contribution[None, :, :], 0)
        return total + jnp.sum(picked, axis=1)

    steps = (hi - lo + block_s - 1) // block_s
    total = jax.lax.fori_loop(zero, steps, body, jnp.zeros((block_j, dp), acc))
    _store(o_ref, out_rows[:, None], cols[None, :], total.astype(o_ref.dtype),
           (out_rows < n)[:, None] & col_ok[None, :])


def _sorted_call(interpret, w, x, keys, slots, starts, *, block_j, block_s):
    h, n, k = w.shape
    d = x.shape[-1]
    acc = accumulation_dtype(jnp.promote_types(w.dtype, x.dtype))
    kernel = functools.partial(_sorted_kernel, n=n, k=k, d=d, dp=_pow2(d), block_j=block_j,
                               block_s=block_s, acc=acc)
    return pl.pallas_call(
        kernel,
        grid=(h, pl.cdiv(n, block_j)),
        in_specs=[_head_spec(n, k), _head_spec(n, d), _head_spec(n * k), _head_spec(n * k),
                  _head_spec(n + 1)],
        out_specs=_head_spec(n, d),
        out_shape=jax.ShapeDtypeStruct((h, n, d), acc),
        compiler_params=_compiler_params(),
        interpret=interpret,
        name="iet_gather_scatter_sorted",
    )(w, x, keys, slots, starts)


def scatter_deterministic(w, x, idx, *, block_j: int = BLOCK_J, block_s: int = BLOCK_S):
    """`scatter` with a fixed summation order (sort by key, reduce each key's segment)."""
    keys, slots, starts = _segments(idx.astype(jnp.int32))
    make = lambda interpret: functools.partial(  # noqa: E731
        _sorted_call, interpret, block_j=block_j, block_s=block_s)
    return _staged(make)(w, x, keys, slots, starts)
