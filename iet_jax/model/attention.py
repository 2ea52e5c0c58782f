"""Individualized Exploratory Attention, as parameter-free functions.

Each (batch, head) carries its own candidate list `idx[N, K]` (token indices, -1 = empty)
and the attention `attn[N, K]` of the last layer. A layer scores q against its list, takes
the softmax, cascades with the previous attention, prunes with `top_k`, aggregates,
and the last layer of some blocks grows the lists by two-hop propagation.

Which of these steps a layer performs depends only on the config, so `build_plan` decides it
once, in Python, and the model code follows the plan.

Step by step, with shapes: docs/attention.md.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from iet_jax.kernels import gather, native
from iet_jax.model import tiled
from iet_jax.model.windows import neighbourhood

CASCADE_EPS = 1e-20
# How the initial-candidate layers compute their scores and aggregation (`initial_attention`):
# "gather" (the candidate lists through `gather_qk`/`gather_av`, the tests' oracle), "tiled"
# (windows as tiled matrix products, `iet_jax.model.tiled`) or "auto": per platform, from
# `INITIAL_AUTO`, chosen when the program is lowered for it (`jax.lax.platform_dependent`).
INITIAL_ATTENTION = ("auto", "gather", "tiled")
INITIAL_AUTO = {"cpu": "tiled", "default": "gather"}


# ----------------------------------------------------------------------------- neighbourhoods


class InitialCandidates(NamedTuple):
    """The lists every token starts from: dense window ++ dilated window (K = r1^2 + r2^2)."""

    idx: np.ndarray  # (N, K) int32
    duplicate: np.ndarray  # (N, r2^2) bool: dilated entries already in the dense window
    interior: np.ndarray  # (N,) bool: tokens that get the relative position bias
    dense: int  # r1^2
    # The windows' geometry, for the tiled products: (H, W, r1, r2, dilation).
    geometry: tuple[int, int, int, int, int]


def initial_candidates(
    height: int, width: int, local_range: int, sparse_range: int, dilation: int
) -> InitialCandidates:
    dense = neighbourhood(height, width, local_range, 1)
    sparse = neighbourhood(height, width, sparse_range, dilation)
    # The dense window is a rectangle, so membership is a range test on coordinates.
    y0, x0 = dense[:, :1] // width, dense[:, :1] % width
    sy, sx = sparse // width, sparse % width
    duplicate = (sy >= y0) & (sy < y0 + local_range) & (sx >= x0) & (sx < x0 + local_range)
    r = local_range // 2
    ty, tx = np.divmod(np.arange(height * width), width)
    interior = (ty >= r) & (ty < height - r) & (tx >= r) & (tx < width - r)
    return InitialCandidates(
        idx=np.concatenate([dense, sparse], axis=1),
        duplicate=duplicate,
        interior=interior,
        dense=local_range * local_range,
        geometry=(height, width, local_range, sparse_range, dilation),
    )


# ----------------------------------------------------------------------------- the plan


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """What one attention layer does; all of it follows from the budgets in the config."""

    block: int
    layer: int
    candidates_in: int  # K of the lists this layer scores
    keep: int  # K after this layer: min(topk_focus, candidates_in)
    on_initial: bool  # scores the initial dense+dilated lists (no list materialised yet)
    cascade: bool
    has_rpb: bool  # owns a relative position bias parameter (official `rpi` rule)
    propagate: tuple[int, int, int] | None  # (k1, k2, k_add) in the block's last layer
    similarity: bool  # feeds SF-FFN (blocks 6 and 7)

    @property
    def prunes(self) -> bool:
        return self.keep < self.candidates_in


def build_plan(
    topk_focus: Sequence[Sequence[int]],
    topk_prop_1: Sequence[int],
    topk_prop_2: Sequence[int],
    topk_prop_3: Sequence[int],
    initial_k: int,
    similarity_blocks: Sequence[int],
) -> list[list[LayerPlan]]:
    """Walk the blocks once and record each layer's steps; refuse budgets that cannot work."""
    blocks = len(topk_focus)
    for name, seq in (("topk_prop_1", topk_prop_1), ("topk_prop_2", topk_prop_2),
                      ("topk_prop_3", topk_prop_3)):
        if len(seq) != blocks:
            raise ValueError(f"{name} has {len(seq)} entries but topk_focus has {blocks} blocks")
    # The first layer of a block cascades when the block before it did not propagate.
    cascading_blocks = {b + 1 for b, add in enumerate(topk_prop_3) if add == 0}
    plan: list[list[LayerPlan]] = []
    k_current, on_initial = initial_k, True
    for b, budgets in enumerate(topk_focus):
        block_plan = []
        for l, budget in enumerate(budgets):
            if budget < 1:
                raise ValueError(f"topk_focus[{b}][{l}] = {budget} must be positive")
            # A budget above the candidates that arrive means "keep all" (official behaviour;
            # the light x2 eval settings rely on it).
            keep = min(budget, k_current)
            last = l == len(budgets) - 1
            propagate = None
            if last and topk_prop_3[b] > 0:
                k1, k2 = topk_prop_1[b], topk_prop_2[b]
                if not (0 < k2 <= k1 <= keep):
                    raise ValueError(
                        f"block {b}: propagation needs 0 < topk_prop_2 ({k2}) <= topk_prop_1 "
                        f"({k1}) <= topk_focus ({keep})"
                    )
                propagate = (k1, k2, topk_prop_3[b])
            block_plan.append(
                LayerPlan(
                    block=b,
                    layer=l,
                    candidates_in=k_current,
                    keep=keep,
                    on_initial=on_initial,
                    cascade=l > 0 or b in cascading_blocks,
                    # Official rule, including Python's wrap-around of budgets[l - 1] at l = 0.
                    has_rpb=budget == initial_k or budgets[l - 1] == initial_k,
                    propagate=propagate,
                    similarity=b in similarity_blocks,
                )
            )
            if keep < k_current:
                on_initial = False
            k_current = keep
            if propagate is not None:
                k_current, on_initial = keep + propagate[2], False
        plan.append(block_plan)
    if plan and plan[0] and plan[0][0].cascade:
        raise ValueError("the first layer of the network has no previous attention to cascade")
    return plan


# ----------------------------------------------------------------------------- one layer


class AttnState(NamedTuple):
    """Carried between layers: candidate lists (None while still the initial ones) and attention."""

    idx: jax.Array | None  # (B, h, N, K) int32
    attn: jax.Array | None  # (B, h, N, K)


def _broadcast_initial(initial: InitialCandidates, batch: int, heads: int) -> jax.Array:
    idx = jnp.asarray(initial.idx)
    return jnp.broadcast_to(idx, (batch, heads) + idx.shape)


def initial_scores(q: jax.Array, k: jax.Array, initial: InitialCandidates, mode: str,
                    impl: str, deterministic: bool) -> jax.Array:
    """Raw scores (B, h, N, K) of q against the initial lists (no bias, no masks)."""
    if mode == "auto":
        return _per_platform(initial_scores, q, k, initial=initial, impl=impl,
                             deterministic=deterministic)
    if mode == "tiled":
        height, width, r1, r2, dilation = initial.geometry
        dense = tiled.window_scores(q, k, height, width, r1)
        sparse = tiled.window_scores(q, k, height, width, r2, dilation)
        return jnp.concatenate([dense, sparse], axis=-1)
    b, h = q.shape[:2]
    return gather.gather_qk(q, k, _broadcast_initial(initial, b, h), impl, deterministic)


def initial_aggregate(a: jax.Array, v: jax.Array, initial: InitialCandidates, mode: str,
                       impl: str, deterministic: bool) -> jax.Array:
    """(B, h, N, d): a (B, h, N, K) over the initial lists times their values."""
    if mode == "auto":
        return _per_platform(initial_aggregate, a, v, initial=initial, impl=impl,
                             deterministic=deterministic)
    if mode == "tiled":
        height, width, r1, r2, dilation = initial.geometry
        dense = tiled.window_aggregate(a[..., : initial.dense], v, height, width, r1)
        sparse = tiled.window_aggregate(a[..., initial.dense :], v, height, width, r2, dilation)
        return dense + sparse
    b, h = a.shape[:2]
    return gather.gather_av(a, v, _broadcast_initial(initial, b, h), impl, deterministic)


def _per_platform(fn, x: jax.Array, y: jax.Array, **static) -> jax.Array:
    """fn(x, y, mode=INITIAL_AUTO[platform], **static) for the platform being lowered for."""
    modes = {platform: functools.partial(fn, mode=mode, **static)
             for platform, mode in INITIAL_AUTO.items()}
    if len(set(INITIAL_AUTO.values())) == 1:
        return modes["default"](x, y)
    return jax.lax.platform_dependent(x, y, **modes)


def check_initial_attention(mode: str) -> None:
    """Refuse an unknown `initial_attention` with a one-line message."""
    if mode not in INITIAL_ATTENTION:
        raise ValueError(f"initial_attention must be one of {INITIAL_ATTENTION}, got {mode!r}")


def score(
    q: jax.Array,
    k: jax.Array,
    state: AttnState,
    plan: LayerPlan,
    initial: InitialCandidates,
    rpb: jax.Array | None,
    impl: str,
    deterministic: bool = False,
    initial_attention: str = "gather",
) -> jax.Array:
    """Raw scores (B, h, N, K) of pre-scaled q against each token's candidates.

    On the initial lists `initial_attention` picks how they are computed (INITIAL_ATTENTION);
    the bias and the duplicate mask are applied to either the same way.
    """
    if not plan.on_initial:
        return gather.gather_qk(q, k, state.idx, impl, deterministic)
    check_initial_attention(initial_attention)
    s = initial_scores(q, k, initial, initial_attention, impl, deterministic)
    dense, sparse = s[..., : initial.dense], s[..., initial.dense :]
    if rpb is not None:
        biased = dense + rpb.astype(s.dtype)[None, :, None, :]
        dense = jnp.where(jnp.asarray(initial.interior)[:, None], biased, dense)
    sparse = jnp.where(jnp.asarray(initial.duplicate), -jnp.inf, sparse)
    return jnp.concatenate([dense, sparse], axis=-1)


def cascade(a: jax.Array, previous: jax.Array, train: bool) -> jax.Array:
    """Weight this layer's attention by the previous layer's and renormalise each row.

    The official model normalises differently in its two modes, and both are reproduced:
    - training: `(a * prev + eps) / (sum(a * prev) + eps)`;
    - evaluation (its in-place branch adds eps before summing):
      `(a * prev + eps) / (sum(a * prev + eps) + eps)`, a denominator of
      `sum(a * prev) + (K + 1) * eps`.
    They agree unless a row's `sum(a * prev)` is tiny (two consecutive layers attending to
    nearly disjoint candidates), where the difference then reaches top-k and the output.
    """
    a = a * previous
    if train:
        return (a + CASCADE_EPS) / (jnp.sum(a, axis=-1, keepdims=True) + CASCADE_EPS)
    a = a + CASCADE_EPS
    return a / (jnp.sum(a, axis=-1, keepdims=True) + CASCADE_EPS)


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    state: AttnState,
    plan: LayerPlan,
    initial: InitialCandidates,
    rpb: jax.Array | None,
    impl: str,
    deterministic: bool = False,
    train: bool = False,
    initial_attention: str = "gather",
) -> tuple[jax.Array, AttnState]:
    """Score, softmax, cascade, prune, aggregate. q is already scaled by d^-1/2.

    `train` selects the training-mode cascade (see `cascade`). `initial_attention` how the
    initial lists are scored and, when the layer keeps them all, aggregated (`score`).
    Returns (B,h,N,d) and the state.
    """
    s = score(q, k, state, plan, initial, rpb, impl, deterministic, initial_attention)
    a = jax.nn.softmax(s, axis=-1)
    if plan.cascade:
        a = cascade(a, state.attn, train)
    idx = state.idx
    if idx is None and (plan.prunes or plan.propagate is not None):
        idx = _broadcast_initial(initial, q.shape[0], q.shape[1])
    if plan.prunes:
        a, pos = top_k(a, plan.keep)  # ties: lowest list position first
        idx = jnp.take_along_axis(idx, pos, axis=-1)
    if plan.on_initial and not plan.prunes:  # a is still over the initial lists
        out = initial_aggregate(a, v, initial, initial_attention, impl, deterministic)
    else:
        out = gather.gather_av(a, v, idx, impl, deterministic)
    return out, AttnState(idx=idx, attn=a)


# ----------------------------------------------------------------------------- top-k

# Without the native kernels (`iet_jax.kernels.native`), one sort of the whole row is cheaper
# on CPU than `jax.lax.top_k` once k is at least this fraction of the row: XLA's CPU top-k
# keeps a partial order through an indirect comparator, at a cost that grows with k; its sort
# compares integer keys directly. Measured on the 2-core CPU machine, 33750 rows: 914 -> 225
# in 0.44 s against 1.15 s, 225 -> 22 0.088 s against 0.100 s, 125 -> 14 0.044 s against
# 0.053 s; but 914 -> 64 0.43 s against 0.44 s and 225 -> 8 0.085 s against 0.042 s.
SORT_WHEN_KEEPING = 1 / 12


def top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """`jax.lax.top_k(x, k, is_stable=True)` over the last axis: the k largest, descending,
    equal values in position order (the official tie rule); the same values and positions
    on every platform.

    On CPU a float32 x goes to the native kernel where it is built (`native.available`);
    otherwise, when k is a large enough part of the row, to one sort of integer keys
    (`_sorted_top_k`). The CPU branch is chosen when the program is lowered.
    """
    def xla_top_k(x):
        return tuple(jax.lax.top_k(x, k, is_stable=True))

    if x.dtype == jnp.float32 and native.available():
        cpu = functools.partial(_native_top_k, k=k)
    elif k >= SORT_WHEN_KEEPING * x.shape[-1]:
        cpu = functools.partial(_sorted_top_k, k=k)
    else:
        return xla_top_k(x)
    return jax.lax.platform_dependent(x, cpu=cpu, default=xla_top_k)


def _native_top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    position = native.top_k_positions(x, k)
    return jnp.take_along_axis(x, position, axis=-1), position


def _order_preserving_bits(x: jax.Array) -> jax.Array:
    """x's bits as signed integers whose order is the order top_k uses: negative values'
    magnitude bits flipped, so -0.0 sorts below +0.0 and NaNs sit at the ends by sign."""
    bits = jax.lax.bitcast_convert_type(jax.lax.stop_gradient(x),
                                        jnp.dtype(f"int{8 * x.dtype.itemsize}"))
    return jnp.where(bits < 0, bits ^ jnp.iinfo(bits.dtype).max, bits)


def _sorted_top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """top_k by one ascending sort of keys (complemented value, position).

    For 16- and 32-bit values the pair is packed into one integer twice as wide, the value
    in the high half: every key is distinct, the sort moves nothing else, and a 914-long
    float32 row sorts 35% faster than as an int32 key with a position riding along (the
    form float64 values keep). The wide keys exist only inside this function, so a program
    without 64-bit types still gets int32 positions and x's dtype back.
    """
    axis = x.ndim - 1
    descending = ~_order_preserving_bits(x)
    width = 8 * x.dtype.itemsize
    if width <= 32 and x.shape[-1] <= 2**width:
        with jax.enable_x64(True):
            wide = jnp.dtype(f"int{2 * width}")
            keys = (descending.astype(wide) << width) | jax.lax.broadcasted_iota(
                wide, x.shape, axis)
            keys = jax.lax.sort(keys, dimension=axis, is_stable=True)[..., :k]
            position = (keys & (2**width - 1)).astype(jnp.int32)
    else:
        # Positions ride along in int16 where they fit: less to move, a 6% faster sort.
        small = x.shape[-1] <= jnp.iinfo(jnp.int16).max
        position = jax.lax.broadcasted_iota(jnp.int16 if small else jnp.int32, x.shape, axis)
        _, position = jax.lax.sort((descending, position), dimension=axis, num_keys=1,
                                   is_stable=True)
        position = position[..., :k].astype(jnp.int32)
    return jnp.take_along_axis(x, position, axis=-1), position


# ----------------------------------------------------------------------------- propagation


def _per_head_rows(table: jax.Array, rows: jax.Array) -> jax.Array:
    """table (B,h,N,...) indexed along N by rows (B,h,...) -> (B,h,*rows.shape[2:],...)."""
    return jax.vmap(jax.vmap(lambda t, r: t[r]))(table, rows)


def merge_by_index(idx: jax.Array, extra: jax.Array, size: int, tokens: int) -> jax.Array:
    """Union of two lists of token indices in [-1, tokens), de-duplicated, ascending by token
    index, cut to `size`, -1 padded.

    This reproduces the official merge exactly, including that an empty slot (-1) in either
    list survives once, at the front. On CPU it is the native kernel where that is built.
    """
    if not native.available():
        return _xla_merge_by_index(idx, extra, size)
    return jax.lax.platform_dependent(
        idx, extra, cpu=functools.partial(native.merge, size=size, tokens=tokens),
        default=functools.partial(_xla_merge_by_index, size=size))


def _xla_merge_by_index(idx: jax.Array, extra: jax.Array, size: int) -> jax.Array:
    """`merge_by_index` as two XLA sorts: every platform's path, and the native kernel's oracle."""
    merged = jnp.sort(jnp.concatenate([idx, extra], axis=-1), axis=-1)
    first = jnp.concatenate(
        [jnp.ones_like(merged[..., :1], bool), merged[..., 1:] != merged[..., :-1]], axis=-1
    )
    big = jnp.iinfo(merged.dtype).max
    unique = jnp.sort(jnp.where(first, merged, big), axis=-1)
    if unique.shape[-1] < size:
        pad = jnp.full(unique.shape[:-1] + (size - unique.shape[-1],), big, unique.dtype)
        unique = jnp.concatenate([unique, pad], axis=-1)
    unique = unique[..., :size]
    return jnp.where(unique == big, -1, unique)


def merge_by_rank(idx: jax.Array, extra: jax.Array, size: int) -> jax.Array:
    """Union that keeps `idx` in its (score) order, then new entries in hop-rank order.

    Not what the official model does (it cuts by token index); offered as an explicit option.
    Empty slots are dropped and the tail is -1 padded.
    """
    merged = jnp.concatenate([idx, extra], axis=-1)
    length = merged.shape[-1]
    order = jnp.argsort(merged, axis=-1, stable=True)
    grouped = jnp.take_along_axis(merged, order, axis=-1)
    first = jnp.concatenate(
        [jnp.ones_like(grouped[..., :1], bool), grouped[..., 1:] != grouped[..., :-1]], axis=-1
    ) & (grouped >= 0)
    keep = jnp.take_along_axis(first, jnp.argsort(order, axis=-1), axis=-1)
    position = jnp.where(keep, jnp.arange(length), length)
    chosen = jnp.sort(position, axis=-1)
    if length < size:
        chosen = jnp.concatenate(
            [chosen, jnp.full(chosen.shape[:-1] + (size - length,), length, chosen.dtype)], -1
        )
    chosen = chosen[..., :size]
    values = jnp.take_along_axis(merged, jnp.minimum(chosen, length - 1), axis=-1)
    return jnp.where(chosen == length, -1, values)


def propagate(
    idx: jax.Array, attn: jax.Array, k1: int, k2: int, k_add: int, merge: str = "index"
) -> jax.Array:
    """Grow each list with its best neighbours' best neighbours (two hops), no gradient."""
    attn = jax.lax.stop_gradient(attn)
    _, pos = top_k(attn, k1)
    hop1 = jnp.take_along_axis(idx, pos, axis=-1)  # (B,h,N,k1), best first
    hop2 = _per_head_rows(hop1[..., :k2], hop1)  # (B,h,N,k1,k2)
    extra = hop2.reshape(hop2.shape[:-2] + (k1 * k2,))
    size = idx.shape[-1] + k_add
    if merge == "index":
        return merge_by_index(idx, extra, size, tokens=idx.shape[-2])
    if merge == "rank":
        return merge_by_rank(idx, extra, size)
    raise ValueError(f"merge must be 'index' (official) or 'rank', got {merge!r}")


def similar_tokens(idx: jax.Array, attn: jax.Array) -> jax.Array:
    """(B,h,N): each token's most attended candidate other than itself (for SF-FFN)."""
    _, pos = top_k(attn, 2)
    best = jnp.take_along_axis(idx, pos, axis=-1)
    self_index = jnp.arange(idx.shape[2], dtype=idx.dtype)
    return jnp.where(best[..., 0] == self_index, best[..., 1], best[..., 0])


def gather_tokens(x: jax.Array, rows: jax.Array) -> jax.Array:
    """x (B,h,N,d) gathered along N by rows (B,h,N) -> (B,h,N,d)."""
    return _per_head_rows(x, rows)
