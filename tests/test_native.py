"""The native CPU kernels: building them (what a user sees when that cannot work, and that a
model without them gives the same answer) and the gather kernels against the XLA reference.
The top-k and merge kernels are checked in test_attention.py, beside their XLA programs."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gather_cases import attention_loss, close, inputs, lists
from iet_jax.kernels import gather, native, reference
from iet_jax.model import attention as A


@pytest.fixture
def fresh_build(monkeypatch):
    """`native._ready` forgets its answer before and after the test (the library it registered
    stays registered, so later tests rebuild nothing)."""
    native._ready.cache_clear()
    yield monkeypatch
    native._ready.cache_clear()


def test_no_compiler_is_named_with_the_fix(monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(native.NativeBuildError, match="no C.. compiler found.*install one"):
        native.compiler()


def test_a_compiler_that_does_not_run_is_named(tmp_path):
    with pytest.raises(native.NativeBuildError, match="does not run.*point CXX"):
        native.build(tmp_path, str(tmp_path / "no-such-g++"))


def test_a_failed_compile_leaves_nothing_behind(tmp_path, monkeypatch):
    broken = tmp_path / "broken.cc"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(native, "SOURCE", broken)
    out = tmp_path / "cache"
    with pytest.raises(native.NativeBuildError, match="could not compile broken.cc"):
        native.build(out, native.compiler())
    assert list(out.iterdir()) == []


def test_an_unwritable_cache_names_the_setting(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(native.NativeBuildError, match="cannot write.*IET_JAX_CACHE"):
        native.build(blocker / "cache", native.compiler())


def test_a_build_is_reused_and_rebuilt_when_the_source_changes(tmp_path, monkeypatch):
    first = native.build(tmp_path, native.compiler())
    stamp = first.stat().st_mtime_ns
    assert native.build(tmp_path, native.compiler()) == first
    assert first.stat().st_mtime_ns == stamp
    changed = tmp_path / "changed.cc"
    changed.write_text(native.SOURCE.read_text() + "\n// changed\n")
    monkeypatch.setattr(native, "SOURCE", changed)
    second = native.build(tmp_path, native.compiler())
    assert second != first and second.exists()


def test_without_a_compiler_one_warning_and_the_same_results(fresh_build, tmp_path):
    """The model falls back to XLA's sorts: one warning that says why and how to silence it,
    then the same top-k and merge as with the kernels."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.integers(0, 4, (300, 30)), jnp.float32)
    lists = jnp.asarray(rng.integers(-1, 40, (300, 12)), jnp.int32)

    def run():
        return (jax.jit(lambda x: A.top_k(x, 9))(x),
                jax.jit(lambda a: A.merge_by_index(a, a[:, ::-1] + 1, 15, tokens=41))(lists))

    assert native.available()
    with_kernels = run()
    native._ready.cache_clear()
    fresh_build.setenv("CXX", str(tmp_path / "no-such-g++"))
    with pytest.warns(RuntimeWarning, match="kernels are off.*does not run.*IET_JAX_NATIVE=0"):
        assert not native.available()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second time: no warning
        assert not native.available()
        without = run()
    for got, want in zip(jax.tree.leaves(without), jax.tree.leaves(with_kernels)):
        np.testing.assert_array_equal(got, want)


def test_switched_off_by_the_environment(fresh_build):
    fresh_build.setenv(native.SWITCH, "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not native.available()
    text = jax.jit(lambda x: A.top_k(x, 20)).lower(jnp.zeros((2, 40))).as_text()
    assert "iet_" not in text


# ----------------------------------------------------------------------------- the gathers


@pytest.mark.parametrize("shape", [(3, 37, 13, 10), (5, 300, 40, 40)])
def test_native_gathers_match_the_xla_reference(shape, native_kernels):
    """qk, av and scatter against the reference: empty slots, a token twice in a list, a list
    of one token, an all-empty list; odd K and d; and (second shape) rows and heads split
    over threads."""
    x, y, w, idx = inputs(0, shape)
    with jax.default_matmul_precision("highest"):
        for name, got, want in [
            ("qk", native.qk(x, y, idx), reference.qk(x, y, idx)),
            ("av", native.av(w, y, idx), reference.av(w, y, idx)),
            ("scatter", native.scatter(w, x, idx), reference.scatter(w, x, idx)),
        ]:
            assert got.dtype == want.dtype == jnp.float32, name
            close(got, want, 1e-5)
    assert not np.asarray(native.qk(x, y, idx))[np.asarray(idx) < 0].any()
    # Under vmap the extra axis is one more of heads.
    batched = jax.vmap(native.av)(w[:, None], y[:, None], idx[:, None])[:, 0]
    np.testing.assert_array_equal(batched, native.av(w, y, idx))


def test_native_gathers_refuse_an_index_outside_the_tokens(native_kernels):
    x, y, w, idx = inputs(1, (2, 20, 6, 8))
    for bad in (20, -2):
        wrong = idx.at[1, 3, 2].set(bad)
        for call in (lambda: native.qk(x, y, wrong), lambda: native.av(w, y, wrong),
                     lambda: native.scatter(w, x, wrong)):
            with pytest.raises(Exception, match=r"outside \[-1, N\)"):
                call().block_until_ready()


def test_native_gradients_match_xla_and_other_dtypes_take_the_reference(native_kernels):
    """Both gather ops and all three backward primitives through `gather_impl="native"`; a
    bfloat16 or float64 model on it runs the XLA reference, bit for bit."""
    assert gather.resolve("auto") == "native"
    rng = np.random.default_rng(4)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 2, 37, 10)), jnp.float32) for _ in range(3))
    idx = lists(rng, (2, 2, 37, 13), 37)
    grad = jax.jit(jax.value_and_grad(attention_loss, argnums=(0, 1, 2)), static_argnums=(4, 5))
    with jax.default_matmul_precision("highest"):
        want_value, want_grads = grad(q, k, v, idx, "xla", False)
    value, grads = grad(q, k, v, idx, "native", False)
    close(value, want_value, 1e-5)
    for g, r in zip(grads, want_grads):
        close(g, r, 1e-5)
    text = jax.jit(jax.grad(attention_loss, argnums=(0, 1, 2)), static_argnums=(4, 5)).lower(
        q, k, v, idx, "native", False).as_text()
    assert all(name in text for name in ("iet_qk_f32", "iet_av_f32", "iet_scatter_f32"))
    half = [a.astype(jnp.bfloat16) for a in (q, k, v)]
    np.testing.assert_array_equal(grad(*half, idx, "native", False)[1][1],
                                  grad(*half, idx, "xla", False)[1][1])


def test_gather_impl_native_where_the_kernels_are_off_is_refused(fresh_build):
    fresh_build.setenv(native.SWITCH, "0")
    assert gather.resolve("auto") == "xla"
    with pytest.raises(ValueError, match="'native' runs only where.*use 'auto' or 'xla'"):
        gather.resolve("native")
