"""python -m iet_jax.export: the artifact and its spec, the README's loader run where iet_jax
cannot be imported (against the Upscaler), and the one-line refusals."""

import contextlib
import errno
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from iet_jax import export
from iet_jax.evaluation import export as export_lib
from iet_jax.evaluation.inference import Upscaler
from iet_jax.io import files, model_dir
from tiny import photo

README = Path(__file__).resolve().parents[1] / "README.md"
LOADER_MARK = "<!-- the loader: tests/test_export.py runs the next code block -->"
TILE, OVERLAP = 12, 4  # the tiny model's minimum tile is 10

# Run first in the loader's Python: the editable install would find iet_jax, so it is blocked,
# and the block is checked.
NO_IET_JAX = """\
import sys
sys.modules["iet_jax"] = None
try:
    import iet_jax
except ImportError:
    pass
else:
    raise SystemExit("iet_jax could be imported")
"""
# Run after the loader: nothing of iet_jax was loaded, and its function on more images.
AFTER = """
assert [m for m in sys.modules if m.split(".")[0] == "iet_jax"] == ["iet_jax"]
assert sys.modules["iet_jax"] is None
for name in ("one_tile", "two_by_two", "two_by_three"):
    np.save(name + "_up.npy", upscale(np.load(name + ".npy")))
"""


def readme_loader() -> str:
    text = README.read_text()
    assert LOADER_MARK in text, "the README's loader lost its mark"
    block = re.search(r"```python\n(.*?)```", text[text.index(LOADER_MARK):], re.S)
    return block.group(1)


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tmp_path_factory):
    """(folder, exit code, printed) of `python -m iet_jax.export` on the tiny checkpoint."""
    folder = tmp_path_factory.mktemp("export")
    argv = ["--checkpoint", str(tiny_checkpoint), "--tile", str(TILE), "--tile-overlap",
            str(OVERLAP), "--output", str(folder / "model.jaxexport")]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = export.main(argv)
    return folder, code, out.getvalue()


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return model_dir.load_model(tiny_checkpoint)


def test_spec_describes_the_artifact(exported, tiny_checkpoint):
    folder, code, printed = exported
    assert code == 0, printed
    assert sorted(p.name for p in folder.iterdir()) == ["model.jaxexport", "model.json"]
    assert "model.jaxexport" in printed and "cpu" in printed
    spec = json.loads((folder / "model.json").read_text())
    assert (spec["scale"], spec["tile"], spec["batch"]) == (2, TILE, "any")
    assert spec["input"]["shape"] == ["batch", TILE, TILE, 3]
    assert spec["output"]["shape"] == ["batch", 2 * TILE, 2 * TILE, 3]
    assert spec["input"]["range"] == [0.0, 1.0] and spec["input"]["layout"] == "NHWC"
    assert spec["tiling"]["overlap"] == OVERLAP and spec["model"]["min_tile"] == 10
    assert spec["model"]["gather_impl"] == "xla"
    assert spec["checkpoint"] == str(tiny_checkpoint)
    assert spec["versions"]["jax"] == jax.__version__
    # Lowering needs no device: every platform lowers on this CPU-only machine.
    assert spec["platforms"] == ["cpu", "cuda", "rocm", "tpu"]
    assert spec["platforms_not_lowered"] == {}
    artifact = jax.export.deserialize(bytearray((folder / "model.jaxexport").read_bytes()))
    assert list(artifact.platforms) == spec["platforms"]
    (aval,) = artifact.in_avals
    assert str(aval.shape[0]) == "b" and aval.shape[1:] == (TILE, TILE, 3)
    assert aval.dtype == jnp.float32


def test_readme_loader_without_iet_jax_matches_upscaler(exported, model):
    folder, code, _ = exported
    assert code == 0
    images = {"one_tile": photo(TILE, TILE), "two_by_two": photo(20, 20, 40, 60),
              "two_by_three": photo(20, 27, 90, 30)}
    for name, image in images.items():
        np.save(folder / f"{name}.npy", image)
    rgb = (photo(20, 27) * 255).round().astype(np.uint8)
    Image.fromarray(rgb).save(folder / "photo.png")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-I", "-c", NO_IET_JAX + readme_loader() + AFTER],
                         cwd=folder, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    # One tile: the same computation as the Upscaler's (whole image, batch 1) with the
    # artifact's XLA gathers (`exportable`), to the bit on CPU; on a GPU XLA may pick other
    # algorithms for the two programs.
    one_tile = np.load(folder / "one_tile_up.npy")
    want = Upscaler(export_lib.exportable(model), tile=TILE, overlap=OVERLAP)(images["one_tile"])
    np.testing.assert_allclose(one_tile, want, rtol=0,
                               atol=0 if jax.default_backend() == "cpu" else 1e-5)
    # Several tiles: the Upscaler's tiles and blending; the loader calls a row of tiles at a
    # time, the Upscaler 4 (XLA on CPU may sum in another order for another batch size).
    for name in ("two_by_two", "two_by_three"):
        got = np.load(folder / f"{name}_up.npy")
        want = Upscaler(model, tile=TILE, overlap=OVERLAP)(images[name])
        assert got.shape == want.shape == (40, 2 * images[name].shape[1], 3)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5, err_msg=name)
    # The picture it writes.
    written = np.asarray(Image.open(folder / "photo_up.png"))
    want = Upscaler(model, tile=TILE, overlap=OVERLAP)(rgb.astype(np.float32) / 255)
    want = (np.clip(want, 0, 1) * 255).round()
    assert written.shape == (40, 54, 3)
    assert np.abs(written.astype(np.float64) - want).max() <= 1


def test_fixed_batch(model):
    blob, spec = export_lib.export_model(model, TILE, batch=3, platforms=("cpu",),
                                         overlap=OVERLAP)
    assert spec["batch"] == 3 and spec["input"]["shape"] == [3, TILE, TILE, 3]
    artifact = jax.export.deserialize(bytearray(blob))
    assert artifact.in_avals[0].shape == (3, TILE, TILE, 3)
    tiles = np.stack([photo(TILE, TILE, 10 * i, 20) for i in range(3)])
    np.testing.assert_allclose(np.asarray(artifact.call(tiles)),
                               Upscaler(model)(tiles), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="shape"):
        artifact.call(tiles[:2])


def test_platforms_that_do_not_lower_are_left_out():
    # eig lowers for CPU only: the other platforms are left out, with the reason, or refused
    # when asked for.
    forward = jax.jit(lambda x: jnp.linalg.eig(x)[0].real)
    arg = jax.ShapeDtypeStruct((3, 3), jnp.float32)
    artifact, failed = export_lib.lower(forward, arg, export_lib.PLATFORMS)
    assert artifact.platforms == ("cpu",)
    assert sorted(failed) == ["cuda", "rocm", "tpu"] and all(failed.values())
    with pytest.raises(ValueError, match="does not lower for cuda .*; leave cuda out"):
        export_lib.lower(forward, arg, ("cpu", "cuda"), strict=True)
    with pytest.raises(ValueError, match="does not lower for tpu"):
        export_lib.lower(forward, arg, ("tpu",), strict=True)


def test_refusals_are_one_line(tiny_checkpoint, tmp_path, capsys):
    def refused(*extra, checkpoint=tiny_checkpoint, output=tmp_path / "m.jaxexport"):
        argv = ["--checkpoint", str(checkpoint), "--tile", str(TILE), "--tile-overlap",
                str(OVERLAP), "--output", str(output), *extra]
        assert export.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
        return err

    assert "checkpoint directory not found" in refused(checkpoint=tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    assert "not an iet-jax model checkpoint" in refused(checkpoint=tmp_path / "empty")
    err = refused("--tile", "8")
    assert "the minimum tile is 10 LR pixels" in err and "--tile 10 or more" in err
    assert "--tile-overlap" in refused("--tile-overlap", str(TILE))
    assert "--batch must be 1 or more" in refused("--batch", "0")
    assert "unknown platform gpu" in refused("--platforms", "cpu,gpu")
    assert "is a folder" in refused(output=tmp_path)
    assert "ends in .json" in refused(output=tmp_path / "m.json")
    (tmp_path / "a_file").write_text("")
    assert "a_file is a file" in refused(output=tmp_path / "a_file" / "m.jaxexport")
    # Existing files are kept without --overwrite, replaced with it.
    (tmp_path / "m.json").write_text("old")
    assert "m.json already exists; use --overwrite" in refused()
    assert (tmp_path / "m.json").read_text() == "old"
    assert not (tmp_path / "m.jaxexport").exists()
    argv = ["--checkpoint", str(tiny_checkpoint), "--tile", str(TILE), "--tile-overlap",
            str(OVERLAP), "--output", str(tmp_path / "m.jaxexport"), "--platforms", "cpu",
            "--overwrite"]
    assert export.main(argv) == 0
    assert json.loads((tmp_path / "m.json").read_text())["platforms"] == ["cpu"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "empty", "m.jaxexport",
                                                          "m.json"]


def test_full_disk_leaves_neither_file(tmp_path, monkeypatch):
    real, calls = files._write_all, []

    def write(fd, data):  # the n-th write through iet_jax.io.files finds the disk full
        calls.append(len(data))
        if len(calls) == fail_at:
            os.write(fd, bytes(data[:10]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd, data)

    monkeypatch.setattr(files, "_write_all", write)
    for fail_at in (1, 2):  # the artifact, then the spec
        calls.clear()
        with pytest.raises(files.WriteError, match="No space left on device; free space on "
                                                   "that disk or use another --output"):
            export_lib.write_export(tmp_path / "m.jaxexport", b"\0" * 100, {"tile": 12})
        assert list(tmp_path.iterdir()) == []  # no artifact without its spec, no temporary
    export_lib.write_export(tmp_path / "m.jaxexport", b"\0" * 100, {"tile": 12})
    assert (tmp_path / "m.jaxexport").read_bytes() == b"\0" * 100
    assert json.loads((tmp_path / "m.json").read_text()) == {"tile": 12}
