"""Read PyTorch checkpoints (`torch.save` output) into NumPy without importing torch.

The official IET weights ship as `.pth` files. Loading them with `torch.load` would make torch
a dependency and, for untrusted files, run arbitrary pickled code. Here the pickle is read by a
restricted unpickler that resolves only the handful of names a tensor checkpoint needs, each to
a rebuilder written in NumPy; any other name is refused before anything is imported or called.

Supported: the zip format (torch >= 1.6 default) and the legacy non-zip pickle format, tensors
of dtype float16/bfloat16/float32/float64, int8/16/32/64, uint8/16/32/64, bool and complex64/128,
with arbitrary sizes, strides and storage offsets, and `nn.Parameter`s (loaded as plain arrays).

A hostile file costs bounded time and memory: the pickle may hold at most `MAX_PICKLE_BYTES`
bytes and `MAX_PICKLE_OPS` opcodes (checked by a dry parse before anything is built), every
opcode does a bounded amount of work (an `OrderedDict` is built empty and filled item by item;
torch's `_metadata` state is dropped, not copied), a zip record is decompressed no further than
its declared size, each storage record must be exactly as large as its tensors declare, and all
records together may expand to at most `MAX_EXPANSION` times the file's size (torch.save stores
them uncompressed: a compressed record holding far more than it occupies is a zip bomb). Names
and values from the file are quoted in messages escaped and cut (`conventions.text.printable`).
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import pickletools
import reprlib
import struct
import zipfile
from collections.abc import Callable
from typing import Any, BinaryIO, NamedTuple

import numpy as np

from iet_jax.conventions.text import printable

__all__ = ["UnsafeCheckpointError", "load_pth", "select_state_dict", "MAX_PICKLE_BYTES",
           "MAX_PICKLE_OPS", "MAX_EXPANSION"]

# Bounds on what a checkpoint may cost (module-level: change them here for unusual files).
MAX_PICKLE_BYTES = 64 << 20  # the object pickle: ~100 bytes per tensor in real checkpoints
MAX_PICKLE_OPS = 2_000_000  # its opcodes: ~30 per tensor (a 1000-tensor model: ~30 000)
MAX_EXPANSION = 100  # all records read, decompressed, at most this many times the file size
_MAX_DIMS = 64  # NumPy's limit on array dimensions


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
    ("collections", "OrderedDict"): "_ordered_dict",
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

_REPR = reprlib.Repr(maxlevel=3, maxtuple=6, maxlist=6, maxdict=4, maxset=4, maxstring=60,
                     maxlong=40, maxother=60)


def _quote(value: Any, limit: int = 120) -> str:
    """A short, printable repr of a value read from the file, for messages."""
    try:
        text = _REPR.repr(value)
    except Exception:  # e.g. an int too long to print in decimal
        text = f"<{type(value).__name__}>"
    return printable(text, limit)


class _OrderedDict(collections.OrderedDict):
    """An `OrderedDict` read from a checkpoint; the pickle's BUILD state (torch's `_metadata`
    of a state dict) is dropped: copying it into every dict would let a small pickle apply one
    large state to many dicts."""

    def __setstate__(self, state: Any) -> None:
        pass

    def __reduce__(self):
        return collections.OrderedDict, (), None, None, iter(self.items())


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
            and len(size) <= _MAX_DIMS
            and all(type(v) is int and v >= 0 for v in (offset, *size, *stride))):
        raise ValueError(f"bad tensor geometry: offset {_quote(offset)}, size {_quote(size)}, "
                         f"stride {_quote(stride)}")
    if 0 not in size:
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= storage.size:
            raise ValueError(f"tensor (offset {offset}, size {size}, stride {stride}) reaches past "
                             f"its storage of {storage.size} elements")
    return np.lib.stride_tricks.as_strided(
        storage[offset:], shape=size, strides=tuple(s * storage.itemsize for s in stride))


_MARK = object()  # a MARK on the dry parse's stack
# Opcodes that push one value which is cheap to hash, or not hashable at all.
_PUSH_ONE = frozenset((
    "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "STRING", "BINSTRING",
    "SHORT_BINSTRING", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8", "UNICODE",
    "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "NONE", "NEWTRUE", "NEWFALSE", "FLOAT",
    "BINFLOAT", "EMPTY_LIST", "EMPTY_DICT", "EMPTY_SET", "EMPTY_TUPLE", "GLOBAL", "PERSID",
    "EXT1", "EXT2", "EXT4", "NEXT_BUFFER"))
# Opcodes that pop n values and push one (an object built by a call, a stored storage).
_POP_PUSH = {"STACK_GLOBAL": 2, "REDUCE": 2, "NEWOBJ": 2, "NEWOBJ_EX": 3, "BINPERSID": 1}
_MAX_KEY_ITEMS = 64  # a dict key or set member may be a tuple of at most this many items


def _check_pickle(stream: io.BytesIO, max_memo: int) -> None:
    """Dry-parse the next pickle in `stream` without running it, then rewind.

    A corrupt length or memo index would otherwise make the C unpickler allocate gigabytes;
    the pickle's length and opcode count are bounded (`MAX_PICKLE_BYTES`, `MAX_PICKLE_OPS`).
    The stack is followed through the opcodes, each value standing for the number of items
    hashing it visits, so that no dict key or set member is a deeply shared tuple: a tuple is
    hashed item by item, and one of 30 levels of (x, x) built from the memo costs 2**30
    steps from a few hundred bytes.
    """
    start = stream.tell()
    stack: list = []
    memo: dict[int, Any] = {}

    def pop(n: int = 1) -> list:
        if n > len(stack) or _MARK in stack[len(stack) - n:]:
            raise ValueError("malformed pickle: stack underflow")
        items = stack[len(stack) - n:]
        del stack[len(stack) - n:]
        return items

    def pop_mark() -> list:
        for i in range(len(stack) - 1, -1, -1):
            if stack[i] is _MARK:
                items = stack[i + 1:]
                del stack[i:]
                return items
        raise ValueError("malformed pickle: no MARK")

    def hashed(items: list) -> None:
        for cost in items:
            if cost > _MAX_KEY_ITEMS:
                raise ValueError(f"a dict key or set member made of more than {_MAX_KEY_ITEMS} "
                                 "nested items (hashing it could take very long)")

    def tuple_of(items: list) -> int:
        return min(1 + sum(items), 1 << 30)

    for count, (op, arg, pos) in enumerate(pickletools.genops(stream), 1):
        if count > MAX_PICKLE_OPS:
            raise ValueError(f"the pickle has more than {MAX_PICKLE_OPS} opcodes "
                             "(iet_jax.io.pth.MAX_PICKLE_OPS); a tensor checkpoint needs about "
                             "30 per tensor")
        if pos - start > MAX_PICKLE_BYTES:
            raise ValueError(f"the pickle is longer than {MAX_PICKLE_BYTES} bytes "
                             "(iet_jax.io.pth.MAX_PICKLE_BYTES)")
        name = op.name
        if name in _PUSH_ONE:
            stack.append(1)
        elif name in _POP_PUSH:
            pop(_POP_PUSH[name])
            stack.append(1)
        elif name == "MARK":
            stack.append(_MARK)
        elif name == "TUPLE":
            stack.append(tuple_of(pop_mark()))
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            stack.append(tuple_of(pop(int(name[-1]))))
        elif name in ("LIST", "OBJ", "INST"):
            pop_mark()
            stack.append(1)
        elif name in ("DICT", "SETITEMS"):
            hashed(pop_mark()[0::2])
            if name == "DICT":
                stack.append(1)
        elif name == "FROZENSET":
            hashed(pop_mark())
            stack.append(1)
        elif name == "ADDITEMS":
            hashed(pop_mark())
        elif name == "SETITEM":
            hashed(pop(2)[:1])
        elif name in ("APPEND", "BUILD", "POP"):
            if stack and stack[-1] is _MARK and name == "POP":
                stack.pop()
            else:
                pop()
        elif name in ("APPENDS", "POP_MARK"):
            pop_mark()
        elif name == "DUP":
            stack.append(pop()[0])
            stack.append(stack[-1])
        elif name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
            index = len(memo) if name == "MEMOIZE" else arg
            if index > max_memo:
                raise ValueError(f"pickle memo index {_quote(index)} is out of range")
            memo[index] = pop()[0]
            stack.append(memo[index])
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            if arg not in memo:
                raise ValueError(f"pickle memo index {_quote(arg)} was never stored")
            stack.append(memo[arg])
        elif name not in ("PROTO", "FRAME", "STOP", "READONLY_BUFFER"):
            raise ValueError(f"unexpected pickle opcode {name}")
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
                f"{printable(self._path, 500)}: refused to load {printable(f'{module}.{name}')}: "
                "the file is not a plain tensor checkpoint (only tensors, storages and dicts are "
                "allowed; nothing was executed)")
        return getattr(self, found) if isinstance(found, str) else found

    def persistent_load(self, pid: Any) -> np.ndarray:
        # zip: ('storage', type, key, location, numel); legacy adds view_metadata, None nowadays
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)
                and type(pid[4]) is int and pid[4] >= 0):
            raise ValueError(f"unexpected persistent id {_quote(pid)}")
        if len(pid) == 6 and pid[5] is not None:
            raise ValueError("storage views (very old legacy files) are not supported; "
                             "re-save the checkpoint with a recent torch")
        return self._get_storage(pid[2], pid[1].dtype, pid[4])

    def _ordered_dict(self, *args: Any, **kwargs: Any) -> _OrderedDict:
        # torch.save writes OrderedDict() and then its items; built from arguments, one small
        # pickle could copy a large dict many times over.
        if args or kwargs:
            raise ValueError("OrderedDict built from arguments (torch.save writes it empty, "
                             "then its items)")
        return _OrderedDict()

    def _rebuild_tensor_v2(self, storage: Any, storage_offset: Any, size: Any, stride: Any,
                           requires_grad: Any, backward_hooks: Any, metadata: Any = None
                           ) -> np.ndarray:
        if metadata:
            raise ValueError(f"tensors with metadata {_quote(metadata)} (e.g. conjugate views) "
                             "are not supported")
        return _strided_view(storage, storage_offset, size, stride)

    def _rebuild_tensor_v3(self, storage: Any, storage_offset: Any, size: Any, stride: Any,
                           requires_grad: Any, backward_hooks: Any, dtype: Any,
                           metadata: Any = None) -> np.ndarray:
        # Newer dtypes (e.g. uint16) are saved as an untyped byte storage plus a torch dtype.
        if not (isinstance(storage, np.ndarray) and storage.dtype == np.uint8
                and isinstance(dtype, _TorchDType)):
            raise ValueError(
                f"bad _rebuild_tensor_v3 arguments: {type(storage).__name__}, {_quote(dtype)}")
        typed = storage.view(_NUMPY_DTYPES[dtype.name])
        return self._rebuild_tensor_v2(typed, storage_offset, size, stride, requires_grad,
                                       backward_hooks, metadata)

    def _rebuild_parameter(self, data: np.ndarray, requires_grad: Any,
                           backward_hooks: Any) -> np.ndarray:
        if not isinstance(data, np.ndarray):
            raise ValueError(f"a parameter of {type(data).__name__}, not of a tensor")
        return data

    def _rebuild_parameter_with_state(self, data: np.ndarray, requires_grad: Any,
                                      backward_hooks: Any, state: Any) -> np.ndarray:
        # The state is Python attributes set on the Parameter, not tensor data.
        return self._rebuild_parameter(data, requires_grad, backward_hooks)


def _load_zip(path: str, f: BinaryIO, file_size: int) -> Any:
    """Read the zip format: `<archive>/data.pkl` plus one raw record per storage."""
    budget = MAX_EXPANSION * max(file_size, 1 << 16)  # bytes all records may expand to

    with zipfile.ZipFile(f) as zf:
        names = set(zf.namelist())

        def read(record: str, expected: int | None = None, limit: int | None = None) -> bytes:
            """The record's bytes, decompressed no further than its declared size."""
            nonlocal budget
            if record not in names:
                raise ValueError(f"no record {printable(record)} in the archive")
            info = zf.getinfo(record)
            size = info.file_size
            if expected is not None and size != expected:
                raise ValueError(f"storage record {printable(record)} does not hold {expected} "
                                 f"bytes")
            if limit is not None and size > limit:
                raise ValueError(f"record {printable(record)} holds {size} bytes, more than "
                                 f"{limit}")
            budget -= size
            if budget < 0:
                raise ValueError(
                    f"the records expand to more than {MAX_EXPANSION} times the file's "
                    f"{file_size} bytes (iet_jax.io.pth.MAX_EXPANSION): a zip bomb, not "
                    "torch.save output, which stores them uncompressed")
            with zf.open(info) as member:
                data = member.read(size)  # stops at the declared size, however it inflates
            if len(data) != size:
                raise ValueError(f"record {printable(record)} is truncated")
            return data

        pkls = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(pkls) != 1:
            raise ValueError(f"found {len(pkls)} '<archive>/data.pkl' records instead of one")
        prefix = pkls[0][: -len("data.pkl")]
        if f"{prefix}byteorder" in names and read(f"{prefix}byteorder", limit=16) != b"little":
            raise ValueError("big-endian checkpoints are not supported")
        storages: dict[str, np.ndarray] = {}

        def get_storage(key: str, dtype: str, numel: int) -> np.ndarray:
            if key not in storages:
                nbytes = numel * _file_dtype(dtype).itemsize
                storages[key] = _decode(read(f"{prefix}data/{key}", expected=nbytes), dtype)
            return storages[key]

        if zf.getinfo(pkls[0]).file_size > MAX_PICKLE_BYTES:
            raise ValueError(f"the pickle is longer than {MAX_PICKLE_BYTES} bytes "
                             "(iet_jax.io.pth.MAX_PICKLE_BYTES)")
        pickled = read(pkls[0])
        return _Unpickler(io.BytesIO(pickled), path, get_storage).load()


def _load_legacy(path: str, f: BinaryIO) -> Any:
    """Read the legacy format: header pickles, the object pickle, the storage key list, then
    each storage as an int64 element count and its little-endian bytes."""
    data = f.read()
    stream = io.BytesIO(data)
    storages: dict[str, tuple[str, np.ndarray]] = {}
    left = len(data)  # the storages' bytes all come from the file

    def get_storage(key: str, dtype: str, numel: int) -> np.ndarray:
        # The bytes come after the object pickle: hand out a buffer now and fill it below.
        nonlocal left
        if key not in storages:
            left -= numel * _file_dtype(dtype).itemsize
            if left < 0:
                raise ValueError(f"storage {printable(key)} claims {_quote(numel)} elements, "
                                 "more than the file holds")
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
    if (not isinstance(keys, list) or not all(type(k) is str for k in keys)
            or sorted(keys) != sorted(storages)):
        raise ValueError("storage key list does not match the storages the pickle uses")
    for key in keys:
        dtype, buffer = storages[key]
        nbytes = buffer.size * _file_dtype(dtype).itemsize
        (numel,) = struct.unpack("<q", stream.read(8))
        raw = stream.read(nbytes)
        if numel != buffer.size or len(raw) != nbytes:
            raise ValueError(f"storage {printable(key)} is truncated or has the wrong size")
        buffer[...] = _decode(raw, dtype)
    return obj


def load_pth(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a `torch.save` checkpoint whose top level is a dict, with tensors as NumPy arrays.

    Arrays are strided views of their torch storage, so tensors that shared a storage in torch
    share memory here too; dicts the pickle built as `OrderedDict`s come back as a subclass of
    it that drops torch's `_metadata` attribute. bfloat16 tensors come back as float32 (NumPy
    has no bfloat16; the conversion is exact). Raises FileNotFoundError for a missing file,
    UnsafeCheckpointError if the pickle names anything beyond tensors/storages/dicts, and
    ValueError for other files.
    """
    path = os.fspath(path)
    shown = printable(path, 500)
    if os.path.isdir(path):
        raise ValueError(f"{shown} is a folder, not a .pth file; give the official "
                         f"checkpoint file (e.g. net_g_*.pth)")
    with open(path, "rb") as f:
        head = f.read(4)
        f.seek(0)
        try:
            if head == b"PK\x03\x04":
                obj = _load_zip(path, f, os.fstat(f.fileno()).st_size)
            elif head[:1] == b"\x80":  # pickle PROTO opcode: the legacy format
                obj = _load_legacy(path, f)
            else:
                raise ValueError(f"file starts with {head!r}")
        except UnsafeCheckpointError:
            raise
        except Exception as e:  # corrupt input can fail anywhere in zipfile/pickle/numpy
            raise ValueError(f"{shown}: not a readable PyTorch checkpoint "
                             f"({printable(str(e), 300)}); {_EXPECTED}") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{shown}: expected a dict at the top level (a state dict or a BasicSR "
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
                         f"('params_ema' or 'params') or a state dict; top-level keys: "
                         f"{_quote(list(obj), 300)}")
    stripped = {k.removeprefix("module."): v for k, v in state.items()}
    if len(stripped) != len(state):
        raise ValueError("keys clash once the 'module.' prefix is stripped")
    return stripped, which
