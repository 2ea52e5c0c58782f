"""Shared pytest set-up: tests marked `gpu` run only where JAX sees a GPU, and JAX's
persistent compilation cache lives in a temporary folder for the session (a run compiles
the same train step again when a test reruns or resumes it)."""

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


def pytest_unconfigure(config):
    if _CACHE_DIR is not None:
        shutil.rmtree(_CACHE_DIR, ignore_errors=True)


def pytest_runtest_setup(item):
    # Asked only when a gpu test is about to run, so collection never starts a JAX backend
    # (tests that simulate several CPU devices configure them before first use).
    if "gpu" in item.keywords and jax.default_backend() != "gpu":
        pytest.skip("needs a GPU (jax.default_backend() is not 'gpu')")
