"""The XLA reference's chunked walk (`reference.plan`) on every backend: the off-CPU plan,
compiled here through `reference.planned_for`, gives the CPU plan's values and gradients and
keeps one layer's memory bounded (read from the compiled memory analysis, nothing runs)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iet_jax.kernels import gather, reference

H, N, K, D = 3, 37, 13, 10  # N not a multiple of the query chunks below, K and d odd sizes


def inputs(seed=0):
    rng = np.random.default_rng(seed)
    x, y = (jnp.asarray(rng.standard_normal((H, N, D)), jnp.float32) for _ in range(2))
    w = jnp.asarray(rng.standard_normal((H, N, K)), jnp.float32)
    idx = rng.integers(-1, N, (H, N, K)).astype(np.int32)
    idx[..., 1] = idx[..., 0]  # a token twice within a list
    idx[..., 2] = -1  # an empty slot in every list
    return x, y, w, jnp.asarray(idx)


def test_plan_per_backend():
    f32 = jnp.float32
    per_query = 914 * 40 * 4
    # CPU: one (batch x head) row at a time, cache-sized query chunks.
    assert reference.plan(6, 3136, 914, 40, f32, "cpu") == (1, 16)
    assert reference.plan(6, 10, 914, 40, f32, "cpu") == (1, 10)
    # Off CPU: all rows, as many queries as the block allows (a power of two), all N if they fit.
    assert reference.plan(6, 3136, 914, 40, f32, "tpu") == (6, 64)
    assert reference.plan(6, 3136, 914, 40, f32, "gpu", block_bytes=6 * 3136 * per_query) \
        == (6, 3136)
    # More rows than one block holds at one query each: rows in groups, one query per step.
    assert reference.plan(6, 3136, 914, 40, f32, "tpu", block_bytes=4 * per_query) == (4, 1)
    with reference.planned_for("tpu", block_bytes=30 * 520):
        assert reference.plan(H, N, K, D, f32) == (3, 8)
    assert reference.plan(H, N, K, D, f32) == reference.plan(H, N, K, D, f32,
                                                             jax.default_backend())


def loss(q, k, v, idx):
    s = gather.gather_qk(q, k, idx, impl="xla")
    a = jax.nn.softmax(s, axis=-1)
    return jnp.sum(gather.gather_av(a, v, idx, impl="xla") ** 2)


def primitives_and_grads(x, y, w, idx, q, k, v):
    values = [reference.qk(x, y, idx), reference.av(w, y, idx), reference.scatter(w, x, idx)]
    return values + list(jax.grad(loss, argnums=(0, 1, 2))(q, k, v, idx))


# Off CPU with small blocks so the walk chunks at these shapes: 3 rows x 8 queries per step
# (37 queries: 5 chunks, the last moved back to end at 37), 2 rows x 1 query (rows in groups,
# one left over), and everything in one step.
@pytest.mark.parametrize("block_bytes", [30 * K * D * 4, 2 * K * D * 4, 1 << 30])
def test_off_cpu_plan_matches_cpu_plan(block_bytes):
    args = inputs() + inputs(seed=1)[:3]
    run = jax.jit(primitives_and_grads)  # traced again under each plan (a jit cache key)
    with reference.planned_for("cpu"):
        want = run(*args)
    with reference.planned_for("tpu", block_bytes):
        got = run(*args)
    for g, r in zip(got, want):
        assert g.shape == r.shape and g.dtype == r.dtype
        # Same sums per query; only the scatter's order of adds differs between the plans.
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=0,
                                   atol=1e-5 * max(float(jnp.abs(r).max()), 1.0))


def layer(q, k, v, idx):
    a = jax.nn.softmax(gather.gather_qk(q, k, idx, impl="xla"), axis=-1)
    return jnp.sum(gather.gather_av(a, v, idx, impl="xla"))


def temp_bytes(backend, block_bytes=None):
    """Temporaries of one layer's gather_qk + gather_av forward and backward, compiled only,
    at IET's largest lists: B*h = 6, N = 3136, K = 914, d = 40 (float32)."""
    h, n, kk, d = 6, 3136, 914, 40
    grad = jax.jit(jax.grad(layer, argnums=(0, 1, 2)))
    rows = jax.ShapeDtypeStruct((h, n, d), jnp.float32)
    args = (rows, rows, rows, jax.ShapeDtypeStruct((h, n, kk), jnp.int32))
    with reference.planned_for(backend, block_bytes):
        compiled = grad.lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_off_cpu_plan_bounds_a_layers_temporaries():
    bounded = temp_bytes("tpu")
    # The plan before chunking off CPU: one vmapped gather over all N (5.4 GiB here).
    unchunked = temp_bytes("tpu", block_bytes=1 << 40)
    assert bounded <= 0.5 * 2**30, bounded
    assert unchunked > 0.5 * 2**30, unchunked
