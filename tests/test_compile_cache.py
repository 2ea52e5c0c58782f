"""The commands' persistent compilation cache: where it goes, how it is turned off, that a
folder JAX was already given is kept, that an unusable folder only costs the cache, and that
a second process reads back what the first compiled."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from iet_jax.io import compile_cache

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def fresh_jax_cache_setting(monkeypatch):
    """No cache folder configured (conftest sets one for the session), restored afterwards."""
    before = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", None)
    for name in (compile_cache.ENV, "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    yield
    jax.config.update("jax_compilation_cache_dir", before)


def test_folder_from_the_environment(fresh_jax_cache_setting, monkeypatch, tmp_path):
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "mine"))
    assert compile_cache.enable() == tmp_path / "mine"
    assert (tmp_path / "mine").is_dir()
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "mine")


def test_default_folder_under_the_user_cache(fresh_jax_cache_setting, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_cache.enable() == tmp_path / "iet_jax" / "xla"
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "iet_jax" / "xla")


@pytest.mark.parametrize("setting", ["off", "0", "OFF", ""])
def test_turned_off(fresh_jax_cache_setting, monkeypatch, tmp_path, setting):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv(compile_cache.ENV, setting)
    assert compile_cache.enable() is None
    assert jax.config.jax_compilation_cache_dir is None
    assert not (tmp_path / "iet_jax").exists()


def test_a_folder_jax_was_given_is_kept(fresh_jax_cache_setting, monkeypatch, tmp_path):
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "theirs"))
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "mine"))
    assert compile_cache.enable() == tmp_path / "theirs"
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "theirs")
    assert not (tmp_path / "mine").exists()


def test_an_unusable_folder_is_one_line_and_no_cache(fresh_jax_cache_setting, monkeypatch,
                                                     tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(compile_cache.ENV, str(blocker / "cache"))
    assert compile_cache.enable() is None
    assert jax.config.jax_compilation_cache_dir is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "compilation cache off" in err[0] and compile_cache.ENV in err[0]


_COMPILE_ONCE = """
import json, jax, jax.numpy as jnp
from iet_jax.io import compile_cache
events = []
jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
folder = compile_cache.enable()
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.jit(lambda x: jnp.tanh(x) @ x.T)(jnp.ones((8, 8))).block_until_ready()
print(json.dumps({"folder": str(folder),
                  "hits": events.count("/jax/compilation_cache/cache_hits"),
                  "misses": events.count("/jax/compilation_cache/cache_misses")}))
"""


def test_a_second_process_reads_the_compiled_program_back(tmp_path):
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    env[compile_cache.ENV] = str(tmp_path / "cache")
    runs = [json.loads(subprocess.run([sys.executable, "-c", _COMPILE_ONCE], env=env,
                                      check=True, capture_output=True, text=True,
                                      timeout=120).stdout.strip().splitlines()[-1])
            for _ in range(2)]
    assert runs[0]["folder"] == runs[1]["folder"] == str(tmp_path / "cache")
    assert runs[0]["misses"] > 0 and runs[0]["hits"] == 0
    assert runs[1]["hits"] == runs[0]["misses"] and runs[1]["misses"] == 0
