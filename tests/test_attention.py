"""Unit tests of the attention's index machinery against independent brute-force oracles."""

import itertools
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iet_jax.kernels import native
from iet_jax.model import attention as A
from iet_jax.model import config as C


def natten_window_start(i: int, length: int, kernel: int, dilation: int) -> int:
    """NATTEN's own window-start rule (its C++ `get_window_start`), transcribed as a formula."""
    ns = kernel // 2
    if dilation <= 1:
        return max(i - ns, 0) + (i + ns >= length) * (length - i - ns - 1)
    if i - ns * dilation < 0:
        return i % dilation
    if i + ns * dilation >= length:
        imodd = i % dilation
        a = (length // dilation) * dilation
        b = length - a
        return length - b + imodd - 2 * ns * dilation if imodd < b else a + imodd - kernel * dilation
    return i - ns * dilation


def nearest_window(i: int, length: int, kernel: int, dilation: int) -> list[int]:
    """Among all runs of `kernel` consecutive members of i's sub-grid that contain i, the one
    whose centre is closest to i (the window 'shifted inward' at borders)."""
    grid = list(range(i % dilation, length, dilation))
    runs = [grid[s:s + kernel] for s in range(len(grid) - kernel + 1)]
    return min((r for r in runs if i in r), key=lambda r: abs(r[kernel // 2] - i))


@pytest.mark.parametrize("h,w,kernel,dilation", [
    (17, 17, 17, 1), (20, 23, 17, 1), (50, 53, 25, 2), (75, 80, 25, 3), (77, 76, 25, 3),
    (11, 9, 3, 3), (30, 31, 5, 4),
])
def test_neighbourhood_matches_natten_and_brute_force(h, w, kernel, dilation):
    idx = A.neighbourhood(h, w, kernel, dilation)
    assert idx.shape == (h * w, kernel * kernel) and idx.dtype == np.int32
    for y, x in itertools.product(range(h), range(w)):
        ys, xs = nearest_window(y, h, kernel, dilation), nearest_window(x, w, kernel, dilation)
        assert ys[0] == natten_window_start(y, h, kernel, dilation)
        assert xs[0] == natten_window_start(x, w, kernel, dilation)
        expected = [yy * w + xx for yy in ys for xx in xs]  # row-major over the window
        np.testing.assert_array_equal(idx[y * w + x], expected)


def test_neighbourhood_refuses_short_axis():
    with pytest.raises(ValueError, match="at least 75 tokens"):
        A.neighbourhood(74, 80, 25, 3)


def test_initial_candidates_duplicates_and_interior():
    h, w = 52, 57
    init = A.initial_candidates(h, w, 17, 25, 2)
    dense, sparse = A.neighbourhood(h, w, 17, 1), A.neighbourhood(h, w, 25, 2)
    np.testing.assert_array_equal(init.idx, np.concatenate([dense, sparse], 1))
    for n in range(h * w):
        np.testing.assert_array_equal(init.duplicate[n], np.isin(sparse[n], dense[n]))
        y, x = divmod(n, w)
        assert init.interior[n] == (8 <= y < h - 8 and 8 <= x < w - 8)
    assert init.duplicate.any() and not init.duplicate.all()


def reference_merge(idx_row, extra_row, size):
    """The official merge on one list: sorted unique values (-1 included), first `size`."""
    values = sorted(set(idx_row.tolist()) | set(extra_row.tolist()))[:size]
    return values + [-1] * (size - len(values))


@pytest.mark.parametrize("merge", ["merge_by_index", "_xla_merge_by_index"])
def test_merge_by_index_deduplicates_and_keeps_one_leading_empty_slot(merge):
    """The CPU's native merge (what `merge_by_index` runs here) and the XLA merge of every
    other platform against the official rule, on rows of more than one thread's share."""
    rng = np.random.default_rng(0)
    idx = rng.integers(-1, 30, (3, 2, 50, 12)).astype(np.int32)
    extra = rng.integers(0, 30, (3, 2, 50, 20)).astype(np.int32)
    idx[0, 0, 0] = -1  # a list that is all empty slots
    idx[0, 0, 1], extra[0, 0, 1] = 7, 7  # a list of one token
    for size in (8, 15, 40):  # 40 > the 32 merged entries: padded with -1
        if merge == "merge_by_index":
            got = A.merge_by_index(jnp.asarray(idx), jnp.asarray(extra), size, tokens=30)
        else:
            got = A._xla_merge_by_index(jnp.asarray(idx), jnp.asarray(extra), size)
        got = np.asarray(got)
        for pos in np.ndindex(idx.shape[:-1]):
            assert got[pos].tolist() == reference_merge(idx[pos], extra[pos], size), pos


def test_native_merge_sorts_when_the_token_range_is_wide_and_refuses_entries_outside_it(
        native_kernels):
    """Past a few words of bitmap per entry the kernel sorts instead; same answer. An entry
    outside [-1, tokens) is an error, not a write outside the bitmap."""
    rng = np.random.default_rng(3)
    idx = rng.integers(-1, 1 << 20, (300, 6)).astype(np.int32)
    extra = rng.choice(idx.ravel(), (300, 9)).astype(np.int32)  # duplicates across lists
    got = np.asarray(native.merge(jnp.asarray(idx), jnp.asarray(extra), 10, tokens=1 << 20))
    for row in range(300):
        assert got[row].tolist() == reference_merge(idx[row], extra[row], 10), row
    with pytest.raises(Exception, match=r"outside \[-1, tokens\)"):
        native.merge(jnp.asarray(idx), jnp.asarray(extra), 10, tokens=100).block_until_ready()


def test_merge_by_rank_keeps_first_occurrence_order():
    rng = np.random.default_rng(1)
    idx = rng.integers(-1, 25, (2, 1, 4, 10)).astype(np.int32)
    extra = rng.integers(0, 25, (2, 1, 4, 16)).astype(np.int32)
    for size in (6, 18, 30):
        got = np.asarray(A.merge_by_rank(jnp.asarray(idx), jnp.asarray(extra), size))
        for pos in np.ndindex(idx.shape[:-1]):
            seen = []
            for v in np.concatenate([idx[pos], extra[pos]]).tolist():
                if v >= 0 and v not in seen:
                    seen.append(v)
            assert got[pos].tolist() == (seen + [-1] * size)[:size]


def test_propagate_two_hops():
    rng = np.random.default_rng(2)
    b, h, n, k = 2, 2, 40, 9
    idx = np.stack([rng.permutation(n)[:k] for _ in range(b * h * n)]).reshape(b, h, n, k)
    attn = rng.random((b, h, n, k))
    k1, k2, k_add = 3, 2, 4
    got = np.asarray(A.propagate(jnp.asarray(idx, jnp.int32), jnp.asarray(attn), k1, k2, k_add))
    for bi, hi, i in np.ndindex(b, h, n):
        def best(token, count):
            order = np.argsort(-attn[bi, hi, token], kind="stable")[:count]
            return idx[bi, hi, token][order]
        hop1 = best(i, k1)
        hop2 = np.concatenate([best(j, k1)[:k2] for j in hop1])
        assert got[bi, hi, i].tolist() == reference_merge(idx[bi, hi, i], hop2, k + k_add)


def test_similar_tokens_skips_self():
    idx = jnp.asarray([[[[3, 0, 2], [1, 2, 0], [0, 1, 2], [0, 3, 1]]]], jnp.int32)
    attn = jnp.asarray([[[[0.5, 0.2, 0.3], [0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.3, 0.6, 0.1]]]])
    # token 0 -> 3 (best, not itself); token 1 -> best is itself, so 2; token 2 -> itself, so 0
    # (ties broken by position); token 3 -> best is itself, so 0.
    np.testing.assert_array_equal(A.similar_tokens(idx, attn)[0, 0], [3, 2, 0, 0])


def official_plan(variant, scale, settings):
    c = C.official(variant, scale, settings)
    return A.build_plan(c.topk_focus, c.topk_prop_1, c.topk_prop_2, c.topk_prop_3,
                        914, (6, 7))


def test_plan_classical_train():
    plan = official_plan("iet", 4, "train")
    flat = [p for block in plan for p in block]
    assert [p.on_initial for p in plan[0]] == [True, True, True, False]
    assert [p.prunes for p in plan[0]] == [False, False, True, False]
    assert [p.has_rpb for p in plan[0]] == [True, True, True, False]
    assert not any(p.has_rpb for p in flat[4:])
    # first layers cascade only after a block without propagation (blocks 5, 6, 7)
    assert [block[0].cascade for block in plan] == [False] * 5 + [True] * 3
    assert all(p.cascade for block in plan for p in block[1:])
    assert [block[-1].propagate for block in plan][:5] == [
        (22, 12, 120), (20, 10, 100), (14, 7, 60), (12, 6, 40), None]
    assert plan[1][0].candidates_in == 225 + 120 and not plan[1][0].prunes
    assert [p.similarity for p in flat] == [p.block in (6, 7) for p in flat]


def test_plan_budget_above_candidates_keeps_all():
    plan = official_plan("iet_light", 2, "eval")  # block 2 asks for 245 of 225 candidates
    assert plan[2][0].candidates_in == 225 and plan[2][0].keep == 225 and not plan[2][0].prunes


def test_plan_refuses_bad_budgets():
    with pytest.raises(ValueError, match="topk_prop_1"):
        A.build_plan(((914, 225),), (300,), (2,), (10,), 914, ())
    with pytest.raises(ValueError, match="entries"):
        A.build_plan(((914,), (225,)), (2,), (2,), (0,), 914, ())


def exact_cascade(a, prev, train):
    """The official cascade in exact rational arithmetic on the float64 inputs."""
    eps = Fraction(A.CASCADE_EPS)
    products = [Fraction(x) * Fraction(p) for x, p in zip(a, prev)]
    if train:
        denominator = sum(products) + eps
    else:
        denominator = sum(x + eps for x in products) + eps
    return np.array([float((x + eps) / denominator) for x in products])


def test_cascade_modes_on_nearly_disjoint_attention():
    # Two rows whose consecutive attentions barely overlap: sum(a * prev) ~ 1e-15, where the
    # eval denominator's extra K * eps (K = 6) shifts every entry by ~6e-5 relative.
    a = np.array([[0.6, 0.4, 1e-16, 1e-16, 0.0, 0.0],
                  [1e-15, 3e-16, 0.5, 0.5, 0.0, 0.0]])
    prev = np.array([[1e-15, 5e-16, 0.5, 0.3, 0.2, 0.0],
                     [0.7, 0.3, 1e-16, 0.0, 0.0, 0.5]])
    with jax.enable_x64(True):
        for train in (True, False):
            got = np.asarray(A.cascade(jnp.asarray(a), jnp.asarray(prev), train))
            want = np.stack([exact_cascade(r, p, train) for r, p in zip(a, prev)])
            np.testing.assert_allclose(got, want, rtol=1e-14, atol=0)
        train_mode = np.asarray(A.cascade(jnp.asarray(a), jnp.asarray(prev), True))
        eval_mode = np.asarray(A.cascade(jnp.asarray(a), jnp.asarray(prev), False))
    assert np.abs(eval_mode / train_mode - 1).max() > 1e-5


def test_cascade_modes_agree_on_overlapping_attention():
    rng = np.random.default_rng(3)
    a, prev = rng.dirichlet(np.ones(9), 4), rng.dirichlet(np.ones(9), 4)
    with jax.enable_x64(True):
        got = [np.asarray(A.cascade(jnp.asarray(a), jnp.asarray(prev), t)) for t in (True, False)]
    np.testing.assert_allclose(got[0], got[1], rtol=1e-15)


def test_attend_prunes_ties_by_list_position():
    # Equal attention everywhere: top-k must keep the first list positions, in order.
    b, h, n, k, d = 1, 2, 12, 8, 4
    idx = jnp.asarray(np.random.default_rng(4).integers(0, n, (b, h, n, k)), jnp.int32)
    q = jnp.zeros((b, h, n, d))
    v = jnp.asarray(np.random.default_rng(5).random((b, h, n, d)))
    plan = A.LayerPlan(block=1, layer=1, candidates_in=k, keep=3, on_initial=False,
                       cascade=True, has_rpb=False, propagate=None, similarity=False)
    state = A.AttnState(idx=idx, attn=jnp.full((b, h, n, k), 1 / k))
    _, new = A.attend(q, q, v, state, plan, None, None, "xla")
    np.testing.assert_array_equal(new.idx, idx[..., :3])
    np.testing.assert_array_equal(new.attn, 1 / k)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float64"])
def test_sorted_top_k_equals_lax_top_k(dtype):
    """The CPU's sort-based top-k against jax.lax.top_k(is_stable=True), the oracle: the same
    values and positions (bitwise) on rows full of ties, signed zeros, infinities and NaNs of
    either sign, and the same gradient. float32 and bfloat16 take the packed keys, float64
    the key with a position alongside."""
    rng = np.random.default_rng(7)
    with jax.enable_x64(dtype == "float64"):
        x = special_rows(rng, (3, 5, 40), dtype)
        for k in (1, 7, 23, 40):
            # The packed keys' wider integers stay inside: x's dtype and int32 come out.
            assert_same_top_k(A._sorted_top_k(x, k), jax.lax.top_k(x, k, is_stable=True))
        # Rows too long for int16 positions (float64 keys carry int32 ones).
        long = jnp.asarray(rng.integers(0, 50, (2, 33000)), dtype)
        np.testing.assert_array_equal(A._sorted_top_k(long, 6000)[1],
                                      jax.lax.top_k(long, 6000, is_stable=True)[1])
        finite = jnp.asarray(rng.standard_normal((2, 30)), dtype)
        weights = jnp.asarray(rng.standard_normal((2, 12)), dtype)
        grads = [jax.grad(lambda x, f=f: jnp.sum(f(x, 12)[0] * weights).astype(jnp.float32))(
            finite) for f in (lambda x, k: jax.lax.top_k(x, k, is_stable=True),
                              A._sorted_top_k)]
        np.testing.assert_array_equal(grads[1], grads[0])


def special_rows(rng, shape, dtype):
    """Rows full of ties, signed zeros, infinities and NaNs of either sign, and normals."""
    x = rng.choice(np.array([0.25, -0.5, 0.0, -0.0, 1.0, np.inf, -np.inf, np.nan, -np.nan,
                             3.0]), size=shape)
    return jnp.asarray(np.where(rng.random(shape) < 0.5, rng.standard_normal(shape), x), dtype)


def assert_same_top_k(got, want):
    assert (got[0].dtype, got[1].dtype) == (want[0].dtype, jnp.int32)
    np.testing.assert_array_equal(got[1], want[1])
    bits = f"uint{8 * want[0].dtype.itemsize}"
    np.testing.assert_array_equal(np.asarray(got[0]).view(bits), np.asarray(want[0]).view(bits))


def test_native_top_k_equals_lax_top_k(native_kernels):
    """The native CPU kernel (what `top_k` runs on float32 here) against jax.lax.top_k
    (is_stable=True): the same values (bitwise) and positions on rows of special values, on
    rows where the k-th value is tied across the cut, on long rows, over more rows than one
    thread's share, under vmap; and the same gradient."""
    rng = np.random.default_rng(11)
    cases = [special_rows(rng, (3, 5, 40), jnp.float32),
             special_rows(rng, (700, 40), jnp.float32),  # several threads' shares
             jnp.asarray(rng.integers(0, 3, (300, 50)), jnp.float32)]  # ties at every cut
    for x in cases:
        for k in (1, 2, 7, 23, 40):
            assert_same_top_k(jax.jit(A.top_k, static_argnums=1)(x, k),
                              jax.lax.top_k(x, k, is_stable=True))
    assert "iet_top_k_f32" in jax.jit(lambda x: A.top_k(x, 3)).lower(cases[0]).as_text()
    long = jnp.asarray(rng.random((2, 33000)), jnp.float32)
    assert_same_top_k(A.top_k(long, 6000), jax.lax.top_k(long, 6000, is_stable=True))
    batched = jax.vmap(lambda row: A.top_k(row, 9))(cases[1])
    assert_same_top_k(batched, jax.lax.top_k(cases[1], 9, is_stable=True))
    finite = jnp.asarray(rng.standard_normal((2, 30)), jnp.float32)
    weights = jnp.asarray(rng.standard_normal((2, 12)), jnp.float32)
    grads = [jax.grad(lambda x, f=f: jnp.sum(f(x, 12)[0] * weights))(finite)
             for f in (lambda x, k: jax.lax.top_k(x, k, is_stable=True), A.top_k)]
    np.testing.assert_array_equal(grads[1], grads[0])


def test_top_k_without_native_sorts_on_cpu_only_when_keeping_much_of_the_row():
    """Without the kernels (`native.disabled`, or where none built), `top_k` lowers to a sort
    on CPU when k >= n / 12 and to XLA's top-k otherwise; merges are XLA sorts."""
    x = jnp.zeros((4, 60))
    with native.disabled():
        assert not native.available()
        assert "sort" in jax.jit(lambda x: A.top_k(x, 5)).lower(x).as_text()
        small = jax.jit(lambda x: A.top_k(x, 4)).lower(x).as_text()
        assert "top_k" in small and "sort" not in small and "iet_" not in small
        lists = jnp.zeros((4, 6), jnp.int32)
        merged = jax.jit(lambda a: A.merge_by_index(a, a, 8, tokens=9)).lower(lists).as_text()
        assert "sort" in merged and "iet_" not in merged


# ----------------------------------------------------------------------------- tiled windows
def windows_by_gather(q, k, v, a, idx):
    """The oracle: scores and aggregation over the listed windows by plain gathers."""
    return (jnp.einsum("bhnd,bhnkd->bhnk", q, k[:, :, idx]),
            jnp.einsum("bhnk,bhnkd->bhnd", a, v[:, :, idx]))


@pytest.mark.parametrize("h,w,kernel,dilation,tile", [
    (17, 20, 17, 1, 8),  # non-square; one group per axis (its union is the whole axis)
    (30, 37, 7, 1, 4),  # several groups, the last one short at the far border
    (50, 53, 25, 2, 8),  # the dilated 25x25 window on two sub-grids of unequal length
    (23, 41, 5, 3, 4),  # three sub-grids of unequal length, several groups in each along W
    (12, 14, 3, 1, 16),  # a tile longer than the axis
])
def test_window_products_equal_gathers(h, w, kernel, dilation, tile):
    """Tiled window scores and aggregation equal gathers over `neighbourhood`, with
    gradients (float64)."""
    from iet_jax.model import tiled

    rng = np.random.default_rng(h * w + kernel)
    idx = A.neighbourhood(h, w, kernel, dilation)
    with jax.enable_x64(True):
        q, k, v = (jnp.asarray(rng.standard_normal((2, 2, h * w, 3))) for _ in range(3))
        a = jnp.asarray(rng.standard_normal((2, 2, h * w, kernel * kernel)))

        def tiled_both(q, k, v, a):
            return (tiled.window_scores(q, k, h, w, kernel, dilation, tile),
                    tiled.window_aggregate(a, v, h, w, kernel, dilation, tile))

        def oracle(q, k, v, a):
            return windows_by_gather(q, k, v, a, idx)

        def values_and_grads(fn):
            def loss(*args):
                return sum(jnp.sum(jnp.sin(t)) for t in fn(*args))
            return jax.jit(lambda *args: (fn(*args), jax.grad(loss, argnums=(0, 1, 2, 3))(*args)))

        (got, got_grads), (want, want_grads) = (values_and_grads(fn)(q, k, v, a)
                                                for fn in (tiled_both, oracle))
        for g, wt in zip(got, want):
            np.testing.assert_allclose(g, wt, rtol=0, atol=1e-12)
        for got, want in zip(got_grads, want_grads):
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-11)


@pytest.mark.parametrize("h,w,dilation,train", [(13, 11, 2, False), (16, 15, 3, True)])
def test_attend_tiled_equals_gather_on_initial_layers(h, w, dilation, train):
    """Two layers on the initial lists (3x3 + dilated 5x5, K = 34): one keeping all of them
    (tiled scores and aggregation), one cascading and pruning to 20 (bias, duplicate mask,
    top-k to list positions) then propagating. Same outputs, lists, attention and gradients
    as the gather path (float64)."""
    plan = A.build_plan(((34, 20),), (4,), (2,), (6,), 34, ())[0]
    assert [p.on_initial for p in plan] == [True, True]
    assert [(p.prunes, p.cascade, p.has_rpb) for p in plan] == [(False, False, True),
                                                                 (True, True, True)]
    initial = A.initial_candidates(h, w, 3, 5, dilation)
    assert initial.duplicate.any() and not initial.interior.all()
    rng = np.random.default_rng(dilation)
    with jax.enable_x64(True):
        qkv = jnp.asarray(rng.standard_normal((len(plan), 3, 2, 2, h * w, 4)))
        rpb = jnp.asarray(rng.standard_normal((len(plan), 2, 9)))

        def block(qkv, rpb, mode):
            state, outs = A.AttnState(None, None), []
            for p, (q, k, v), bias in zip(plan, qkv, rpb):
                out, state = A.attend(q, k, v, state, p, initial, bias if p.has_rpb else None,
                                      "xla", train=train, initial_attention=mode)
                outs.append(out)
            return jnp.stack(outs), state

        def values_and_grads(mode):
            def loss(qkv, rpb):
                return jnp.sum(jnp.sin(block(qkv, rpb, mode)[0]))
            return jax.jit(lambda qkv, rpb: (block(qkv, rpb, mode),
                                             jax.grad(loss, argnums=(0, 1))(qkv, rpb)))

        (want_out, want), want_grads = values_and_grads("gather")(qkv, rpb)
        (got_out, got), got_grads = values_and_grads("tiled")(qkv, rpb)
        np.testing.assert_array_equal(got.idx, want.idx)
        np.testing.assert_allclose(got.attn, want.attn, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(got_out, want_out, rtol=0, atol=1e-12)
        for g, wt in zip(got_grads, want_grads):
            np.testing.assert_allclose(g, wt, rtol=0, atol=1e-11)
        # "auto" is one of the two on every platform.
        np.testing.assert_allclose(jax.jit(lambda *a: block(*a, "auto")[0])(qkv, rpb),
                                   want_out, rtol=0, atol=1e-12)


def test_initial_attention_refuses_unknown_mode():
    with pytest.raises(ValueError, match="initial_attention"):
        C.model_config(initial_attention="dense")
    plan = A.build_plan(((34,),), (0,), (0,), (0,), 34, ())[0][0]
    q = jnp.zeros((1, 1, 100, 2))
    with pytest.raises(ValueError, match="initial_attention"):
        A.attend(q, q, q, A.AttnState(None, None), plan, A.initial_candidates(10, 10, 3, 5, 2),
                 None, "xla", initial_attention="dense")
