"""The initial-candidate layers as tiled matrix products (`initial_attention="tiled"`).

While the lists are still the initial ones (block 0 until a layer prunes them), every token
scores its dense r1 x r1 window and its dilated r2 x r2 window. Those are windows, so instead
of gathering K = r1^2 + r2^2 key rows per query, queries are grouped in `tile` x `tile`
blocks and each block is multiplied by the union of the keys its windows touch (for the
dilated window: blocks and unions within one dilation sub-grid, where the windows live).
Each query then reads its own window's scores out of its block's product, in the same
(N, r^2) list layout the gather path produces, so softmax, bias, masks, cascade and top-k
downstream are unchanged. Aggregation runs the other way: the (N, r^2) attention is spread
into per-block (queries x union) matrices, zero outside each query's window, and multiplied
by the union's values.

Window geometry is separable (the window of token (y, x) is rows(y) x columns(x)), so every
index table here is per axis, built once in NumPy, and the 2-D reads and writes are two
`jnp.take`s along H and W: no (N, K) index array exists, neither in memory nor as a constant
in the compiled program.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_TILE = 8
_PRECISION = jax.lax.Precision.HIGHEST  # float32 products in float32 (no TF32 on GPUs)


class AxisTiling(NamedTuple):
    """How one axis of `length` positions splits into query groups and their key unions.

    G groups of `tile` query slots, each with a union of U key positions (its sub-grid's
    positions, consecutive). All int32 NumPy arrays.
    """

    queries: np.ndarray  # (G, tile): position of each query slot (padding slots repeat one)
    keys: np.ndarray  # (G, U): position of each union slot (clamped into the axis)
    read: np.ndarray  # (length, kernel): flat (G, tile, U) index of each window member's score
    spread: np.ndarray  # (G, tile, U): flat (length, kernel + 1) index; kernel = "no member"
    back: np.ndarray  # (length,): flat (G, tile) index of each position's query slot


@functools.lru_cache(maxsize=64)
def axis_tiling(length: int, kernel: int, dilation: int, tile: int) -> AxisTiling:
    """Per-axis tables for windows of `kernel` members on `dilation` interleaved sub-grids."""
    # attention imports this module; the window placement is defined there.
    from iet_jax.model.attention import _window_starts

    starts = (_window_starts(length, kernel, dilation) // dilation)  # in sub-grid steps
    sub_lengths = [len(range(s, length, dilation)) for s in range(dilation)]
    union = min(tile + kernel - 1, max(sub_lengths))
    queries, keys, read = [], [], np.zeros((length, kernel), np.int64)
    spread, back = [], np.zeros(length, np.int64)
    for s in range(dilation):
        grid = np.arange(s, length, dilation)
        for first in range(0, len(grid), tile):
            g = len(queries)
            members = grid[first:first + tile]
            # Windows start at most one step apart, so `union` slots from the first query's
            # window start cover the whole group; moved back where the sub-grid ends.
            u0 = max(0, min(starts[members[0]], sub_lengths[s] - union))
            slots = np.minimum(s + dilation * (u0 + np.arange(union)), length - 1)
            group_spread = np.full((tile, union), kernel, np.int64)  # padding: "no member"
            for m, y in enumerate(members):
                member = starts[y] - u0 + np.arange(kernel)  # union slot of each member
                assert member.min() >= 0 and member.max() < union, (length, kernel, dilation)
                read[y] = (g * tile + m) * union + member
                group_spread[m] = y * (kernel + 1) + kernel
                group_spread[m, member] = y * (kernel + 1) + np.arange(kernel)
                back[y] = g * tile + m
            queries.append(np.resize(members, tile))
            keys.append(slots)
            spread.append(group_spread)
    i32 = lambda a: np.asarray(a, np.int32)  # noqa: E731
    return AxisTiling(i32(queries), i32(keys), i32(read), i32(spread), i32(back))


def _take2(x: jax.Array, rows: np.ndarray, cols: np.ndarray, axis: int) -> jax.Array:
    """x indexed along `axis` by rows and along `axis + 1` by cols (flattened tables)."""
    x = jnp.take(x, jnp.asarray(rows.ravel()), axis=axis)
    return jnp.take(x, jnp.asarray(cols.ravel()), axis=axis + 1)


def _tiles(t: jax.Array, ty: np.ndarray, tx: np.ndarray) -> jax.Array:
    """(B, h, H, W, d) -> (B, h, Gy, Ty, Gx, Tx, d): the rows ty (Gy, Ty) x columns tx."""
    out = _take2(t, ty, tx, 2)
    return out.reshape(out.shape[:2] + ty.shape + tx.shape + out.shape[-1:])


def window_scores(q: jax.Array, k: jax.Array, height: int, width: int, kernel: int,
                  dilation: int = 1, tile: int = DEFAULT_TILE) -> jax.Array:
    """(B, h, N, d) x2 -> (B, h, N, kernel^2): q . k over each token's window, in the member
    order of `attention.neighbourhood`, in the accumulation dtype."""
    b, heads, n, d = q.shape
    ty = axis_tiling(height, kernel, dilation, tile)
    tx = axis_tiling(width, kernel, dilation, tile)
    acc = jnp.float64 if q.dtype == jnp.float64 else jnp.float32
    grid = (b, heads, height, width, d)
    qt = _tiles(q.reshape(grid), ty.queries, tx.queries)  # (B,h,Gy,T,Gx,T,d)
    kt = _tiles(k.reshape(grid), ty.keys, tx.keys)  # (B,h,Gy,U,Gx,V,d)
    s = jnp.einsum("bhymxnd,bhyuxvd->bhymuxnv", qt, kt, precision=_PRECISION,
                   preferred_element_type=acc)
    s = s.reshape(b, heads, ty.spread.size, tx.spread.size)
    s = _take2(s, ty.read, tx.read, 2)  # (B, h, H * kernel, W * kernel)
    s = s.reshape(b, heads, height, kernel, width, kernel).transpose(0, 1, 2, 4, 3, 5)
    return s.reshape(b, heads, n, kernel * kernel)


def window_aggregate(a: jax.Array, v: jax.Array, height: int, width: int, kernel: int,
                     dilation: int = 1, tile: int = DEFAULT_TILE) -> jax.Array:
    """(B, h, N, kernel^2), (B, h, N, d) -> (B, h, N, d): sum of a * v over each token's
    window (the members in `attention.neighbourhood` order), in the accumulation dtype."""
    b, heads, n, d = v.shape
    ty = axis_tiling(height, kernel, dilation, tile)
    tx = axis_tiling(width, kernel, dilation, tile)
    acc = jnp.float64 if jnp.promote_types(a.dtype, v.dtype) == jnp.float64 else jnp.float32
    a = a.astype(acc).reshape(b, heads, height, width, kernel, kernel).transpose(0, 1, 2, 4, 3, 5)
    # A zero after each axis's members: where `spread` points for union slots off the window.
    a = jnp.pad(a, ((0, 0), (0, 0), (0, 0), (0, 1), (0, 0), (0, 1)))
    a = a.reshape(b, heads, height * (kernel + 1), width * (kernel + 1))
    dense = _take2(a, ty.spread, tx.spread, 2).reshape(
        (b, heads) + ty.spread.shape + tx.spread.shape)  # (B,h,Gy,T,U,Gx,T,V)
    vt = _tiles(v.reshape(b, heads, height, width, d), ty.keys, tx.keys)  # (B,h,Gy,U,Gx,V,d)
    out = jnp.einsum("bhymuxnv,bhyuxvd->bhymxnd", dense, vt.astype(acc), precision=_PRECISION,
                     preferred_element_type=acc)
    out = out.reshape(b, heads, ty.queries.size, tx.queries.size, d)
    out = _take2(out, ty.back, tx.back, 2)  # (B, h, H, W, d)
    return out.reshape(b, heads, n, d)
