"""Shared pytest set-up: tests marked `gpu` run only where JAX sees a GPU, JAX's persistent
compilation cache and the native kernels' build live in a temporary folder for the session,
for the tests and for the commands they start (a run compiles the same train step again when
a test reruns or resumes it), and the `tiny_checkpoint` and `native_kernels` fixtures. Shared
helper code is in `tiny.py` (models, stand-ins, images), `gather_cases.py`, `pth_writer.py`
and `seeded_weights.py`."""

import os
import shutil
import tempfile

import jax
import pytest

_CACHE_DIR = None


def pytest_configure(config):
    global _CACHE_DIR
    _CACHE_DIR = tempfile.mkdtemp(prefix="iet-jax-test-jit-cache-")
    jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    # Commands the tests start in subprocesses use the same session folder, not ~/.cache;
    # so do the native CPU kernels (`iet_jax.kernels.native`), built there once per session.
    os.environ["IET_JAX_COMPILE_CACHE"] = _CACHE_DIR
    os.environ["IET_JAX_CACHE"] = os.path.join(_CACHE_DIR, "native")


def pytest_unconfigure(config):
    if _CACHE_DIR is not None:
        shutil.rmtree(_CACHE_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A model directory (`model_dir.save_model`) of a tiny x2 IET with random weights."""
    from iet_jax.io import model_dir
    from tiny import random_model, tiny_model_config

    directory = tmp_path_factory.mktemp("ckpt") / "tiny_x2"
    model_dir.save_model(directory, random_model(tiny_model_config(2)))
    return directory


def pytest_runtest_setup(item):
    # Asked only when a gpu test is about to run, so collection never starts a JAX backend
    # (tests that simulate several CPU devices configure them before first use).
    if "gpu" in item.keywords and jax.default_backend() != "gpu":
        pytest.skip("needs a GPU (jax.default_backend() is not 'gpu')")


@pytest.fixture
def native_kernels():
    """The native CPU kernels, built: skips where no C++ compiler exists; with one, they must
    build (a failure is a test failure, not a skip)."""
    from iet_jax.kernels import native

    try:
        native.compiler()
    except native.NativeBuildError as error:
        pytest.skip(str(error))
    assert native.available(), "a C++ compiler is here but the native kernels did not build"
