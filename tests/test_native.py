"""Building the native CPU kernels: what a user sees when that cannot work, and that a model
without them gives the same answer."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iet_jax.kernels import native
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
