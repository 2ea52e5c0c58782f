"""Read PyTorch checkpoints (`torch.save` output) into NumPy without importing torch.

The official IET weights ship as `.pth` files. Loading them with `torch.load` would make torch
a dependency and, for untrusted files, run arbitrary pickled code. Here the pickle is read by a
restricted unpickler that resolves only the handful of names a tensor checkpoint needs, each to
a rebuilder written in NumPy; any other name is refused before anything is imported or called.

Supported: the zip format (torch >= 1.6 default) and the legacy non-zip pickle format, tensors
of dtype float16/bfloat16/float32/float64, int8/16/32/64, uint8/16/32/64, bool and complex64/128,
with arbitrary sizes, strides and storage offsets, and `nn.Parameter`s (loaded as plain arrays).
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import pickletools
import struct
import zipfile
from collections.abc import Callable
from typing import Any, BinaryIO, NamedTuple

import numpy as np

__all__ = ["UnsafeCheckpointError", "load_pth", "select_state_dict"]


class UnsafeCheckpointError(ValueError):
    """The checkpoint's pickle names something other than tensors, storages and dicts."""


class _StorageType(NamedTuple):
    """Stands in for `torch.<X>Storage`; immutable so a pickle cannot tamper with it."""

    dtype: str  # a key of _NUMPY_DTYPES, or "bfloat16"


class _TorchDType(NamedTuple):
    """Stands in for a `torch.<dtype>` object (passed to `_rebuild_tensor_v3`)."""

    name: str  # a key of _NUMPY_DTYPES


_NUMPY_DTYPES: dict[str, np.dtype] = {
    name: np.dtype(name)
    for name in ("float64", "float32", "float16", "int64", "int32", "int16", "int8", "uint8",
                 "uint16", "uint32", "uint64", "bool", "complex64", "complex128")
}
_STORAGE_DTYPES = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8",
    "BoolStorage": "bool", "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
}
# Values are either constants or names of _Unpickler methods (the rebuilders).
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): "_rebuild_tensor_v2",
    ("torch._utils", "_rebuild_tensor_v3"): "_rebuild_tensor_v3",
    ("torch._utils", "_rebuild_parameter"): "_rebuild_parameter",
    ("torch._utils", "_rebuild_parameter_with_state"): "_rebuild_parameter_with_state",
    ("torch", "UntypedStorage"): _StorageType("uint8"),
    ("torch.storage", "UntypedStorage"): _StorageType("uint8"),
    **{("torch", storage): _StorageType(dtype) for storage, dtype in _STORAGE_DTYPES.items()},
    **{("torch", dtype): _TorchDType(dtype) for dtype in _NUMPY_DTYPES},
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER
_LEGACY_PROTOCOL = 1001  # torch.serialization.PROTOCOL_VERSION
_EXPECTED = ("expected torch.save output: a zip archive holding <archive>/data.pkl "
             "(torch >= 1.6) or the legacy pickle format")

StorageGetter = Callable[[str, str, int], np.ndarray]


def _file_dtype(dtype: str) -> np.dtype:
    """The little-endian on-disk dtype of a storage (bfloat16 as its raw uint16 bits)."""
    return np.dtype("<u2" if dtype == "bfloat16" else _NUMPY_DTYPES[dtype].newbyteorder("<"))


def _memory_dtype(dtype: str) -> np.dtype:
    """The in-memory dtype of a storage: NumPy has no bfloat16, so it becomes float32."""
    return np.dtype(np.float32) if dtype == "bfloat16" else _NUMPY_DTYPES[dtype]


def _decode(raw: bytes, dtype: str) -> np.ndarray:
    """Turn a storage's little-endian bytes into a writeable native array (a copy)."""
    data = np.frombuffer(raw, _file_dtype(dtype))
    if dtype == "bfloat16":  # bfloat16 is the top half of a float32: exact conversion
        return (data.astype(np.uint32) << 16).view(np.float32)
    return data.astype(_memory_dtype(dtype))


def _strided_view(storage: Any, offset: Any, size: Any, stride: Any) -> np.ndarray:
    """Torch's (storage, offset, size, stride) as a NumPy view, refusing reads past the storage."""
    if not isinstance(storage, np.ndarray) or storage.ndim != 1:
        raise ValueError(f"tensor storage is {type(storage).__name__}, not a storage")
    if not (isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride)
            and all(type(v) is int and v >= 0 for v in (offset, *size, *stride))):
        raise ValueError(
            f"bad tensor geometry: offset {offset!r}, size {size!r}, stride {stride!r}")
    if 0 not in size:
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= storage.size:
            raise ValueError(f"tensor (offset {offset}, size {size}, stride {stride}) reaches past "
                             f"its storage of {storage.size} elements")
    return np.lib.stride_tricks.as_strided(
        storage[offset:], shape=size, strides=tuple(s * storage.itemsize for s in stride))


def _check_pickle(stream: io.BytesIO, max_memo: int) -> None:
    """Dry-parse the next pickle in `stream` without running it, then rewind.

    A corrupt length or memo index would otherwise make the C unpickler allocate gigabytes.
    """
    start = stream.tell()
    for op, arg, _ in pickletools.genops(stream):
        if op.name in ("PUT", "BINPUT", "LONG_BINPUT") and arg > max_memo:
            raise ValueError(f"pickle memo index {arg} is out of range")
    stream.seek(start)


class _Unpickler(pickle.Unpickler):
    """Unpickler that resolves only tensor-checkpoint names, to NumPy rebuilders.

    The rebuilders are handed out as bound methods of this instance: a pickle's BUILD opcode
    cannot set attributes on a bound method, so it cannot alter shared module-level functions.
    """

    def __init__(self, stream: io.BytesIO, path: str, get_storage: StorageGetter) -> None:
        super().__init__(stream)
        self._stream = stream
        self._path = path
        self._get_storage = get_storage

    def load(self) -> Any:
        """Load the next pickle in the stream, after checking it parses sanely."""
        _check_pickle(self._stream, max_memo=len(self._stream.getbuffer()))
        return super().load()

    def find_class(self, module: str, name: str) -> Any:
        found = _ALLOWED_GLOBALS.get((module, name))
        if found is None:
            raise UnsafeCheckpointError(
                f"{self._path}: refused to load {module}.{name}: the file is not a plain tensor "
                "checkpoint (only tensors, storages and dicts are allowed; nothing was executed)")
        return getattr(self, found) if isinstance(found, str) else found

    def persistent_load(self, pid: Any) -> np.ndarray:
        # zip: ('storage', type, key, location, numel); legacy adds view_metadata, None nowadays
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)
                and type(pid[4]) is int and pid[4] >= 0):
            raise ValueError(f"unexpected persistent id {pid!r}")
        if len(pid) == 6 and pid[5] is not None:
            raise ValueError("storage views (very old legacy files) are not supported; "
                             "re-save the checkpoint with a recent torch")
        return self._get_storage(pid[2], pid[1].dtype, pid[4])

    def _rebuild_tensor_v2(self, storage: Any, storage_offset: Any, size: Any, stride: Any,
                           requires_grad: Any, backward_hooks: Any, metadata: Any = None
                           ) -> np.ndarray:
        if metadata:
            raise ValueError(f"tensors with metadata {metadata!r} (e.g. conjugate views) are "
                             "not supported")
        return _strided_view(storage, storage_offset, size, stride)

    def _rebuild_tensor_v3(self, storage: Any, storage_offset: Any, size: Any, stride: Any,
                           requires_grad: Any, backward_hooks: Any, dtype: Any,
                           metadata: Any = None) -> np.ndarray:
        # Newer dtypes (e.g. uint16) are saved as an untyped byte storage plus a torch dtype.
        if not (isinstance(storage, np.ndarray) and storage.dtype == np.uint8
                and isinstance(dtype, _TorchDType)):
            raise ValueError(
                f"bad _rebuild_tensor_v3 arguments: {type(storage).__name__}, {dtype!r}")
        typed = storage.view(_NUMPY_DTYPES[dtype.name])
        return self._rebuild_tensor_v2(typed, storage_offset, size, stride, requires_grad,
                                       backward_hooks, metadata)

    def _rebuild_parameter(self, data: np.ndarray, requires_grad: Any,
                           backward_hooks: Any) -> np.ndarray:
        return data

    def _rebuild_parameter_with_state(self, data: np.ndarray, requires_grad: Any,
                                      backward_hooks: Any, state: Any) -> np.ndarray:
        return data  # the state is Python attributes set on the Parameter; not tensor data


def _load_zip(path: str, f: BinaryIO) -> Any:
    """Read the zip format: `<archive>/data.pkl` plus one raw record per storage."""
    with zipfile.ZipFile(f) as zf:
        names = set(zf.namelist())
        pkls = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(pkls) != 1:
            raise ValueError(f"found {len(pkls)} '<archive>/data.pkl' records instead of one")
        prefix = pkls[0][: -len("data.pkl")]
        if f"{prefix}byteorder" in names and zf.read(f"{prefix}byteorder") != b"little":
            raise ValueError("big-endian checkpoints are not supported")
        storages: dict[str, np.ndarray] = {}

        def get_storage(key: str, dtype: str, numel: int) -> np.ndarray:
            if key not in storages:
                record = f"{prefix}data/{key}"
                nbytes = numel * _file_dtype(dtype).itemsize
                if zf.getinfo(record).file_size != nbytes:
                    raise ValueError(f"storage record {record} does not hold {nbytes} bytes")
                storages[key] = _decode(zf.read(record), dtype)
            return storages[key]

        return _Unpickler(io.BytesIO(zf.read(pkls[0])), path, get_storage).load()


def _load_legacy(path: str, f: BinaryIO) -> Any:
    """Read the legacy format: header pickles, the object pickle, the storage key list, then
    each storage as an int64 element count and its little-endian bytes."""
    data = f.read()
    stream = io.BytesIO(data)
    storages: dict[str, tuple[str, np.ndarray]] = {}

    def get_storage(key: str, dtype: str, numel: int) -> np.ndarray:
        # The bytes come after the object pickle: hand out a buffer now and fill it below.
        if key not in storages:
            if numel * _file_dtype(dtype).itemsize > len(data):
                raise ValueError(f"storage {key} claims {numel} elements, more than the file holds")
            storages[key] = (dtype, np.empty(numel, _memory_dtype(dtype)))
        return storages[key][1]

    unpickler = _Unpickler(stream, path, get_storage)
    if unpickler.load() != _LEGACY_MAGIC:
        raise ValueError("no torch magic number at the start of the pickle")
    if unpickler.load() != _LEGACY_PROTOCOL:
        raise ValueError("unknown legacy torch protocol version")
    sys_info = unpickler.load()
    if not isinstance(sys_info, dict) or sys_info.get("little_endian") is not True:
        raise ValueError("big-endian legacy checkpoints are not supported")
    obj = unpickler.load()
    keys = unpickler.load()
    if not isinstance(keys, list) or sorted(keys) != sorted(storages):
        raise ValueError("storage key list does not match the storages the pickle uses")
    for key in keys:
        dtype, buffer = storages[key]
        nbytes = buffer.size * _file_dtype(dtype).itemsize
        (numel,) = struct.unpack("<q", stream.read(8))
        raw = stream.read(nbytes)
        if numel != buffer.size or len(raw) != nbytes:
            raise ValueError(f"storage {key} is truncated or has the wrong size")
        buffer[...] = _decode(raw, dtype)
    return obj


def load_pth(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a `torch.save` checkpoint whose top level is a dict, with tensors as NumPy arrays.

    Arrays are strided views of their torch storage, so tensors that shared a storage in torch
    share memory here too. bfloat16 tensors come back as float32 (NumPy has no bfloat16; the
    conversion is exact). Raises FileNotFoundError for a missing file, UnsafeCheckpointError if
    the pickle names anything beyond tensors/storages/dicts, and ValueError for other files.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        head = f.read(4)
        f.seek(0)
        try:
            if head == b"PK\x03\x04":
                obj = _load_zip(path, f)
            elif head[:1] == b"\x80":  # pickle PROTO opcode: the legacy format
                obj = _load_legacy(path, f)
            else:
                raise ValueError(f"file starts with {head!r}")
        except UnsafeCheckpointError:
            raise
        except Exception as e:  # corrupt input can fail anywhere in zipfile/pickle/numpy
            raise ValueError(f"{path}: not a readable PyTorch checkpoint ({e}); {_EXPECTED}") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict at the top level (a state dict or a BasicSR "
                         f"checkpoint), got {type(obj).__name__}")
    return obj


def select_state_dict(obj: dict[str, Any], prefer: tuple[str, ...] = ("params_ema", "params")
                      ) -> tuple[dict[str, np.ndarray], str]:
    """Pick the network weights from a loaded checkpoint the way BasicSR does.

    Takes the first key of `prefer` that `obj` has (by default `params_ema`, the EMA weights
    the released models are evaluated with, then `params`), else `obj` itself if it is already
    a flat dict of arrays. Returns the state dict with any DataParallel `module.` prefix
    stripped, and the key it came from ("" for `obj`).
    """
    which = next((k for k in prefer if k in obj), "")
    state = obj[which] if which else obj
    if not (isinstance(state, dict) and state
            and all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in state.items())):
        where = f"obj[{which!r}]" if which else "the checkpoint"
        raise ValueError(f"{where} is not a flat dict of arrays; expected a BasicSR checkpoint "
                         f"('params_ema' or 'params') or a state dict; top-level keys: {list(obj)}")
    stripped = {k.removeprefix("module."): v for k, v in state.items()}
    if len(stripped) != len(state):
        raise ValueError("keys clash once the 'module.' prefix is stripped")
    return stripped, which
