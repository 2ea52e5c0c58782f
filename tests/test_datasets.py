"""Dataset builders: every accepted folder layout, DIV2K zips, the demo, bad data.

All data is generated here (tiny images), no network. Building must not need TensorFlow.
"""

import json
import struct
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from iet_jax.conventions import imresize
from iet_jax.datasets import (BadImageError, DatasetNotBuiltError, build_command,
                              default_data_dir, open_source)
from iet_jax.datasets import build as build_mod
from iet_jax.datasets import builders, images, layouts


def smooth_image(rng, h, w, channels=3):
    """A random but natural-ish image (smooth noise), uint8."""
    small = rng.random((max(2, h // 4), max(2, w // 4), channels))
    img = imresize.imresize(small, output_shape=(h, w))
    img = (img - img.min()) / (np.ptp(img) + 1e-9)
    return np.round(img * 255).astype(np.uint8)


def save(path, arr, **kw):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, **kw)
    return path


def write_png16_rgb(path, arr16):
    """A 16-bit RGB PNG (Pillow cannot write one), built chunk by chunk."""
    h, w, _ = arr16.shape
    raw = b"".join(b"\x00" + arr16[i].astype(">u2").tobytes() for i in range(h))

    def chunk(tag, data):
        return (struct.pack(">I", len(data)) + tag + data
                + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                           + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return path


def check_pairs(src, scale, generated=True):
    for i in range(len(src)):
        ex = src[i]
        hr, lr = ex["hr"], ex["lr"]
        assert hr.dtype == np.uint8 and lr.dtype == np.uint8
        assert hr.ndim == 3 and hr.shape[2] == 3
        assert hr.shape[:2] == (lr.shape[0] * scale, lr.shape[1] * scale)
        assert isinstance(ex["name"], str)
        if generated:
            np.testing.assert_array_equal(lr, imresize.downscale(hr, scale))


def build(dataset, scale, data_dir, **kw):
    kw.setdefault("num_workers", 2)
    kw.setdefault("verbose", False)
    return builders.build(dataset, scale, data_dir=data_dir, **kw)


# ------------------------------------------------------------------ basics


def test_not_built_error_is_the_build_command(tmp_path, monkeypatch):
    with pytest.raises(DatasetNotBuiltError) as e:
        open_source("demo", "train", 4, data_dir=tmp_path)
    assert isinstance(e.value, FileNotFoundError)
    assert str(e.value) == f"python -m iet_jax.datasets.build --dataset demo --scale 4 --data-dir {tmp_path}"
    with pytest.raises(DatasetNotBuiltError, match="--dataset benchmark --name set14 --scale 3"):
        open_source("set14", None, 3, data_dir=tmp_path)
    assert "--hr-dir" in build_command("df2k", 2, tmp_path)
    assert "--dataset div2k" in build_command("div2k", 2, tmp_path)
    monkeypatch.setenv("IET_DATA_DIR", str(tmp_path / "x"))
    assert default_data_dir() == tmp_path / "x"
    monkeypatch.delenv("IET_DATA_DIR")
    assert default_data_dir() == Path("~/tensorflow_datasets").expanduser()


def test_demo_builds_without_tensorflow(tmp_path, capsys):
    train = open_source("demo", "train", 4, data_dir=tmp_path, build_demo=True)
    assert (tmp_path / "iet_demo" / "x4" / "1.0.0" / "dataset_info.json").is_file()
    assert "tensorflow" not in sys.modules  # neither building nor reading imports TF
    val = open_source("demo", "validation", 4, data_dir=tmp_path)
    assert len(train) == len(builders.DEMO_TRAIN) and len(val) == len(builders.DEMO_VALIDATION)
    assert {train[i]["name"] for i in range(len(train))} == set(builders.DEMO_TRAIN)
    check_pairs(val, 4)
    ex = train[0]
    assert ex["name"] == "astronaut" and ex["hr"].shape == (512, 512, 3)
    assert train.lr_sizes()[0] == (128, 128)
    with pytest.raises(ValueError, match="no split 'test'"):
        open_source("demo", "test", 4, data_dir=tmp_path)
    assert "tensorflow" not in sys.modules


# ------------------------------------------------------------------ folders


def test_paired_folder_hr_only_and_df2k(tmp_path):
    rng = np.random.default_rng(0)
    div = tmp_path / "DIV2K_train_HR"
    fl = tmp_path / "Flickr2K_HR"
    save(div / "0001.png", smooth_image(rng, 37, 50))      # not a multiple of 3
    save(div / "0002.png", smooth_image(rng, 30, 24))
    save(fl / "000001.png", smooth_image(rng, 25, 31))
    build("paired", 3, tmp_path / "data", name="df2k", hr_dirs=[div, fl])
    src = open_source("df2k", "train", 3, data_dir=tmp_path / "data")
    assert [src[i]["name"] for i in range(3)] == ["0001", "0002", "000001"]
    check_pairs(src, 3)
    assert src[0]["hr"].shape == (36, 48, 3)            # cropped to a multiple of 3
    np.testing.assert_array_equal(src[0]["hr"], np.asarray(Image.open(div / "0001.png"))[:36, :48])


def test_paired_folder_with_lr_folder(tmp_path):
    rng = np.random.default_rng(1)
    hr_dir, lr_dir = tmp_path / "HR", tmp_path / "LR" / "X2"
    for i in range(3):
        hr = smooth_image(rng, 21 + i, 30)                # odd heights: HR exceeds LR*2 by 1
        save(hr_dir / f"{i:04d}.png", hr)
        lr = imresize.downscale(imresize.mod_crop(hr, 2), 2)
        save(lr_dir / f"{i:04d}x2.png", lr)              # DIV2K naming
    extra = tmp_path / "extra_HR"
    save(extra / "z.png", smooth_image(rng, 12, 14))
    build_mod.main(["--dataset", "paired", "--name", "mine", "--scale", "2", "--hr-dir",
                    str(hr_dir), "--lr-dir", str(lr_dir), "--hr-dir", str(extra), "--lr-dir",
                    "none", "--data-dir", str(tmp_path / "d"), "--num-workers", "1"])
    src = open_source("mine", "train", 2, data_dir=tmp_path / "d")
    assert len(src) == 4 and src[3]["name"] == "z"
    check_pairs(src, 2)


def test_paired_folder_missing_lr_is_an_error(tmp_path):
    rng = np.random.default_rng(2)
    save(tmp_path / "HR" / "a.png", smooth_image(rng, 16, 16))
    (tmp_path / "LR").mkdir()
    save(tmp_path / "LR" / "b.png", smooth_image(rng, 8, 8))
    with pytest.raises(FileNotFoundError, match="no LR image for .*a.png"):
        build("paired", 2, tmp_path / "d", name="x", hr_dirs=[tmp_path / "HR"],
              lr_dirs=[tmp_path / "LR"])


# ------------------------------------------------------------------ benchmarks


def _bench_images(rng, n=2):
    return {f"img{i}": smooth_image(rng, 26 + 3 * i, 33) for i in range(n)}


def make_layout(root, layout, scale, rng):
    """Writes one benchmark in a given layout; returns the HR images written."""
    imgs = _bench_images(rng)
    for name, hr in imgs.items():
        lr = imresize.downscale(imresize.mod_crop(hr, scale), scale)
        if layout == "edsr":          # benchmark/Set5/HR/x.png + LR_bicubic/X4/xx4.png
            save(root / "HR" / f"{name}.png", hr)
            save(root / "LR_bicubic" / f"X{scale}" / f"{name}x{scale}.png", lr)
        elif layout == "basicsr":     # Set5/GTmod12/x.png + LRbicx4/x.png
            save(root / "GTmod12" / f"{name}.png", imresize.mod_crop(hr, 12))
            save(root / f"LRbicx{scale}" / f"{name}.png",
                 imresize.downscale(imresize.mod_crop(hr, 12), scale))
        elif layout == "srf":         # image_SRF_4/img_001_SRF_4_HR.png + _LR.png
            save(root / f"image_SRF_{scale}" / f"{name}_SRF_{scale}_HR.png",
                 imresize.mod_crop(hr, scale))
            save(root / f"image_SRF_{scale}" / f"{name}_SRF_{scale}_LR.png", lr)
        elif layout == "hr_only":
            save(root / "HR" / f"{name}.png", hr)
        elif layout == "flat":
            save(root / f"{name}.png", hr)
    return imgs


@pytest.mark.parametrize("layout", ["edsr", "basicsr", "srf", "hr_only", "flat"])
def test_benchmark_layouts(tmp_path, layout):
    rng = np.random.default_rng(3)
    scale = 4
    imgs = make_layout(tmp_path / "benchmark" / "Set5", layout, scale, rng)
    build("benchmark", scale, tmp_path / "d", name="set5", manual_dir=tmp_path / "benchmark")
    src = open_source("set5", None, scale, data_dir=tmp_path / "d")
    assert len(src) == 2
    assert [src[i]["name"] for i in range(2)] == sorted(imgs)
    check_pairs(src, scale)
    for i, name in enumerate(sorted(imgs)):
        crop = 12 if layout == "basicsr" else scale
        np.testing.assert_array_equal(src[i]["hr"], imresize.mod_crop(imgs[name], crop))


def test_benchmark_alias_and_manual_dir_is_the_folder(tmp_path):
    rng = np.random.default_rng(4)
    make_layout(tmp_path / "BSD100", "edsr", 2, rng)
    build("benchmark", 2, tmp_path / "d", name="b100", manual_dir=tmp_path)  # parent
    assert len(open_source("b100", "test", 2, data_dir=tmp_path / "d")) == 2
    make_layout(tmp_path / "u", "srf", 3, rng)
    build("benchmark", 3, tmp_path / "d", name="urban100", manual_dir=tmp_path / "u")
    assert len(open_source("urban100", "test", 3, data_dir=tmp_path / "d")) == 2
    with pytest.raises(ValueError, match="unknown benchmark"):
        build("benchmark", 2, tmp_path / "d", name="set6", manual_dir=tmp_path)


# The official test data (every options/test/*.yml): TestDataSR/HR/<Set>/x{s}/<file> with
# TestDataSR/LR/LRBI/<Set>/x{s}/<file>, the LR file named exactly as the HR file.
OFFICIAL_SETS = {"Set5": {"baby": (26, 32), "bird": (27, 33)},   # bird: not a multiple
                 "B100": {"3096": (24, 30), "8023": (30, 24), "12084": (18, 36)}}


def make_official(root, scales, rng):
    """Writes a tiny TestDataSR; returns {(set, scale, name): (HR written, LR written)}."""
    written = {}
    for set_name, sizes in OFFICIAL_SETS.items():
        for name, (h, w) in sizes.items():
            hr = smooth_image(rng, h, w)          # one image per name, for all scales
            for s in scales:
                lr = imresize.downscale(imresize.mod_crop(hr, s), s)
                save(root / "HR" / set_name / f"x{s}" / f"{name}.png", hr)
                save(root / "LR" / "LRBI" / set_name / f"x{s}" / f"{name}.png", lr)
                written[set_name, s, name] = hr, lr
    return written


def build_cli(*args):
    return build_mod.main(["--dataset", "benchmark", "--num-workers", "1", *map(str, args)])


def test_official_testdatasr_layout(tmp_path, capsys):
    rng = np.random.default_rng(11)
    root = tmp_path / "datasets" / "TestDataSR"
    written = make_official(root, (2, 3), rng)
    # No --name: every set found is built, at each scale.
    assert build_cli("--manual-dir", root, "--scale", "2", "--scale", "3",
                     "--data-dir", tmp_path / "d") == 0
    assert "official HR/Set5/x3/ + LR/LRBI/Set5/x3/" in capsys.readouterr().out
    for set_name, bench in (("Set5", "set5"), ("B100", "b100")):
        for s in (2, 3):
            src = open_source(bench, None, s, data_dir=tmp_path / "d")
            names = sorted(OFFICIAL_SETS[set_name])       # sorted as file names
            assert [src[i]["name"] for i in range(len(src))] == names
            for i, name in enumerate(names):
                hr, lr = written[set_name, s, name]
                h, w = OFFICIAL_SETS[set_name][name]
                assert src[i]["lr"].shape == (h // s, w // s, 3)
                assert src[i]["hr"].shape == (h // s * s, w // s * s, 3)
                np.testing.assert_array_equal(src[i]["hr"], hr[: h // s * s, : w // s * s])
                lr_file = root / "LR" / "LRBI" / set_name / f"x{s}" / f"{name}.png"
                np.testing.assert_array_equal(src[i]["lr"], np.asarray(Image.open(lr_file)))
                np.testing.assert_array_equal(src[i]["lr"], lr)
    for bench in ("set14", "urban100", "manga109"):
        with pytest.raises(DatasetNotBuiltError):
            open_source(bench, None, 2, data_dir=tmp_path / "d")
    # --name with the parent folder finds TestDataSR below it.
    build("benchmark", 2, tmp_path / "d2", name="b100", manual_dir=tmp_path / "datasets")
    src = open_source("b100", None, 2, data_dir=tmp_path / "d2")
    assert [src[i]["name"] for i in range(3)] == ["12084", "3096", "8023"]
    assert "LR/LRBI/B100/x2" in src.description


def _remove(path):
    import shutil
    shutil.rmtree(path) if path.is_dir() else path.unlink()


@pytest.mark.parametrize("case,args,problem,fix", [
    ("no_lr_set", ["--name", "b100", "--scale", "2"],
     "TestDataSR/HR/B100 has no LR folder", "images in {root}/LR/LRBI/B100/x2"),
    ("no_scale", ["--name", "set5", "--scale", "4"],
     "HR/Set5 has no x4 folder (it has x2, x3)", "or build another --scale"),
    ("no_lr_scale", ["--name", "set5", "--scale", "3"],
     "LR/LRBI/Set5 has no x3 folder", "add {root}/LR/LRBI/Set5/x3"),
    ("hr_unpaired", ["--name", "set5", "--scale", "2"],
     "no LR image for {root}/HR/Set5/x2/bird.png", "add it or remove the HR image"),
    ("lr_unpaired", ["--name", "set5", "--scale", "2"],
     "LR image {root}/LR/LRBI/Set5/x2/extra.png has no HR image", "remove the LR image"),
    ("lr_suffix", ["--name", "set5", "--scale", "2"],
     "no LR image for {root}/HR/Set5/x2/baby.png: expected {root}/LR/LRBI/Set5/x2/baby.png",
     "add it"),
    ("lr_size", ["--name", "set5", "--scale", "2"],
     "LR size 5x5 does not match HR", "--skip-bad"),
    ("no_set", ["--name", "set14", "--scale", "2"],
     "HR has no folder for set14", "benchmarks there: set5, b100"),
    ("hr_dir_given", ["--name", "set5", "--scale", "2", "--manual-dir", "{root}/HR"],
     "holds x<s> folders", "give --manual-dir the TestDataSR folder"),
])
def test_official_layout_mistakes_are_one_line(tmp_path, capsys, case, args, problem, fix):
    root = tmp_path / "TestDataSR"
    make_official(root, (2, 3), np.random.default_rng(12))
    lrbi = root / "LR" / "LRBI"
    if case == "no_lr_set":
        _remove(lrbi / "B100")
    elif case == "no_lr_scale":
        _remove(lrbi / "Set5" / "x3")
    elif case == "hr_unpaired":
        _remove(lrbi / "Set5" / "x2" / "bird.png")
    elif case == "lr_unpaired":
        save(lrbi / "Set5" / "x2" / "extra.png", np.zeros((8, 8, 3), np.uint8))
    elif case == "lr_suffix":            # EDSR-style names are not the official layout's
        (lrbi / "Set5" / "x2" / "baby.png").rename(lrbi / "Set5" / "x2" / "babyx2.png")
    elif case == "lr_size":
        save(lrbi / "Set5" / "x2" / "baby.png", np.zeros((5, 5, 3), np.uint8))
    args = [a.format(root=root) for a in args]
    if "--manual-dir" not in args:
        args += ["--manual-dir", str(root)]
    capsys.readouterr()
    assert build_cli(*args, "--data-dir", tmp_path / "d") == 1
    err = capsys.readouterr().err
    assert err.count("error: ") == 1, err        # (TFDS's progress bars come before it)
    line = err[err.index("error: "):]
    assert line.endswith("\n") and line.count("\n") == 1, err
    assert problem.format(root=root) in line and fix.format(root=root) in line, line


def test_benchmark_without_name_builds_every_folder_found(tmp_path, capsys):
    rng = np.random.default_rng(13)
    make_layout(tmp_path / "benchmark" / "Set5", "edsr", 4, rng)
    make_layout(tmp_path / "benchmark" / "urban100", "srf", 4, rng)
    assert build_cli("--manual-dir", tmp_path / "benchmark", "--data-dir", tmp_path / "d") == 0
    assert len(open_source("set5", None, 4, data_dir=tmp_path / "d")) == 2
    assert len(open_source("urban100", None, 4, data_dir=tmp_path / "d")) == 2
    with pytest.raises(DatasetNotBuiltError):
        open_source("set14", None, 4, data_dir=tmp_path / "d")
    (tmp_path / "empty").mkdir()
    capsys.readouterr()
    assert build_cli("--manual-dir", tmp_path / "empty", "--data-dir", tmp_path / "d") == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "no benchmark found in" in err and "--name" in err


# ------------------------------------------------------------------ DIV2K


def test_div2k_from_zips(tmp_path):
    rng = np.random.default_rng(5)
    manual = tmp_path / "manual"
    manual.mkdir()
    scale = 2
    for tag, ids in (("train", ["0001", "0002"]), ("valid", ["0801"])):
        with zipfile.ZipFile(manual / f"DIV2K_{tag}_HR.zip", "w") as zh, \
                zipfile.ZipFile(manual / f"DIV2K_{tag}_LR_bicubic_X{scale}.zip", "w") as zl:
            for i in ids:
                hr = smooth_image(rng, 20, 28)
                lr = imresize.downscale(hr, scale)
                zh.writestr(f"DIV2K_{tag}_HR/{i}.png", images.encode_png(hr))
                zl.writestr(f"DIV2K_{tag}_LR_bicubic/X{scale}/{i}x{scale}.png",
                            images.encode_png(lr))
    build("div2k", scale, tmp_path / "d", manual_dir=manual)
    train = open_source("div2k", "train", scale, data_dir=tmp_path / "d")
    val = open_source("div2k", "validation", scale, data_dir=tmp_path / "d")
    assert [train[i]["name"] for i in range(2)] == ["0001", "0002"] and len(val) == 1
    check_pairs(train, scale)
    with pytest.raises(FileNotFoundError, match="DIV2K_train_HR.zip"):
        build("div2k", scale, tmp_path / "d2", manual_dir=tmp_path)


# ------------------------------------------------------------------ bad data


def test_image_reader_conversions_and_refusals(tmp_path):
    rng = np.random.default_rng(6)
    rgb = smooth_image(rng, 12, 10)
    gray = rgb[..., 0]
    np.testing.assert_array_equal(images.load_rgb(save(tmp_path / "g.png", gray)),
                                  np.repeat(gray[..., None], 3, 2))
    rgba = np.concatenate([rgb, np.full((12, 10, 1), 7, np.uint8)], 2)
    np.testing.assert_array_equal(images.load_rgb(save(tmp_path / "a.png", rgba)), rgb)
    la = np.stack([gray, gray], -1)
    np.testing.assert_array_equal(images.load_rgb(save(tmp_path / "la.png", la)),
                                  np.repeat(gray[..., None], 3, 2))
    pal = Image.fromarray(rgb).convert("P")
    pal.save(tmp_path / "p.png")
    np.testing.assert_array_equal(images.load_rgb(tmp_path / "p.png"),
                                  np.asarray(pal.convert("RGB")))
    with pytest.raises(BadImageError, match="16-bit PNG"):
        images.load_rgb(write_png16_rgb(tmp_path / "d16.png",
                                        rng.integers(0, 65535, (4, 5, 3))))
    with pytest.raises(BadImageError, match="16-bit PNG"):
        images.load_rgb(save(tmp_path / "g16.png", (gray.astype(np.uint16) * 257)))
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    with pytest.raises(BadImageError, match="junk.png"):
        images.load_rgb(tmp_path / "junk.png")
    data = (tmp_path / "a.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(BadImageError, match="trunc.png.*(corrupt|truncated)"):
        images.load_rgb(tmp_path / "trunc.png")
    save(tmp_path / "j.jpg", rgb, quality=95)
    jdata = (tmp_path / "j.jpg").read_bytes()
    (tmp_path / "tj.jpg").write_bytes(jdata[: len(jdata) // 2])
    with pytest.raises(BadImageError, match="tj.jpg"):
        images.load_rgb(tmp_path / "tj.jpg")


def _bad_folder(tmp_path, rng):
    hr, lr = tmp_path / "HR", tmp_path / "LR"
    good = {}
    for name in ("good1", "good2"):
        good[name] = smooth_image(rng, 16, 20)
        save(hr / f"{name}.png", good[name])
        save(lr / f"{name}.png", imresize.downscale(good[name], 4))
    # grayscale and RGBA are converted, not bad
    g = smooth_image(rng, 16, 16, 1)[..., 0]
    save(hr / "gray.png", g)
    save(lr / "gray.png", imresize.downscale(g, 4))
    rgba = np.concatenate([smooth_image(rng, 16, 16), np.full((16, 16, 1), 255, np.uint8)], 2)
    save(hr / "rgba.png", rgba)
    save(lr / "rgba.png", imresize.downscale(rgba[..., :3], 4))
    # bad ones
    (hr / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    save(lr / "corrupt.png", np.zeros((4, 4, 3), np.uint8))
    data = (hr / "good1.png").read_bytes()
    (hr / "trunc.png").write_bytes(data[:60])
    save(lr / "trunc.png", np.zeros((4, 5, 3), np.uint8))
    write_png16_rgb(hr / "deep.png", rng.integers(0, 65535, (16, 16, 3)))
    save(lr / "deep.png", np.zeros((4, 4, 3), np.uint8))
    save(hr / "mismatch.png", smooth_image(rng, 16, 16))
    save(lr / "mismatch.png", np.zeros((5, 4, 3), np.uint8))   # not 16/4
    return hr, lr, good


def test_bad_data_fails_naming_the_file(tmp_path):
    hr, lr, _ = _bad_folder(tmp_path, np.random.default_rng(7))
    with pytest.raises(BadImageError) as e:
        build("paired", 4, tmp_path / "d", name="bad", hr_dirs=[hr], lr_dirs=[lr])
    assert "corrupt.png" in str(e.value) and "--skip-bad" in str(e.value)
    # each bad case alone gives its own message
    cases = {"trunc": "truncated|corrupt", "deep": "16-bit", "mismatch": "does not match HR"}
    for name, msg in cases.items():
        item = layouts.Item(name, layouts.Source.file(hr / f"{name}.png"),
                            layouts.Source.file(lr / f"{name}.png"))
        with pytest.raises(BadImageError, match=msg) as e:
            builders.make_examples(item, 4)
        assert f"{name}.png" in str(e.value)
    tiny = layouts.Item("t", layouts.Source.array("tiny", lambda: np.zeros((3, 9, 3), np.uint8)))
    with pytest.raises(BadImageError, match="smaller than the scale"):
        builders.make_examples(tiny, 4)


def test_bad_data_skipped_and_counted(tmp_path, capsys):
    hr, lr, good = _bad_folder(tmp_path, np.random.default_rng(8))
    build_mod.main(["--dataset", "paired", "--name", "bad", "--scale", "4", "--hr-dir", str(hr),
                    "--lr-dir", str(lr), "--data-dir", str(tmp_path / "d"), "--skip-bad",
                    "--num-workers", "2"])
    printed = capsys.readouterr().out
    assert "skipped 4 bad image(s)" in printed
    src = open_source("bad", "train", 4, data_dir=tmp_path / "d")
    names = sorted(src[i]["name"] for i in range(len(src)))
    assert names == ["good1", "good2", "gray", "rgba"]
    ex = {src[i]["name"]: src[i] for i in range(len(src))}
    np.testing.assert_array_equal(ex["good1"]["hr"], good["good1"])
    g = ex["gray"]["hr"]
    assert (g[..., 0] == g[..., 1]).all() and (g[..., 1] == g[..., 2]).all()
    md = json.loads((tmp_path / "d" / "iet_bad" / "x4" / "1.0.0" / "metadata.json").read_text())
    assert md["num_skipped"] == {"train": 4}
    assert sorted(d["name"] for d in md["skipped"]["train"]) == ["corrupt", "deep", "mismatch",
                                                                 "trunc"]
    assert "Skipped 4 bad image(s)" in src.description and "deep.png" in src.description


def test_subimages(tmp_path):
    rng = np.random.default_rng(10)
    hr_dir = tmp_path / "HR"
    big = smooth_image(rng, 50, 38)
    save(hr_dir / "a.png", big)
    save(hr_dir / "b.png", smooth_image(rng, 14, 16))   # smaller than a sub-image: kept whole
    build("paired", 2, tmp_path / "d", name="sub", hr_dirs=[hr_dir], subimage=20,
          subimage_step=12)
    src = open_source("sub", "train", 2, data_dir=tmp_path / "d")
    names = [src[i]["name"] for i in range(len(src))]
    # rows: 0, 12, 24, 30 (flush); cols: 0, 12, 18 (flush)
    assert names == [f"a_s{k:03d}" for k in range(1, 13)] + ["b_s001"]
    check_pairs(src, 2, generated=False)
    full_lr = imresize.downscale(big, 2)
    ex = src[names.index("a_s012")]
    np.testing.assert_array_equal(ex["hr"], big[30:50, 18:38])
    np.testing.assert_array_equal(ex["lr"], full_lr[15:25, 9:19])
    assert src[12]["hr"].shape == (14, 16, 3)
    assert src.metadata["subimage"] == {"size": 20, "step": 12}
    with pytest.raises(ValueError, match="multiples of the scale 3"):
        build("paired", 3, tmp_path / "d", name="sub", hr_dirs=[hr_dir], subimage=20)


def test_reads_a_build_in_tfds_div2k_layout(tmp_path):
    """TFDS's own div2k (<data_dir>/div2k/bicubic_x4/2.0.0, features lr/hr, HR not cropped)."""
    import tensorflow_datasets as tfds

    rng = np.random.default_rng(11)
    hrs = [smooth_image(rng, 18, 22), smooth_image(rng, 17, 21)]

    class Div2k(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("2.0.0")
        BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="bicubic_x4")]
        code_path = Path(__file__)

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
                {"lr": tfds.features.Image(), "hr": tfds.features.Image()}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, hr in enumerate(hrs):
                lr = imresize.downscale(imresize.mod_crop(hr, 4), 4)
                yield str(i), {"hr": images.encode_png(hr), "lr": images.encode_png(lr)}

    Div2k(data_dir=str(tmp_path), config="bicubic_x4",
          file_format="array_record").download_and_prepare()
    src = open_source("div2k", "train", 4, data_dir=tmp_path)
    assert len(src) == 2 and src.lr_sizes() is None
    assert [src[i]["hr"].shape for i in range(2)] == [(16, 20, 3)] * 2  # cropped to LR*4
    assert [src[i]["name"] for i in range(2)] == ["train_0000", "train_0001"]
    check_pairs(src, 4)


def test_raw_storage_reads_the_same_pixels(tmp_path):
    rng = np.random.default_rng(12)
    hr_dir = tmp_path / "HR"
    for i in range(2):
        save(hr_dir / f"{i}.png", smooth_image(rng, 24, 20 + 4 * i))
    build("paired", 4, tmp_path / "png", name="t", hr_dirs=[hr_dir])
    build("paired", 4, tmp_path / "raw", name="t", hr_dirs=[hr_dir], storage="raw",
          subimage=16, subimage_step=16)
    build("paired", 4, tmp_path / "rawfull", name="t", hr_dirs=[hr_dir], storage="raw")
    png = open_source("t", "train", 4, data_dir=tmp_path / "png")
    raw = open_source("t", "train", 4, data_dir=tmp_path / "rawfull")
    sub = open_source("t", "train", 4, data_dir=tmp_path / "raw")
    assert raw.metadata["storage"] == "raw" and len(sub) == 2 * 2 + 2 * 2
    for i in range(2):
        for k in ("hr", "lr", "name"):
            np.testing.assert_array_equal(raw[i][k], png[i][k])
    np.testing.assert_array_equal(sub[0]["hr"], png[0]["hr"][:16, :16])
    check_pairs(sub, 4, generated=False)


# ------------------------------------------------------------------ rebuilding (issue #12)


def _main(args, capsys):
    """Run the build command line; (exit code, stdout, its error line or '')."""
    rc = build_mod.main(args)
    out = capsys.readouterr()
    # stderr also holds TFDS's progress bars; ours is one line starting with 'error:'
    errors = [line for line in out.err.splitlines() if line.startswith("error:")]
    assert len(errors) <= 1 and "Traceback" not in out.err
    assert (rc == 0) == (not errors)
    return rc, out.out, "".join(errors)


def test_rebuild_from_other_sources_is_refused_unless_overwrite(tmp_path, capsys):
    rng = np.random.default_rng(20)
    a, b = tmp_path / "A", tmp_path / "B"
    for i in range(3):
        save(a / f"a{i}.png", smooth_image(rng, 16, 16))
    for i in range(5):
        save(b / f"b{i}.png", smooth_image(rng, 16, 16))
    data = tmp_path / "d"
    base = ["--dataset", "paired", "--name", "mine", "--scale", "4", "--data-dir", str(data),
            "--num-workers", "1"]
    rc, out, _ = _main(base + ["--hr-dir", str(a)], capsys)
    assert rc == 0 and "built" in out
    info = data / "iet_mine" / "x4" / "1.0.0" / "dataset_info.json"
    stamp = info.stat().st_mtime_ns
    # the same sources: the fast path, the build untouched
    rc, out, _ = _main(base + ["--hr-dir", str(a)], capsys)
    assert rc == 0 and "up to date" in out and info.stat().st_mtime_ns == stamp
    # other folders: refused in one line naming --overwrite; the old build is kept
    rc, out, err = _main(base + ["--hr-dir", str(b)], capsys)
    assert rc == 1 and "--overwrite" in err and "3 then, 5 now" in err
    assert len(open_source("mine", "train", 4, data_dir=data)) == 3
    # other options: refused, naming them
    rc, _, err = _main(base + ["--hr-dir", str(a), "--storage", "raw"], capsys)
    assert rc == 1 and "storage png then, raw now" in err and "--overwrite" in err
    # --overwrite rebuilds from the new folders
    rc, out, _ = _main(base + ["--hr-dir", str(b), "--overwrite"], capsys)
    assert rc == 0 and "built" in out
    assert len(open_source("mine", "train", 4, data_dir=data)) == 5
    # a file changed in place (same name, new content): refused
    save(b / "b0.png", smooth_image(rng, 20, 20))
    rc, _, err = _main(base + ["--hr-dir", str(b)], capsys)
    assert rc == 1 and "other source files (5 then, 5 now" in err
    # a build without a fingerprint (older iet-jax) cannot be trusted to match
    _main(base + ["--hr-dir", str(b), "--overwrite"], capsys)
    md_file = info.parent / "metadata.json"
    md = json.loads(md_file.read_text())
    del md["sources"]
    md_file.write_text(json.dumps(md))
    rc, _, err = _main(base + ["--hr-dir", str(b)], capsys)
    assert rc == 1 and "no fingerprint" in err and "--overwrite" in err


def test_overwrite_drops_the_old_builds_metadata(tmp_path):
    rng = np.random.default_rng(21)
    save(tmp_path / "HR" / "a.png", smooth_image(rng, 40, 40))
    build("paired", 4, tmp_path / "d", name="t", hr_dirs=[tmp_path / "HR"], subimage=20,
          subimage_step=20)
    build("paired", 4, tmp_path / "d", name="t", hr_dirs=[tmp_path / "HR"], overwrite=True)
    src = open_source("t", "train", 4, data_dir=tmp_path / "d")
    assert len(src) == 1 and "subimage" not in src.metadata


# ------------------------------------------------------------------ hostile images (issue #12)


def _exif(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def test_exif_orientation_is_honoured_by_builds_and_upscale(tmp_path):
    from PIL import ImageOps

    from iet_jax.evaluation import pictures

    rng = np.random.default_rng(22)
    stored = smooth_image(rng, 16, 24)               # as the sensor wrote it: 16 high, 24 wide
    hr_dir = tmp_path / "HR"
    hr_dir.mkdir()
    Image.fromarray(stored).save(hr_dir / "phone.jpg", quality=95, exif=_exif(6))
    Image.fromarray(stored).save(hr_dir / "scan.png", exif=_exif(8))  # an 8-bit RGB PNG
    upright = {}
    for name in ("phone.jpg", "scan.png"):
        with Image.open(hr_dir / name) as im:
            upright[name] = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
        assert upright[name].shape == (24, 16, 3)
        # upscale's reader and the builders' read the same upright pixels
        pic = pictures.read_picture(hr_dir / name)
        np.testing.assert_array_equal(np.round(pic.rgb * 255).astype(np.uint8), upright[name])
        np.testing.assert_array_equal(images.load_rgb(hr_dir / name), upright[name])
    build("paired", 4, tmp_path / "d", name="exif", hr_dirs=[hr_dir])
    src = open_source("exif", "train", 4, data_dir=tmp_path / "d")
    got = {src[i]["name"]: src[i]["hr"] for i in range(len(src))}
    np.testing.assert_array_equal(got["phone"], upright["phone.jpg"])
    np.testing.assert_array_equal(got["scan"], upright["scan.png"])  # not the PNG's bytes as is


def test_every_exif_orientation_turns_like_pillow(tmp_path):
    from PIL import ImageOps

    rgb = np.random.default_rng(23).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    for orientation in range(1, 9):
        path = save(tmp_path / f"o{orientation}.png", rgb, exif=_exif(orientation))
        with Image.open(path) as im:
            want = np.asarray(ImageOps.exif_transpose(im))
        np.testing.assert_array_equal(images.load_rgb(path), want)
        np.testing.assert_array_equal(images.upright(rgb, orientation), want)
        assert images.exif_orientation(path) == orientation


def _png_header_only(width, height, depth=8, colour=2):
    """A PNG that claims width x height pixels: signature, IHDR, a tiny IDAT, IEND."""
    def chunk(tag, data):
        return (struct.pack(">I", len(data)) + tag + data
                + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def test_decompression_bomb_is_a_bad_image_skipped_with_skip_bad(tmp_path, capsys):
    bomb = _png_header_only(20000, 20000)
    assert len(bomb) < 100
    with pytest.raises(BadImageError, match="20000x20000 is 400000000 pixels, more than"):
        images.decode_rgb(bomb, "bomb.png")
    rng = np.random.default_rng(24)
    hr = tmp_path / "HR"
    save(hr / "good.png", smooth_image(rng, 16, 16))
    (hr / "bomb.png").write_bytes(bomb)
    save(hr / "huge.jpg", smooth_image(rng, 16, 16))
    base = ["--dataset", "paired", "--name", "b", "--scale", "4", "--hr-dir", str(hr),
            "--data-dir", str(tmp_path / "d"), "--num-workers", "1"]
    rc, _, err = _main(base + ["--max-pixels", "200"], capsys)  # 16x16 is 256 pixels
    assert rc == 1 and "--skip-bad" in err and "more than the limit of 200" in err
    rc, out, _ = _main(base + ["--skip-bad"], capsys)
    assert rc == 0 and "skipped 1 bad image(s)" in out and "bomb.png" in out
    src = open_source("b", "train", 4, data_dir=tmp_path / "d")
    assert sorted(src[i]["name"] for i in range(len(src))) == ["good", "huge"]


def test_pixel_limit_is_the_module_default_for_every_reader(tmp_path, monkeypatch):
    from iet_jax.evaluation import pictures

    path = save(tmp_path / "a.png", np.zeros((10, 12, 3), np.uint8))
    monkeypatch.setattr(images, "MAX_PIXELS", 100)
    with pytest.raises(BadImageError, match="10x12|12x10"):
        images.load_rgb(path)
    with pytest.raises(BadImageError, match="120 pixels"):
        pictures.read_picture(path)
    assert images.load_rgb(path, max_pixels=120).shape == (10, 12, 3)


def test_huge_16bit_png_header_is_refused_before_decoding(tmp_path):
    import tracemalloc

    from iet_jax.evaluation import pictures

    path = tmp_path / "deep.png"
    path.write_bytes(_png_header_only(20000, 20000, depth=16))
    tracemalloc.start()
    try:
        with pytest.raises(BadImageError, match="400000000 pixels"):
            pictures.read_picture(path)
        with pytest.raises(BadImageError, match="400000000 pixels"):
            images.load_rgb(path)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < 10 << 20


def test_truncated_and_junk_files_are_one_line_errors(tmp_path, capsys):
    from iet_jax.evaluation import pictures

    rng = np.random.default_rng(25)
    good = save(tmp_path / "g.jpg", smooth_image(rng, 32, 32), quality=90, exif=_exif(6))
    cases = {"trunc.jpg": good.read_bytes()[:300], "empty.png": b"",
             "header.png": _png_header_only(16, 16)[:40], "junk.webp": b"RIFF\0\0\0\0WEBP"}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        for read in (images.load_rgb, pictures.read_picture):
            with pytest.raises(BadImageError, match=name):
                read(tmp_path / name)


ESC = "\x1b[32mwrote out.png\x1b[0m"


def test_escape_sequences_in_file_names_are_escaped(tmp_path, capsys):
    rng = np.random.default_rng(26)
    hr = tmp_path / "HR"
    save(hr / "good.png", smooth_image(rng, 16, 16))
    (hr / f"{ESC}.png").write_bytes(b"\x89PNG\r\n\x1a\n junk")
    base = ["--dataset", "paired", "--name", "e", "--scale", "4", "--hr-dir", str(hr),
            "--data-dir", str(tmp_path / "d"), "--num-workers", "1"]
    printed = []
    rc, out, err = _main(base, capsys)
    assert rc == 1 and "\\x1b[32mwrote out.png\\x1b[0m.png" in err
    printed += [out, err]
    rc, out, err = _main(base + ["--skip-bad"], capsys)
    assert rc == 0 and "\\x1b[32mwrote" in out
    printed += [out, err]
    lr = tmp_path / "LR"
    save(lr / "other.png", smooth_image(rng, 4, 4))
    rc, out, err = _main(base + ["--lr-dir", str(lr), "--name", "e2"], capsys)
    assert rc == 1 and "\\x1b[32mwrote" in err
    printed += [out, err]
    for text in printed:
        assert "\x1b" not in text
    src = open_source("e", "train", 4, data_dir=tmp_path / "d")
    assert "\x1b" not in src.description and "\\x1b" in src.description
    odd = tmp_path / f"HR{ESC}"  # a folder name quoted in the description
    save(odd / "a.png", smooth_image(rng, 16, 16))
    build("paired", 4, tmp_path / "d", name="e3", hr_dirs=[odd])
    src = open_source("e3", "train", 4, data_dir=tmp_path / "d")
    assert "\x1b" not in src.description and "HR\\x1b[32mwrote" in src.description
