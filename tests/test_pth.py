"""Tests for iet_jax.io.pth: torch-free checkpoint loading and BasicSR state-dict selection.

tests/fixtures/pth/<name>.pth were written once by torch 2.13 (`torch.save`); <name>.npz holds
torch's own `.numpy()` of every tensor in it (bfloat16 via `.float()`), keyed 'outer/inner'.
Malicious and malformed files are crafted here, without torch.
"""

from __future__ import annotations

import io
import os
import pickle
import pickletools
import random
import struct
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from iet_jax.io.pth import UnsafeCheckpointError, load_pth, select_state_dict

FIXTURES = Path(__file__).parent / "fixtures" / "pth"
NAMES = ("basicsr_ema", "basicsr_params", "bare", "dataparallel", "legacy")


def _flatten(obj: dict[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for key, value in obj.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}/"))
        elif isinstance(value, np.ndarray):
            out[f"{prefix}{key}"] = value
    return out


@pytest.mark.parametrize("name", NAMES)
def test_matches_torch(name: str) -> None:
    loaded = _flatten(load_pth(FIXTURES / f"{name}.pth"))
    with np.load(FIXTURES / f"{name}.npz") as expected:
        assert sorted(loaded) == sorted(expected.files)
        for key, want in expected.items():
            got = loaded[key]
            assert got.dtype == want.dtype and got.shape == want.shape, key
            np.testing.assert_array_equal(got, want, err_msg=key)


@pytest.mark.parametrize("name", ["basicsr_ema", "legacy"])
def test_views_and_dtypes(name: str) -> None:
    sd = load_pth(FIXTURES / f"{name}.pth")["params_ema"]
    np.testing.assert_array_equal(sd["proj.weight_t"], sd["proj.weight"].T)
    assert np.shares_memory(sd["proj.weight_t"], sd["proj.weight"])  # one torch storage
    assert sd["expanded"].strides[1] == 0
    assert sd["scalar"].shape == () and sd["empty"].shape == (0, 3)
    assert sd["bf16"].dtype == np.float32 and sd["half"].dtype == np.float16
    assert sd["relative_position_index"].dtype == np.int64
    assert sd["mask"].dtype == np.bool_ and sd["uint8"].dtype == np.uint8


def test_parameters_and_new_dtypes() -> None:
    sd = load_pth(FIXTURES / "bare.pth")
    assert isinstance(sd["param"], np.ndarray) and isinstance(sd["param_with_state"], np.ndarray)
    np.testing.assert_array_equal(sd["uint16"], np.arange(65530, 65536, dtype=np.uint16))


def test_non_tensor_values_and_no_torch_import() -> None:
    assert load_pth(FIXTURES / "legacy.pth")["iter"] == 3
    assert "torch" not in sys.modules


@pytest.mark.parametrize("name, which, first", [
    ("basicsr_ema", "params_ema", "conv_first.weight"),
    ("basicsr_params", "params", "conv_first.weight"),
    ("bare", "", "conv_first.weight"),
    ("dataparallel", "params", "conv_first.weight"),
])
def test_select_state_dict_on_checkpoints(name: str, which: str, first: str) -> None:
    sd, got_which = select_state_dict(load_pth(FIXTURES / f"{name}.pth"))
    assert got_which == which and next(iter(sd)) == first
    assert not any(k.startswith("module.") for k in sd)
    with np.load(FIXTURES / f"{name}.npz") as expected:
        prefix = f"{which}/module." if name == "dataparallel" else f"{which}/" if which else ""
        np.testing.assert_array_equal(sd[first], expected[prefix + first])


def test_select_state_dict_prefers_ema() -> None:
    a, b = np.zeros(2), np.ones(2)
    assert select_state_dict({"params": {"w": a}, "params_ema": {"w": b}})[0]["w"] is b
    assert select_state_dict({"params": {"module.w": a}}) == ({"w": a}, "params")


@pytest.mark.parametrize("obj, message", [
    ({"net_g": {"w": np.zeros(1)}, "epoch": 3}, "['net_g', 'epoch']"),
    ({"params": {"w": [1.0]}}, "obj['params'] is not a flat dict of arrays"),
    ({}, "top-level keys: []"),
    ({"module.w": np.zeros(1), "w": np.zeros(1)}, "clash"),
])
def test_select_state_dict_rejects(obj: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as info:
        select_state_dict(obj)
    assert message in str(info.value)


# --- crafted files -------------------------------------------------------------------------

def _str(s: str) -> bytes:
    return b"X" + struct.pack("<I", len(s.encode())) + s.encode()


def _int(i: int) -> bytes:
    return b"J" + struct.pack("<i", i)


def _tuple(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


def _global(module: str, name: str) -> bytes:
    return f"c{module}\n{name}\n".encode()


def _tensor_pickle(offset: int, size: tuple[int, ...], stride: tuple[int, ...],
                   numel: int) -> bytes:
    """Protocol-2 opcodes for {'w': tensor} the way torch.save writes a float32 tensor."""
    storage = _tuple(_str("storage"), _global("torch", "FloatStorage"), _str("0"), _str("cpu"),
                     _int(numel)) + b"Q"
    hooks = _global("collections", "OrderedDict") + b")R"
    args = _tuple(storage, _int(offset), _tuple(*map(_int, size)), _tuple(*map(_int, stride)),
                  b"\x89", hooks)
    return b"\x80\x02}" + _str("w") + _global("torch._utils", "_rebuild_tensor_v2") + args + b"Rs."


def _write_zip(path: Path, data_pkl: bytes, storage: bytes = b"") -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", data_pkl)
        zf.writestr("archive/byteorder", "little")
        zf.writestr("archive/data/0", storage)
    return path


def test_crafted_tensor_pickle(tmp_path: Path) -> None:
    storage = np.arange(12, dtype="<f4")
    path = _write_zip(tmp_path / "ok.pth", _tensor_pickle(1, (3, 2), (1, 4), 12), storage.tobytes())
    expected = [[storage[1 + i + 4 * j] for j in range(2)] for i in range(3)]
    np.testing.assert_array_equal(load_pth(path)["w"], expected)


@pytest.mark.parametrize("offset, size, stride", [
    (0, (13,), (1,)),          # longer than the storage
    (12, (1,), (1,)),          # offset at the end
    (0, (3, 4), (4, 2)),       # strides reach past the end
    (0, (2,), (-1,)),          # negative stride
])
def test_out_of_bounds_tensor_is_refused(tmp_path: Path, offset: int, size: tuple[int, ...],
                                         stride: tuple[int, ...]) -> None:
    path = _write_zip(tmp_path / "oob.pth", _tensor_pickle(offset, size, stride, 12),
                      np.zeros(12, "<f4").tobytes())
    with pytest.raises(ValueError, match="oob.pth") as info:
        load_pth(path)
    assert not isinstance(info.value, UnsafeCheckpointError)


def test_storage_size_mismatch_is_refused(tmp_path: Path) -> None:
    path = _write_zip(tmp_path / "short.pth", _tensor_pickle(0, (12,), (1,), 12), b"\0" * 40)
    with pytest.raises(ValueError, match="does not hold 48 bytes"):
        load_pth(path)


class _Payload:
    """Unpickling this runs `func(arg)`, as a malicious checkpoint would."""

    def __init__(self, func: Any, arg: str) -> None:
        self.func, self.arg = func, arg

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return self.func, (self.arg,)


def _malicious(kind: str, marker: Path) -> tuple[bytes, str]:
    """(pickle bytes that would create `marker` if run, the refused 'module.name')."""
    if kind == "os.system":
        return pickle.dumps(_Payload(os.system, f"touch {marker}"), protocol=2), \
            f"{os.system.__module__}.system"
    if kind == "nested-eval":
        payload = _Payload(eval, f"open({str(marker)!r}, 'w').close()")
        checkpoint = {"params_ema": {"conv.weight": payload}, "iter": 1}
        return pickle.dumps(checkpoint, protocol=2, fix_imports=False), "builtins.eval"
    assert kind == "handcrafted-exec"
    code = f"open({str(marker)!r}, 'w').close()"
    return b"\x80\x02" + _global("builtins", "exec") + _tuple(_str(code)) + b"R.", "builtins.exec"


@pytest.mark.parametrize("container", ["zip", "legacy"])
@pytest.mark.parametrize("kind", ["os.system", "nested-eval", "handcrafted-exec"])
def test_malicious_pickle_is_refused(tmp_path: Path, kind: str, container: str) -> None:
    marker = tmp_path / "pwned"
    data, refused = _malicious(kind, marker)
    path = tmp_path / "evil.pth"
    if container == "zip":
        _write_zip(path, data)
    else:
        path.write_bytes(data)
    with pytest.raises(UnsafeCheckpointError) as info:
        load_pth(path)
    assert refused in str(info.value) and "not a plain tensor checkpoint" in str(info.value)
    assert str(path) in str(info.value)
    assert not marker.exists()


def test_refused_module_is_never_imported(tmp_path: Path) -> None:
    assert "antigravity" not in sys.modules
    path = _write_zip(tmp_path / "evil.pth", b"\x80\x02" + _global("antigravity", "geohash") + b".")
    with pytest.raises(UnsafeCheckpointError, match="antigravity.geohash"):
        load_pth(path)
    assert "antigravity" not in sys.modules


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_pth(path)


def _truncated(name: str, fraction: float) -> bytes:
    data = (FIXTURES / name).read_bytes()
    return data[: int(len(data) * fraction)]


@pytest.mark.parametrize("content", [
    pytest.param(b"", id="empty"),
    pytest.param(random.Random(0).randbytes(2000), id="random"),
    pytest.param(b"PK\x03\x04" + random.Random(1).randbytes(500), id="fake-zip"),
    pytest.param(b"\x80\x02" + random.Random(2).randbytes(500), id="fake-pickle"),
    pytest.param(pickle.dumps({"a": 1}, protocol=2), id="plain-pickle"),
    pytest.param(_truncated("basicsr_ema.pth", 0.5), id="truncated-zip"),
    pytest.param(_truncated("legacy.pth", 0.1), id="truncated-legacy-pickle"),
    pytest.param(_truncated("legacy.pth", 0.9), id="truncated-legacy-storage"),
    pytest.param((FIXTURES / "basicsr_ema.npz").read_bytes(), id="npz"),
])
def test_not_a_checkpoint(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.pth"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="bad.pth") as info:
        load_pth(path)
    assert not isinstance(info.value, UnsafeCheckpointError)


@pytest.mark.parametrize("op", [b"r" + struct.pack("<I", 0x7FFFFFFF), b"p99999999999\n"])
def test_corrupt_memo_index_is_refused_before_unpickling(tmp_path: Path, op: bytes) -> None:
    """Unchecked, the C unpickler would size its memo to the index: gigabytes."""
    path = _write_zip(tmp_path / "memo.pth", b"\x80\x02}" + op + b".")
    with pytest.raises(ValueError, match="memo index"):
        load_pth(path)


def test_top_level_must_be_a_dict(tmp_path: Path) -> None:
    path = _write_zip(tmp_path / "list.pth", pickle.dumps([1, 2], protocol=2))
    with pytest.raises(ValueError, match="expected a dict at the top level"):
        load_pth(path)


def test_legacy_storage_list_must_match(tmp_path: Path) -> None:
    data = (FIXTURES / "legacy.pth").read_bytes()
    stream = io.BytesIO(data)
    for _ in range(4):  # skip magic, protocol, sys_info and the object pickle unexecuted
        for _op in pickletools.genops(stream):
            pass
    start = stream.tell()
    keys = pickle.load(stream)
    forged = data[:start] + pickle.dumps(keys[1:], protocol=2) + data[stream.tell():]
    path = tmp_path / "forged.pth"
    path.write_bytes(forged)
    with pytest.raises(ValueError, match="storage key list"):
        load_pth(path)


# --- hostile files: bounded time, memory and messages -------------------------------------

def _deflated_zip(path: Path, data_pkl: bytes | None, record: str, size: int,
                  declared: int | None = None) -> Path:
    """A zip with `data_pkl` (if given) and a `record` that inflates to `size` zero bytes (a
    few KB on disk); `declared`, if given, is the size its headers claim instead."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        if data_pkl is not None:
            zf.writestr("archive/data.pkl", data_pkl)
        zf.writestr("archive/byteorder", "little")
        with zf.open(record, "w") as member:
            chunk = bytes(1 << 20)
            for _ in range(size >> 20):
                member.write(chunk)
    if declared is not None:  # patch the size the central directory gives for `record`
        data = bytearray(path.read_bytes())
        name = record.encode()
        central = data.index(b"PK\x01\x02")
        while data[central + 46: central + 46 + len(name)] != name:
            central = data.index(b"PK\x01\x02", central + 4)
        struct.pack_into("<I", data, central + 24, declared)
        path.write_bytes(bytes(data))
    return path


def _peak_bytes(fn) -> int:
    import tracemalloc

    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


@pytest.mark.parametrize("case", ["pickle", "storage", "understated"])
def test_zip_bomb_costs_little_memory(tmp_path: Path, case: str) -> None:
    """64 MB of zeros deflate to 64 KB; reading must not inflate them all."""
    size = 64 << 20
    numel = size // 4
    pkl = _tensor_pickle(0, (numel,), (1,), numel)
    if case == "pickle":
        path = _deflated_zip(tmp_path / "bomb.pth", None, "archive/data.pkl", size)
    elif case == "storage":
        path = _deflated_zip(tmp_path / "bomb.pth", pkl, "archive/data/0", size)
    else:  # the headers claim 4 MB; the deflate stream holds 64 MB
        pkl = _tensor_pickle(0, (1 << 20,), (1,), 1 << 20)
        path = _deflated_zip(tmp_path / "bomb.pth", pkl, "archive/data/0", size, 4 << 20)
    assert path.stat().st_size < 200_000

    def load() -> None:
        with pytest.raises(ValueError, match="bomb.pth"):
            load_pth(path)

    assert _peak_bytes(load) < 16 << 20


def test_a_stored_checkpoint_is_not_a_zip_bomb(tmp_path: Path) -> None:
    storage = np.arange(1 << 20, dtype="<f4")  # 4 MB, stored uncompressed as torch.save does
    path = _write_zip(tmp_path / "big.pth", _tensor_pickle(0, (1 << 20,), (1,), 1 << 20),
                      storage.tobytes())
    np.testing.assert_array_equal(load_pth(path)["w"], storage)


def _ordered_dict_copies(items: int, copies: int) -> bytes:
    """OrderedDict(d) again and again: quadratic work from a linear pickle."""
    keys = b"".join(b"M" + struct.pack("<H", i) + b"N" for i in range(items))
    return (b"\x80\x02ccollections\nOrderedDict\nq\x01}q\x00(" + keys + b"u"
            + b"h\x01h\x00\x85R0" * copies + b"}.")


def _state_copies(items: int, copies: int) -> bytes:
    """One BUILD state applied to many OrderedDicts: each would get its own copy."""
    keys = b"".join(b"X\x04\x00\x00\x00" + b"%04d" % i + b"N" for i in range(items))
    return (b"\x80\x02}q\x00(" + keys + b"u0ccollections\nOrderedDict\nq\x01(" +
            b"h\x01)Rh\x00b" * copies + b"l0}.")


def test_opcode_flood_costs_little_time_and_memory(tmp_path: Path) -> None:
    import time

    path = _write_zip(tmp_path / "copies.pth", _ordered_dict_copies(3000, 3000))
    start = time.process_time()
    with pytest.raises(ValueError, match="OrderedDict built from arguments"):
        load_pth(path)
    assert time.process_time() - start < 0.5
    path = _write_zip(tmp_path / "states.pth", _state_copies(2000, 2000))
    assert path.stat().st_size < 50_000
    assert _peak_bytes(lambda: load_pth(path)) < 8 << 20


def test_pickle_length_and_opcode_count_are_bounded(tmp_path: Path, monkeypatch) -> None:
    from iet_jax.io import pth

    monkeypatch.setattr(pth, "MAX_PICKLE_OPS", 1000)
    path = _write_zip(tmp_path / "ops.pth", b"\x80\x02" + b"N0" * 1000 + b"}.")
    with pytest.raises(ValueError, match="more than 1000 opcodes"):
        load_pth(path)
    monkeypatch.setattr(pth, "MAX_PICKLE_OPS", 10_000)
    monkeypatch.setattr(pth, "MAX_PICKLE_BYTES", 1000)
    path = _write_zip(tmp_path / "long.pth", b"\x80\x02" + b"N0" * 1000 + b"}.")
    with pytest.raises(ValueError, match="longer than 1000 bytes"):
        load_pth(path)
    legacy = tmp_path / "long_legacy.pth"
    legacy.write_bytes(b"\x80\x02" + b"N0" * 1000 + b"}.")
    with pytest.raises(ValueError, match="longer than 1000 bytes"):
        load_pth(legacy)
    monkeypatch.undo()
    load_pth(FIXTURES / "basicsr_ema.pth")  # real checkpoints are far below the bounds


def test_shared_tuple_as_dict_key_is_refused_before_hashing(tmp_path: Path) -> None:
    """x = None; 28 times x = (x, x): hashing x visits 2**28 items (seconds; hours at 40)."""
    import time

    key = b"Nq\x000" + b"h\x00h\x00\x86q\x000" * 28
    for kind, data in [("dict", b"}" + key + b"h\x00Ns"),
                       ("frozenset", b"}X\x01\x00\x00\x00s" + key + b"(h\x00\x91s")]:
        path = _write_zip(tmp_path / f"{kind}.pth", b"\x80\x04" + data + b".")
        start = time.process_time()
        with pytest.raises(ValueError, match="dict key or set member"):
            load_pth(path)
        assert time.process_time() - start < 0.5


def _dag(levels: int, memo: int, close: bytes) -> bytes:
    """x = []; then `levels` times x = [x, x] (or a tuple): 2**levels leaves in a few bytes."""
    m = bytes([memo])
    return b"]q" + m + (b"(h" + m + b"h" + m + close + b"q" + m) * levels


def test_legacy_key_list_of_nested_lists_is_refused_at_once(tmp_path: Path) -> None:
    """Comparing two such lists takes 2**levels steps: seconds here (hours at 40 levels)."""
    import time

    head = (pickle.dumps(0x1950A86A20F9469CFC6C, 2) + pickle.dumps(1001, 2)
            + pickle.dumps({"little_endian": True}, 2) + pickle.dumps({}, 2))
    keys = b"\x80\x02(" + _dag(26, 0, b"l") + _dag(26, 1, b"l") + b"l."
    path = tmp_path / "keys.pth"
    path.write_bytes(head + keys)
    start = time.process_time()
    with pytest.raises(ValueError, match="storage key list"):
        load_pth(path)
    assert time.process_time() - start < 0.5


def test_huge_persistent_id_gives_a_short_message(tmp_path: Path) -> None:
    """A persistent id of 2**22 nested tuples: its full repr is 40 MB."""
    import time

    pid = b"\x80\x02X\x01\x00\x00\x00a\x85q\x00" + b"h\x00h\x00\x86q\x00" * 22 + b"Q}."
    start = time.process_time()
    with pytest.raises(ValueError, match="unexpected persistent id") as info:
        load_pth(_write_zip(tmp_path / "pid.pth", pid))
    assert len(str(info.value)) < 1000 and time.process_time() - start < 0.5
    long_name = b"\x80\x02X" + struct.pack("<I", 10 << 20) + b"n" * (10 << 20) + b"Q}."
    with pytest.raises(ValueError, match="unexpected persistent id") as info:
        load_pth(_write_zip(tmp_path / "long.pth", long_name))
    assert len(str(info.value)) < 1000


ESC = "\x1b[32mwrote out.png\x1b[0m\r"


def test_escape_sequences_from_the_file_are_escaped(tmp_path: Path) -> None:
    path = _write_zip(tmp_path / "esc.pth", b"\x80\x02" + _global(ESC, "x") + b".")
    with pytest.raises(UnsafeCheckpointError) as info:
        load_pth(path)
    assert "\\x1b[32mwrote out.png\\x1b[0m\\r.x" in str(info.value)
    storage = _tensor_pickle(0, (1,), (1,), 1).replace(_str("0"), _str(ESC))
    path = _write_zip(tmp_path / "record.pth", storage)
    with pytest.raises(ValueError, match="no record") as info:
        load_pth(path)
    path = _write_zip(tmp_path / (ESC.strip("\r") + ".pth"), b"\x80\x02]q\x00.")
    with pytest.raises(ValueError, match="expected a dict") as info2:
        load_pth(path)
    with pytest.raises(ValueError) as info3:
        select_state_dict({ESC * 100: 1})
    for e in (info, info2, info3):
        assert "\x1b" not in str(e.value) and "\r" not in str(e.value), str(e.value)
        assert "\\x1b[32m" in str(e.value)
    assert len(str(info3.value)) < 600
