"""Write small PyTorch checkpoints without torch, for tests: `save_pth(path, obj)`.

`obj` is a dict whose values are dicts (str keys) of arrays, or arrays: BasicSR's
`{'params': state_dict, 'params_ema': state_dict}`. The file is torch.save's zip format with
a protocol-2 pickle: each array a float32 storage rebuilt by `torch._utils._rebuild_tensor_v2`.
"""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path

import numpy as np


def _str(s: str) -> bytes:
    data = s.encode()
    return b"X" + struct.pack("<I", len(data)) + data  # BINUNICODE


def _int(i: int) -> bytes:
    return b"J" + struct.pack("<i", i)  # BININT


def _tuple(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"  # MARK ... TUPLE


def _global(module: str, name: str) -> bytes:
    return f"c{module}\n{name}\n".encode()


def save_pth(path: str | Path, obj: dict) -> Path:
    storages: list[np.ndarray] = []

    def tensor(value) -> bytes:
        array = np.array(value, "<f4", order="C")  # (ascontiguousarray makes scalars 1-D)
        key = str(len(storages))
        storages.append(array)
        storage = _tuple(_str("storage"), _global("torch", "FloatStorage"), _str(key),
                         _str("cpu"), _int(array.size)) + b"Q"  # BINPERSID
        strides = [s // 4 for s in array.strides]
        hooks = _global("collections", "OrderedDict") + b")R"  # OrderedDict()
        args = _tuple(storage, _int(0), _tuple(*map(_int, array.shape)),
                      _tuple(*map(_int, strides)), b"\x89", hooks)  # requires_grad False
        return _global("torch._utils", "_rebuild_tensor_v2") + args + b"R"

    def value(v) -> bytes:
        if isinstance(v, dict):
            items = b"".join(_str(k) + value(x) for k, x in v.items())
            return b"}" + (b"(" + items + b"u" if v else b"")  # EMPTY_DICT, SETITEMS
        return tensor(v)

    pickle = b"\x80\x02" + value(obj) + b"."
    path = Path(path)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pickle)
        zf.writestr("archive/byteorder", "little")
        for key, array in enumerate(storages):
            zf.writestr(f"archive/data/{key}", array.tobytes())
        zf.writestr("archive/version", "3\n")
    return path
