"""What the gather kernels' tests share: candidate lists with every awkward case, the three
primitives' inputs, a tolerance check relative to the oracle's magnitude, and a scalar loss
through both gather ops."""

import jax
import jax.numpy as jnp
import numpy as np

from iet_jax.kernels import gather


def lists(rng, shape, n):
    """Random candidate lists with empty slots and repeated entries (twice in one list too)."""
    idx = rng.integers(-1, n, shape).astype(np.int32)
    idx[..., 1] = idx[..., 0]  # a token twice within a list
    idx[..., 2] = -1  # an empty slot in every list
    idx[..., 0, :] = 5  # one list that names a single token K times
    idx[..., 1, :] = -1  # one list that is all empty
    return jnp.asarray(idx)


def inputs(seed, shape, dtype=jnp.float32):
    """x, y (H, N, d) in `dtype`, weights w (H, N, K) in their accumulation dtype (float64
    stays float64, else float32) and `lists` idx, for shape (H, N, K, d)."""
    h, n, k, d = shape
    rng = np.random.default_rng(seed)
    x, y = (jnp.asarray(rng.standard_normal((h, n, d)), dtype) for _ in range(2))
    w = jnp.asarray(rng.standard_normal((h, n, k)), jnp.float32 if dtype != jnp.float64 else dtype)
    return x, y, w, lists(rng, (h, n, k), n)


def close(got, want, tol):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    scale = max(np.abs(want).max(), 1.0)
    np.testing.assert_allclose(got, want, rtol=0, atol=tol * scale)


def attention_loss(q, k, v, idx, impl, deterministic):
    """A scalar through both ops and both their backward primitives."""
    s = gather.gather_qk(q, k, idx, impl, deterministic)
    a = jax.nn.softmax(s.astype(jnp.float32), axis=-1)
    a = jnp.where(idx < 0, 0, a)  # all-empty lists give NaN rows; drop them
    out = gather.gather_av(a, v, idx, impl, deterministic)
    finite = jnp.where(idx < 0, 0, s)
    return jnp.sum(out.astype(jnp.float32) ** 2) + 0.1 * jnp.sum(jnp.sin(finite))
