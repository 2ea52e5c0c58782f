"""JAX's persistent compilation cache for the commands, on by default.

Compiling IET is slow: the training step of IET-light x4 (LR patch 64) takes minutes to
compile on a CPU, and every resumed run, evaluation or upscale of the same model compiled it
again. With the cache, a program compiled once for this machine is read back from disk the
next time (JAX keys each entry by the program, its shapes, the backend, the device and the
JAX version, so a stale entry is never used for another program).

Where: `$IET_JAX_COMPILE_CACHE`, else `$XDG_CACHE_HOME/iet_jax/xla`, else
`~/.cache/iet_jax/xla`. `IET_JAX_COMPILE_CACHE=off` turns it off. A cache directory that JAX
was already given (`JAX_COMPILATION_CACHE_DIR`, or `jax.config.update` in the caller's own
code) is left as it is. JAX does not bound the folder's size (its size cap needs the
`filelock` package); deleting the folder at any time is safe.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import jax

ENV = "IET_JAX_COMPILE_CACHE"
OFF = ("off", "0", "false", "no", "none", "")


def default_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "iet_jax" / "xla"


def enable() -> Path | None:
    """Turn the cache on for this process (see the module docstring); the folder in use, or
    None when it is off. A folder that cannot be created is one line on stderr, not an error:
    the command then compiles as it would without the cache."""
    configured = jax.config.jax_compilation_cache_dir
    if configured:
        return Path(configured)
    setting = os.environ.get(ENV)
    if setting is not None and setting.strip().lower() in OFF:
        return None
    folder = Path(setting).expanduser() if setting else default_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        print(f"compilation cache off: cannot create {folder} ({error.strerror}); set {ENV} "
              f"to a writable folder, or {ENV}=off", file=sys.stderr)
        return None
    jax.config.update("jax_compilation_cache_dir", str(folder))
    return folder
