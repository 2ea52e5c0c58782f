"""Native CPU kernels for the attention, built on first use: its top-k and list merge, and
the three gather primitives.

XLA:CPU sorts through a generated comparator that it calls once per comparison, so the
attention's top-k cuts and the propagation's de-duplicating merges cost about a quarter of
IET's CPU forward pass; and its gathers copy every chunk of candidate rows before they are
multiplied. `native.cc` (shipped with the package) does these jobs as XLA FFI custom calls:
top-k by radix selection and the merge through a bitmap of the tokens (the same results bit
for bit as the XLA programs in `iet_jax.model.attention`), and `qk`, `av` and `scatter` of
`iet_jax.kernels.reference` reading the candidate rows in place (float32; the same sums in
another order). The XLA programs stay the tests' oracle and every other platform's path.

The first process that needs the kernels compiles them with the machine's C++ compiler (`CXX`,
else g++, c++ or clang++) against the XLA FFI headers that jaxlib ships, into a cache folder
(`IET_JAX_CACHE`, else ~/.cache/iet_jax), once per source, jaxlib version, compiler and
machine; a few seconds. Where that fails (no compiler, a read-only cache), one warning names
the cause and the model runs the XLA programs instead. `IET_JAX_NATIVE=0` turns the kernels
off.

They are used only where JAX's default backend is the CPU, and never inside `disabled()`:
`jax.export` artifacts must run where this library is not installed.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

SOURCE = Path(__file__).with_name("native.cc")
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp-simd", "-w")
COMPILERS = ("g++", "c++", "clang++")
SWITCH = "IET_JAX_NATIVE"  # "0" turns the kernels off
CACHE = "IET_JAX_CACHE"  # where the compiled library goes
TOP_K_F32 = "iet_top_k_f32"
MERGE_I32 = "iet_merge_i32"
QK_F32, AV_F32, SCATTER_F32 = "iet_qk_f32", "iet_av_f32", "iet_scatter_f32"
COMPILE_TIMEOUT_S = 300

_disabled = contextvars.ContextVar("iet_jax_native_disabled", default=False)


class NativeBuildError(RuntimeError):
    """The kernels could not be compiled or loaded; the message says why and what to do."""


def cache_dir() -> Path:
    if os.environ.get(CACHE):
        return Path(os.environ[CACHE]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "iet_jax"


def compiler() -> str:
    """The C++ compiler to build with: $CXX, else the first of COMPILERS on PATH."""
    if os.environ.get("CXX"):
        return os.environ["CXX"]
    for name in COMPILERS:
        if shutil.which(name):
            return name
    raise NativeBuildError(f"no C++ compiler found ({', '.join(COMPILERS)}): install one "
                           f"(e.g. apt install g++) or point CXX at one")


def build(directory: Path, cxx: str) -> Path:
    """Compile `SOURCE` into `directory` unless an identical build is there; its path.

    The name hashes everything the binary depends on, so a changed source, jaxlib or
    compiler builds anew. Each process compiles into a file of its own and renames it into
    place, so processes that build at once never load a half-written library.
    """
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True,
                                 timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as error:
        raise NativeBuildError(f"the C++ compiler {cxx!r} does not run ({error}); install "
                               f"g++ or point CXX at a working compiler") from None
    key = hashlib.sha256("\0".join([SOURCE.read_text(), jaxlib.__version__, version, cxx,
                                    *FLAGS, platform.machine()]).encode()).hexdigest()[:16]
    target = directory / f"iet_native_{key}.so"
    if target.exists():
        return target
    partial = directory / f".{target.name}.{os.getpid()}.partial"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        command = [cxx, *FLAGS, "-I", jax.ffi.include_dir(), str(SOURCE), "-o", str(partial)]
        result = subprocess.run(command, capture_output=True, text=True,
                                timeout=COMPILE_TIMEOUT_S)
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise NativeBuildError(f"{cxx} could not compile {SOURCE.name} ({last})")
        os.replace(partial, target)
    except OSError as error:
        raise NativeBuildError(f"cannot write the compiled kernels to {directory} ({error}); "
                               f"set {CACHE} to a writable folder") from None
    except subprocess.TimeoutExpired:
        raise NativeBuildError(f"{cxx} took over {COMPILE_TIMEOUT_S} s") from None
    finally:
        with contextlib.suppress(OSError):  # gone, or its folder could not be made
            partial.unlink(missing_ok=True)
    return target


def load(path: Path) -> None:
    """Register the library's handlers with XLA for the CPU."""
    try:
        library = ctypes.cdll.LoadLibrary(str(path))
        handlers = {TOP_K_F32: library.IetTopKF32, MERGE_I32: library.IetMergeI32,
                    QK_F32: library.IetQkF32, AV_F32: library.IetAvF32,
                    SCATTER_F32: library.IetScatterF32}
    except (OSError, AttributeError) as error:
        raise NativeBuildError(f"cannot load {path} ({error}); delete it to rebuild") from None
    for name, handler in handlers.items():
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(handler), platform="cpu")


@functools.cache
def _ready() -> bool:
    """Build and register the kernels once per process; False (after one warning) if not."""
    if os.environ.get(SWITCH, "1") == "0":
        return False
    try:
        load(build(cache_dir(), compiler()))
    except NativeBuildError as error:
        warnings.warn(f"iet_jax: the native CPU kernels are off: {error}. XLA's sorts and "
                      f"gathers run instead (same results, slower); set {SWITCH}=0 to "
                      f"silence this.", RuntimeWarning, stacklevel=3)
        return False
    return True


def available() -> bool:
    """Whether programs traced now use the kernels (CPU backend, built, not `disabled`)."""
    return not _disabled.get() and jax.default_backend() == "cpu" and _ready()


@contextlib.contextmanager
def disabled():
    """Trace without the kernels (for `jax.export`: artifacts must not need this library)."""
    token = _disabled.set(True)
    try:
        yield
    finally:
        _disabled.reset(token)


def top_k_positions(x: jax.Array, k: int) -> jax.Array:
    """Positions (int32) of `jax.lax.top_k(x, k, is_stable=True)` for float32 x, last axis."""
    if x.dtype != jnp.float32:
        raise TypeError(f"the native top-k takes float32, got {x.dtype}")
    out = jax.ShapeDtypeStruct(x.shape[:-1] + (k,), jnp.int32)
    call = jax.ffi.ffi_call(TOP_K_F32, out, vmap_method="broadcast_all")
    return call(jax.lax.stop_gradient(x))


def merge(a: jax.Array, b: jax.Array, size: int, tokens: int) -> jax.Array:
    """Per row: the sorted union of two int32 lists of entries in [-1, tokens), each value
    once, cut to `size`, -1 padded (`iet_jax.model.attention.merge_by_index`)."""
    out = jax.ShapeDtypeStruct(a.shape[:-1] + (size,), jnp.int32)
    call = jax.ffi.ffi_call(MERGE_I32, out, vmap_method="broadcast_all")
    return call(a.astype(jnp.int32), b.astype(jnp.int32), tokens=np.int64(tokens))


def _gather(name: str, a: jax.Array, b: jax.Array, idx: jax.Array, last: int) -> jax.Array:
    for operand in (a, b):
        if operand.dtype != jnp.float32:
            raise TypeError(f"the native gathers take float32, got {operand.dtype}")
    out = jax.ShapeDtypeStruct(idx.shape[:-1] + (last,), jnp.float32)
    return jax.ffi.ffi_call(name, out, vmap_method="broadcast_all")(a, b, idx.astype(jnp.int32))


def qk(x: jax.Array, y: jax.Array, idx: jax.Array) -> jax.Array:
    """`iet_jax.kernels.reference.qk` for float32: (H, N, d), (H, N, d), (H, N, K) -> (H, N, K)."""
    return _gather(QK_F32, x, y, idx, idx.shape[-1])


def av(w: jax.Array, y: jax.Array, idx: jax.Array) -> jax.Array:
    """`iet_jax.kernels.reference.av` for float32: (H, N, K), (H, N, d), (H, N, K) -> (H, N, d)."""
    return _gather(AV_F32, w, y, idx, y.shape[-1])


def scatter(w: jax.Array, x: jax.Array, idx: jax.Array) -> jax.Array:
    """`iet_jax.kernels.reference.scatter` for float32: (H, N, K), (H, N, d), (H, N, K) ->
    (H, N, d)."""
    return _gather(SCATTER_F32, w, x, idx, x.shape[-1])
