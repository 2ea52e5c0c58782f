"""python -m iet_jax.upscale: file formats, grayscale, alpha, 16-bit, bad files, exit codes."""

import numpy as np
import png
import pytest
from PIL import Image

from iet_jax import upscale
from iet_jax.evaluation import inference, pictures
from iet_jax.io import model_dir
from test_inference import photo, pointwise_x3, random_model, tiny_config


def write_png16(path, values, greyscale=False, alpha=False):
    h, w = values.shape[:2]
    writer = png.Writer(w, h, greyscale=greyscale, alpha=alpha, bitdepth=16)
    with open(path, "wb") as f:
        writer.write(f, values.reshape(h, -1))


def read_png16(path):
    w, h, rows, info = png.Reader(filename=str(path)).asDirect()
    data = np.vstack([np.asarray(r, np.uint16) for r in rows]).reshape(h, w, info["planes"])
    return data, info


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rgb = (photo(14, 17) * 255).round().astype(np.uint8)
    Image.fromarray(rgb).save(root / "color.png")
    Image.fromarray(rgb).save(root / "color.jpg", quality=90)  # same stem: both kept
    Image.fromarray(rgb[..., 1]).save(root / "gray.png")
    alpha = np.linspace(0, 255, 14 * 17).reshape(14, 17).astype(np.uint8)
    Image.fromarray(np.dstack([rgb, alpha])).save(root / "rgba.png")
    deep = (photo(13, 15, 100, 100) * 65535).round().astype(np.uint16)
    deep[0, 0] = [1, 2, 3]  # not representable in 8 bits
    write_png16(root / "deep.png", deep)
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 8)
    (root / "notes.txt").write_text("ignored: not an image")
    (root / "sub").mkdir()
    Image.fromarray(rgb[:12, :12]).save(root / "sub" / "nested.webp", quality=90)
    return root


def test_read_write_roundtrip_keeps_bits_gray_alpha(folder, tmp_path):
    for name, gray, has_alpha, bits in [("gray.png", True, False, 8), ("rgba.png", False, True, 8),
                                        ("deep.png", False, False, 16), ("color.jpg", False, False, 8)]:
        pic = pictures.read_picture(folder / name)
        assert (pic.gray, pic.alpha is not None, pic.bits) == (gray, has_alpha, bits), name
        assert pic.rgb.shape[-1] == 3 and pic.rgb.dtype == np.float32
        pictures.write_picture(tmp_path / (name + ".png"), pic)
        again = pictures.read_picture(tmp_path / (name + ".png"))
        np.testing.assert_allclose(again.rgb, pic.rgb, atol=0.5 / (2 ** bits - 1) + 1e-7)
        assert (again.gray, again.bits) == (gray, bits)


def test_upscale_picture_gray_alpha_16bit_exactly():
    up = inference.Upscaler(pointwise_x3)
    rng = np.random.default_rng(0)
    # 16-bit: computed from the 16-bit values, written back at 16 bits.
    deep = rng.integers(0, 65536, (6, 5, 3)).astype(np.float32) / 65535
    out = pictures.upscale_picture(up, pictures.Picture(deep, bits=16))
    np.testing.assert_array_equal(out.rgb, up(deep))
    # Grayscale: replicated to RGB, written back as the channel mean.
    g = rng.random((6, 5, 1)).astype(np.float32)
    out = pictures.upscale_picture(up, pictures.Picture(np.repeat(g, 3, -1), gray=True))
    np.testing.assert_array_equal(out.rgb, up(np.repeat(g, 3, -1)))
    # Alpha: Pillow bicubic of the alpha plane.
    a = rng.random((6, 5)).astype(np.float32)
    out = pictures.upscale_picture(up, pictures.Picture(deep, alpha=a))
    ref = np.asarray(Image.fromarray(a).resize((15, 18), Image.BICUBIC))
    np.testing.assert_allclose(out.alpha, np.clip(ref, 0, 1), atol=1e-7)


def test_output_names():
    from pathlib import Path

    jobs = [(Path("a/x.png"), Path("x")), (Path("a/x.jpg"), Path("x")),
            (Path("a/s/y.webp"), Path("s/y"))]
    assert pictures.output_paths(jobs, Path("o"), False) == [
        Path("o/x_png.png"), Path("o/x_jpg.png"), Path("o/s/y.png")]
    assert pictures.output_paths(jobs, Path("o"), True) == [
        Path("o/x.png"), Path("o/x.jpg"), Path("o/s/y.webp")]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ckpt") / "tiny_x2"
    model_dir.save_model(directory, random_model(tiny_config(2)))
    return directory


def test_cli_end_to_end(folder, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    code = upscale.main([str(folder), "--checkpoint", str(tiny_checkpoint), "--output", str(out),
                         "--tile", "12", "--tile-overlap", "4", "--recursive", "--no-progress"])
    captured = capsys.readouterr()
    assert code == 1  # the broken file
    assert "broken.png" in captured.err and captured.err.count("error:") == 1
    assert "upscaled 6 of 7 images x2" in captured.out and "1 failed" in captured.out
    produced = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert produced == ["color_jpg.png", "color_png.png", "deep.png", "gray.png", "rgba.png",
                        "sub/nested.png"]
    with Image.open(out / "gray.png") as im:
        assert im.mode == "L" and im.size == (34, 28)
    with Image.open(out / "rgba.png") as im:
        assert im.mode == "RGBA" and im.size == (34, 28)
        alpha = np.asarray(im)[..., 3].astype(np.float32) / 255
    src_alpha = np.linspace(0, 255, 14 * 17).reshape(14, 17).astype(np.uint8) / np.float32(255)
    np.testing.assert_allclose(alpha, np.clip(np.asarray(Image.fromarray(
        src_alpha.astype(np.float32)).resize((34, 28), Image.BICUBIC)), 0, 1), atol=0.5 / 255 + 1e-6)
    deep, info = read_png16(out / "deep.png")
    assert info["bitdepth"] == 16 and deep.shape == (26, 30, 3)
    assert np.any(deep % 257)  # really 16-bit values, not 8-bit ones scaled up


def test_cli_errors(folder, tiny_checkpoint, tmp_path, capsys):
    out = str(tmp_path / "o")
    assert upscale.main([str(folder / "gray.png"), "--checkpoint", str(tmp_path / "nope"),
                         "--output", out]) == 2
    assert "checkpoint directory not found" in capsys.readouterr().err
    assert upscale.main([str(folder / "gray.png"), "--checkpoint", str(tiny_checkpoint),
                         "--output", out, "--tile", "8"]) == 2
    assert "minimum tile is 10" in capsys.readouterr().err
    assert upscale.main([str(tmp_path / "missing.png"), "--checkpoint", str(tiny_checkpoint),
                         "--output", out]) == 1
    assert "no such file" in capsys.readouterr().err


# ---------------------------------------------------------------- nothing lost (issue #12)
def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    pic = pictures.Picture(np.full((6, 5, 3), 0.5, np.float32))
    deep = pictures.Picture(np.full((6, 5, 3), 0.5, np.float32), bits=16)
    dst = tmp_path / "x.png"

    def half_written(self, fp, *args, **kwargs):  # a disk that fills up mid-way
        with open(fp, "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\n half")
        raise OSError("No space left on device")

    real_save = Image.Image.save
    monkeypatch.setattr(Image.Image, "save", half_written)
    with pytest.raises(OSError, match="No space"):
        pictures.write_picture(dst, pic)
    assert list(tmp_path.iterdir()) == []
    dst.write_bytes(b"an earlier result")
    with pytest.raises(OSError, match="No space"):
        pictures.write_picture(dst, pic)
    monkeypatch.setattr(png.Writer, "write", lambda self, f, rows: half_written(None, f.name))
    with pytest.raises(OSError, match="No space"):
        pictures.write_picture(dst, deep)
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]
    assert dst.read_bytes() == b"an earlier result"
    monkeypatch.setattr(Image.Image, "save", real_save)
    # overwrite=False never replaces a file; the default replaces it whole.
    with pytest.raises(FileExistsError, match="--overwrite"):
        pictures.write_picture(dst, pic, overwrite=False)
    assert dst.read_bytes() == b"an earlier result"
    pictures.write_picture(dst, pic)
    assert pictures.read_picture(dst).rgb.shape == (6, 5, 3)
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]
