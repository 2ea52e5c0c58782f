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

Window geometry is separable (the window of token (y, x) is rows(y) x columns(x)), so the
index tables are built per axis in NumPy; the reads and writes between the products and the
list layout are one windowed gather each, driven by a table of start indices per token or
query slot: no (N, K) index array exists, in memory or as a constant of the compiled program.
Both directions are exact (each list entry is one product entry), so the two paths differ
only in summation order.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from iet_jax.model.windows import window_starts

DEFAULT_TILE = 8
_PRECISION = jax.lax.Precision.HIGHEST  # float32 products in float32 (no TF32 on GPUs)


class AxisTiling(NamedTuple):
    """How one axis of `length` positions splits into query groups and their key unions.

    G groups of `tile` query slots, each with a union of U consecutive positions of its
    sub-grid; every window is `kernel` consecutive union slots. All int32 NumPy arrays.
    """

    queries: np.ndarray  # (G, tile): position of each query slot (padding slots repeat one)
    keys: np.ndarray  # (G, U): position of each union slot (clamped into the axis)
    group: np.ndarray  # (length,): each position's group
    slot: np.ndarray  # (length,): its query slot in the group
    offset: np.ndarray  # (length,): the union slot where its window starts


def _tile_size(sub_lengths: list[int], kernel: int, tile: int) -> int:
    """The group size: one group per sub-grid when its union would be the whole sub-grid
    anyway (the products then hold no padding), else `tile` evened out over the sub-grid so
    the last group is not nearly empty."""
    longest = max(sub_lengths)
    if tile + kernel - 1 >= longest:
        return longest
    groups = -(-longest // tile)
    return -(-longest // groups)


@functools.lru_cache(maxsize=64)
def axis_tiling(length: int, kernel: int, dilation: int, tile: int) -> AxisTiling:
    """Per-axis tables for windows of `kernel` members on `dilation` interleaved sub-grids."""
    starts = window_starts(length, kernel, dilation) // dilation  # in sub-grid steps
    sub_lengths = [len(range(s, length, dilation)) for s in range(dilation)]
    tile = _tile_size(sub_lengths, kernel, tile)
    union = min(tile + kernel - 1, max(sub_lengths))
    queries, keys = [], []
    group, slot, offset = (np.zeros(length, np.int32) for _ in range(3))
    for s in range(dilation):
        grid = np.arange(s, length, dilation)
        for first in range(0, len(grid), tile):
            members = grid[first:first + tile]
            # Windows start at most one step apart, so `union` slots from the first query's
            # window start cover the whole group; moved back where the sub-grid ends.
            u0 = max(0, min(starts[members[0]], sub_lengths[s] - union))
            group[members] = len(queries)
            slot[members] = np.arange(len(members))
            offset[members] = starts[members] - u0
            queries.append(np.resize(members, tile))
            keys.append(np.minimum(s + dilation * (u0 + np.arange(union)), length - 1))
    assert offset.min() >= 0 and offset.max() + kernel <= union, (length, kernel, dilation)
    return AxisTiling(np.asarray(queries, np.int32), np.asarray(keys, np.int32), group, slot,
                      offset)


def _starts(ty: AxisTiling, tx: AxisTiling) -> np.ndarray:
    """(N, 6) int32: (gy, gx, slot y, slot x, offset y, offset x) of each token, row-major."""
    h, w = ty.group.size, tx.group.size
    columns = [np.repeat(ty.group, w), np.tile(tx.group, h), np.repeat(ty.slot, w),
               np.tile(tx.slot, h), np.repeat(ty.offset, w), np.tile(tx.offset, h)]
    return np.stack(columns, axis=1).astype(np.int32)


def _tiles(t: jax.Array, ty: np.ndarray, tx: np.ndarray) -> jax.Array:
    """(B, h, H, W, d) -> (B, h, Gy, Gx, Ty, Tx, d): rows ty (Gy, Ty) x columns tx (Gx, Tx)."""
    t = jnp.take(t, jnp.asarray(ty.ravel()), axis=2)
    t = jnp.take(t, jnp.asarray(tx.ravel()), axis=3)
    t = t.reshape(t.shape[:2] + ty.shape + tx.shape + t.shape[-1:])
    return t.transpose(0, 1, 2, 4, 3, 5, 6)


# Every start index is in bounds by construction (`axis_tiling` asserts the windows fit).
_PROMISE = jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS


def _read_windows(s: jax.Array, starts: np.ndarray, kernel: int) -> jax.Array:
    """(B, h, Gy, Gx, Ty, Tx, U, V) tile products -> (B, h, N, kernel, kernel): each token's
    window out of its own row of its group's product."""
    return jax.lax.gather(
        s, jnp.asarray(starts),
        jax.lax.GatherDimensionNumbers(offset_dims=(0, 1, 3, 4), collapsed_slice_dims=(2, 3, 4, 5),
                                       start_index_map=(2, 3, 4, 5, 6, 7)),
        slice_sizes=s.shape[:2] + (1, 1, 1, 1, kernel, kernel), mode=_PROMISE)


def _spread_windows(a: jax.Array, ty: AxisTiling, tx: AxisTiling, kernel: int) -> jax.Array:
    """(B, h, N, kernel, kernel) -> (B, h, Gy, Gx, Ty, Tx, U, V): each token's window placed
    in its row of its group's matrix, zeros elsewhere (what `_read_windows` reads back).

    Every window is padded with zeros to reach any placement, then each row is one slice of
    its token's padded window: a gather, about 3x faster than a scatter into zeros on CPU.
    Padding query slots get their repeated token's row; their results are never read.
    """
    (groups_y, tile_y), union_y = ty.queries.shape, ty.keys.shape[1]
    (groups_x, tile_x), union_x = tx.queries.shape, tx.keys.shape[1]
    pad_y, pad_x = union_y - kernel, union_x - kernel
    a = jnp.pad(a, ((0, 0), (0, 0), (0, 0), (pad_y, pad_y), (pad_x, pad_x)))
    shape = (groups_y, groups_x, tile_y, tile_x)
    token = ty.queries[:, None, :, None] * tx.group.size + tx.queries[None, :, None, :]
    start_y = pad_y - ty.offset[ty.queries][:, None, :, None]
    start_x = pad_x - tx.offset[tx.queries][None, :, None, :]
    starts = np.stack([np.broadcast_to(c, shape).ravel() for c in (token, start_y, start_x)],
                      axis=1).astype(np.int32)
    out = jax.lax.gather(
        a, jnp.asarray(starts),
        jax.lax.GatherDimensionNumbers(offset_dims=(0, 1, 3, 4), collapsed_slice_dims=(2,),
                                       start_index_map=(2, 3, 4)),
        slice_sizes=a.shape[:2] + (1, union_y, union_x), mode=_PROMISE)
    return out.reshape(a.shape[:2] + shape + (union_y, union_x))


def window_scores(q: jax.Array, k: jax.Array, height: int, width: int, kernel: int,
                  dilation: int = 1, tile: int = DEFAULT_TILE) -> jax.Array:
    """(B, h, N, d) x2 -> (B, h, N, kernel^2): q . k over each token's window, in the member
    order of `attention.neighbourhood`, in the accumulation dtype."""
    b, heads, n, d = q.shape
    ty = axis_tiling(height, kernel, dilation, tile)
    tx = axis_tiling(width, kernel, dilation, tile)
    acc = jnp.float64 if q.dtype == jnp.float64 else jnp.float32
    grid = (b, heads, height, width, d)
    qt = _tiles(q.reshape(grid), ty.queries, tx.queries)  # (B,h,Gy,Gx,T,T,d)
    kt = _tiles(k.reshape(grid), ty.keys, tx.keys)  # (B,h,Gy,Gx,U,V,d)
    s = jnp.einsum("bhyxmnd,bhyxuvd->bhyxmnuv", qt, kt, precision=_PRECISION,
                   preferred_element_type=acc)
    s = _read_windows(s, _starts(ty, tx), kernel)
    return s.reshape(b, heads, n, kernel * kernel)


def window_aggregate(a: jax.Array, v: jax.Array, height: int, width: int, kernel: int,
                     dilation: int = 1, tile: int = DEFAULT_TILE) -> jax.Array:
    """(B, h, N, kernel^2), (B, h, N, d) -> (B, h, N, d): sum of a * v over each token's
    window (the members in `attention.neighbourhood` order), in the accumulation dtype."""
    b, heads, n, d = v.shape
    ty = axis_tiling(height, kernel, dilation, tile)
    tx = axis_tiling(width, kernel, dilation, tile)
    acc = jnp.float64 if jnp.promote_types(a.dtype, v.dtype) == jnp.float64 else jnp.float32
    dense = _spread_windows(a.astype(acc).reshape(b, heads, n, kernel, kernel), ty, tx, kernel)
    vt = _tiles(v.reshape(b, heads, height, width, d), ty.keys, tx.keys)  # (B,h,Gy,Gx,U,V,d)
    out = jnp.einsum("bhyxmnuv,bhyxuvd->bhyxmnd", dense, vt.astype(acc), precision=_PRECISION,
                     preferred_element_type=acc)
    # Each token's own row of its group's result.
    out = jax.lax.gather(
        out, jnp.asarray(_starts(ty, tx)[:, :4]),
        jax.lax.GatherDimensionNumbers(offset_dims=(0, 1, 3), collapsed_slice_dims=(2, 3, 4, 5),
                                       start_index_map=(2, 3, 4, 5)),
        slice_sizes=(b, heads, 1, 1, 1, 1, d), mode=_PROMISE)
    return out
