"""python -m iet_jax.upscale: file formats, grayscale, alpha, 16-bit, bad files, exit codes."""

import os
from pathlib import Path

import numpy as np
import png
import pytest
from PIL import Image

from iet_jax import upscale
from iet_jax.evaluation import inference, pictures
from iet_jax.io import model_dir
from tiny import photo, pointwise_x3


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
def tiny_image(path, seed=0):
    rgb = (photo(14, 17, 150 + seed, 180) * 255).round().astype(np.uint8)
    fmt = {".jpg": "JPEG", ".webp": "WEBP"}.get(path.suffix, "PNG")
    Image.fromarray(rgb).save(path, format=fmt)
    return path


def must_not_compute(*args, **kwargs):
    raise AssertionError("an image was computed although the run had to be refused first")


def run(args, checkpoint, capsys):
    """upscale.main with the checkpoint, no progress bar: (exit code, stdout, stderr)."""
    code = upscale.main([str(a) for a in args] + ["--checkpoint", str(checkpoint),
                                                  "--no-progress"])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_inputs_are_never_written_over(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(upscale, "upscale_picture", must_not_compute)
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ["a.png", "b.jpg", "c.webp"]:
        tiny_image(photos / name)
    before = {p.name: p.read_bytes() for p in photos.iterdir()}
    for extra in ([], ["--keep-format"], ["--overwrite"], ["--keep-format", "--overwrite"]):
        code, _, err = run([photos, "--output", photos, *extra], tiny_checkpoint, capsys)
        line = one_error_line(err)
        assert code == 2, extra
        assert "is the input" in line and "--output" in line
        assert {p.name: p.read_bytes() for p in photos.iterdir()} == before
    # Through a symbolic link to the folder, and a hard link to the input in another folder.
    (tmp_path / "link").symlink_to(photos)
    code, _, err = run([photos / "b.jpg", "--output", tmp_path / "link", "--keep-format"],
                       tiny_checkpoint, capsys)
    assert code == 2 and "is the input" in one_error_line(err)
    (tmp_path / "other").mkdir()
    os.link(photos / "a.png", tmp_path / "other" / "a.png")
    code, _, err = run([photos / "a.png", "--output", tmp_path / "other", "--overwrite"],
                       tiny_checkpoint, capsys)
    assert code == 2 and "is the input" in one_error_line(err)
    assert {p.name: p.read_bytes() for p in photos.iterdir()} == before


def test_existing_outputs_need_overwrite(tiny_checkpoint, tmp_path, capsys):
    src = tiny_image(tmp_path / "a.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.png").write_bytes(b"an earlier result")
    code, _, err = run([src, "--output", out], tiny_checkpoint, capsys)
    line = one_error_line(err)
    assert code == 2 and "a.png exists" in line and "--overwrite" in line
    assert (out / "a.png").read_bytes() == b"an earlier result"
    code, stdout, _ = run([src, "--output", out, "--overwrite"], tiny_checkpoint, capsys)
    assert code == 0 and "upscaled 1 of 1" in stdout
    with Image.open(out / "a.png") as im:
        assert im.size == (34, 28)
    assert sorted(p.name for p in out.iterdir()) == ["a.png"]  # no temporary file left


def test_two_inputs_with_one_output_name_are_refused(tiny_checkpoint, tmp_path, capsys,
                                                     monkeypatch):
    monkeypatch.setattr(upscale, "upscale_picture", must_not_compute)
    for name in ["a/x.png", "b/x.png", "c/x.png", "c/x.jpg", "d/x_png.png"]:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        tiny_image(tmp_path / name)
    out = tmp_path / "out"
    for inputs, clash in [(["a", "b"], ("a/x.png", "b/x.png", "out/x.png")),
                          # x.png and x.jpg in c become x_png.png and x_jpg.png: d's x_png.png
                          (["c", "d"], ("c/x.png", "d/x_png.png", "out/x_png.png"))]:
        code, _, err = run([tmp_path / i for i in inputs] + ["--output", out],
                           tiny_checkpoint, capsys)
        line = one_error_line(err)
        assert code == 2 and "different --output folders" in line
        assert all(str(tmp_path / c) in line for c in clash), line
    assert not out.exists()
    # A file named twice (its folder and itself) is one input, not a clash.
    jobs, _ = pictures.collect_inputs([str(tmp_path / "a"), str(tmp_path / "a" / "x.png")], False)
    assert jobs == [(tmp_path / "a" / "x.png", Path("x"))]
    # With --recursive, the same name in different subfolders keeps them apart.
    (tmp_path / "a" / "s").mkdir()
    tiny_image(tmp_path / "a" / "s" / "x.png")
    jobs, _ = pictures.collect_inputs([str(tmp_path / "a"), str(tmp_path / "b")], True)
    targets = pictures.output_paths(jobs, out, False)
    assert targets == [out / "s" / "x.png", out / "x.png", out / "x.png"]
    jobs, targets = jobs[:2], targets[:2]
    pictures.check_outputs(jobs, targets, out)


def test_output_that_is_a_file_is_refused_before_computing(folder, tiny_checkpoint, tmp_path,
                                                           capsys, monkeypatch):
    monkeypatch.setattr(upscale, "upscale_picture", must_not_compute)
    monkeypatch.setattr(upscale, "read_picture", must_not_compute)
    monkeypatch.setattr(model_dir, "load_model", must_not_compute)
    a_file = tmp_path / "out.png"
    a_file.write_bytes(b"a file")
    for output in [a_file, a_file / "sub"]:
        code, _, err = run([folder / "gray.png", "--output", output], tiny_checkpoint, capsys)
        line = one_error_line(err)
        assert code == 2 and "is not a folder" in line and "give a folder" in line
        assert str(output) in line
    # A subfolder the recursive layout needs is a file.
    out = tmp_path / "o"
    out.mkdir()
    (out / "sub").write_bytes(b"")
    code, _, err = run([folder, "-r", "--output", out], tiny_checkpoint, capsys)
    line = one_error_line(err)
    assert code == 2 and f"{out / 'sub'} is a file" in line and "--output" in line
    assert a_file.read_bytes() == b"a file"


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


def test_cli_tile_covering_the_image_equals_whole(folder, tiny_checkpoint, tmp_path, capsys):
    results = {}
    for extra in ([], ["--tile", "24"], ["--tile", "17", "--tile-overlap", "4"]):
        out = tmp_path / f"o{len(results)}"
        code, _, _ = run([folder / "color.png", "--output", out, *extra], tiny_checkpoint, capsys)
        assert code == 0
        results[" ".join(extra)] = np.asarray(Image.open(out / "color.png"))
    whole = results.pop("")
    for extra, got in results.items():
        np.testing.assert_array_equal(got, whole, err_msg=extra)


def test_cli_tiles_large_images_automatically(folder, tiny_checkpoint, tmp_path, capsys):
    parser = upscale.build_parser()
    assert parser.get_default("auto_tile_above") == inference.DEFAULT_AUTO_TILE_ABOVE == 36864
    assert "--auto-tile-above" in parser.format_help() and "192 x 192" in parser.format_help()
    src = folder / "color.png"  # 14 x 17 = 238 LR pixels
    code, stdout, _ = run([src, "--output", tmp_path / "auto", "--auto-tile-above", "100",
                           "--tile-overlap", "4"], tiny_checkpoint, capsys)
    assert code == 0
    assert "more than --auto-tile-above 100" in stdout and "in tiles of 10" in stdout
    code, _, _ = run([src, "--output", tmp_path / "tiled", "--tile", "10", "--tile-overlap", "4"],
                     tiny_checkpoint, capsys)
    assert code == 0
    auto, tiled = (np.asarray(Image.open(tmp_path / d / "color.png")) for d in ("auto", "tiled"))
    np.testing.assert_array_equal(auto, tiled)
    code, stdout, _ = run([src, "--output", tmp_path / "whole", "--auto-tile-above", "0"],
                          tiny_checkpoint, capsys)
    assert code == 0 and "in tiles of" not in stdout
    code, _, err = run([src, "--output", tmp_path / "x", "--auto-tile-above", "-1"],
                       tiny_checkpoint, capsys)
    assert code == 2 and "--auto-tile-above 0 or more" in one_error_line(err)


def test_out_of_memory_names_a_setting_that_is_accepted(folder, tiny_checkpoint, tmp_path,
                                                       capsys, monkeypatch):
    def out_of_memory(upscaler, pic):
        raise MemoryError("Unable to allocate 7.00 GiB")

    monkeypatch.setattr(upscale, "upscale_picture", out_of_memory)
    code, _, err = run([folder / "gray.png", "--output", tmp_path / "o", "--auto-tile-above",
                        "0", "--tile-overlap", "4"], tiny_checkpoint, capsys)
    line = one_error_line(err)
    assert code == 1 and "MemoryError" in line
    tile = int(line.split("use --tile ")[1].split()[0])
    up = inference.Upscaler(model_dir.load_model(tiny_checkpoint), tile=tile, overlap=4)
    assert up.tile_for(14, 17) is not None  # accepted, and it cuts the 14 x 17 image


def test_file_names_are_escaped_in_messages(tiny_checkpoint, tmp_path, capsys):
    d = tmp_path / "in"
    d.mkdir()
    (d / "evil\x1b[2J.png").write_bytes(b"not an image")
    (d / os.fsdecode(b"bad\xff.png")).write_bytes(b"not an image")
    code, out, err = run([d, tmp_path / "gone\x1b]0;owned\x07", "--output",
                          tmp_path / "o\x1b[31m"], tiny_checkpoint, capsys)
    assert code == 1
    text = out + err
    text.encode("utf-8")  # no lone surrogates
    assert not any(c in text for c in "\x1b\x07\r"), text
    for name in ["evil\\x1b[2J.png", "bad\\xff.png", "gone\\x1b]0;owned\\x07", "o\\x1b[31m"]:
        assert name in text, (name, text)
    # A checkpoint path too, and the command line's own errors.
    code, out, err = run([d, "--output", tmp_path / "o2"], tmp_path / "ck\x1b[2J", capsys)
    assert code == 2 and "\x1b" not in err and "ck\\x1b[2J" in err
    with pytest.raises(SystemExit):
        upscale.main([str(d), "--output", "o", "--checkpoint", "c", "--tile", "9\x1b[2J"])
    err = capsys.readouterr().err
    assert "\x1b" not in err and "9\\x1b[2J" in err


def make_broken_checkpoints(good: Path, root: Path) -> dict[str, tuple[Path, list[str]]]:
    """Checkpoints that cannot be loaded: name -> (path, what the error line must say)."""
    import json
    import shutil

    cases = {}

    def model_dir_like(name, config_text=None, params=True):
        d = root / name
        d.mkdir()
        if params:
            (d / "params").mkdir()
        shutil.copy(good / "config.json", d / "config.json")
        if config_text is not None:
            (d / "config.json").write_text(config_text)
        return d

    d = model_dir_like("params_empty")
    cases["no model: empty params"] = (d, [f"{d / 'params'}", "incomplete or damaged",
                                           "convert the model again"])
    d = root / "empty"
    d.mkdir()
    cases["no model: empty folder"] = (d, [f"{d} is not an iet-jax model checkpoint",
                                           "iet_jax.convert"])
    d = model_dir_like("workdir", params=False)
    (d / "checkpoints" / "100.orbax-checkpoint-tmp-1").mkdir(parents=True)  # an unfinished save
    cases["workdir without a complete checkpoint"] = (d, [f"{d} has no complete checkpoint",
                                                          "wait for one"])
    d = model_dir_like("workdir_damaged", params=False)
    (d / "checkpoints" / "100").mkdir(parents=True)
    (d / "checkpoints" / "100" / "_CHECKPOINT_METADATA").write_text("{}")
    cases["workdir with a damaged checkpoint"] = (d, [
        f"no intact checkpoint in {d / 'checkpoints'}", "every step is damaged (100: "])
    d = model_dir_like("not_json", "{'scale': 2,")
    cases["config.json not JSON"] = (d, [f"{d / 'config.json'} is not valid JSON",
                                         "iet_jax.convert"])
    d = model_dir_like("a_list", "[1, 2]")
    cases["config.json a list"] = (d, [f"{d / 'config.json'} holds a JSON list"])
    config = json.loads((good / "config.json").read_text())
    d = model_dir_like("unknown_field", json.dumps({**config, "scael": 2}))
    cases["config.json with an unknown field"] = (d, [f"{d / 'config.json'} is not a valid "
                                                      "model config", "scael"])
    d = model_dir_like("bad_value", json.dumps({**config, "depths": "many"}))
    cases["config.json with a bad value"] = (d, [f"{d / 'config.json'} is not a valid model "
                                                 "config"])
    d = model_dir_like("builds_nothing", json.dumps({**config, "mlp_ratio": -1.0}))
    cases["config.json that builds no model"] = (d, [f"{d / 'config.json'} describes a model "
                                                     "that cannot be built"])
    d = root / "weights.pth"
    d.write_bytes(b"torch")
    cases["a .pth file"] = (d, [f"{d} is a file", "python -m iet_jax.convert"])
    return cases


def test_checkpoint_problems_are_one_line(folder, tiny_checkpoint, tmp_path, capsys):
    for name, (path, says) in make_broken_checkpoints(tiny_checkpoint, tmp_path).items():
        code, _, err = run([folder / "gray.png", "--output", tmp_path / "o"], path, capsys)
        line = one_error_line(err)
        assert code == 2, name
        assert all(s in line for s in says), (name, line)
        code, _, err = run([folder / "gray.png", "--output", tmp_path / "o", "--verbose"], path,
                           capsys)
        assert code == 2 and err.startswith(line) and "Traceback" in err, name
    assert not (tmp_path / "o").exists()  # refused before the output folder was made


def test_cli_tile_advice_is_accepted(folder, tiny_checkpoint, tmp_path, capsys):
    # The tiny model needs 10 LR pixels; the default overlap is 16: "--tile 10" would be
    # refused again, so the advice is a tile above the overlap.
    code, _, err = run([folder / "color.png", "--output", tmp_path / "o", "--tile", "8"],
                       tiny_checkpoint, capsys)
    line = one_error_line(err)
    assert code == 2 and "use --tile 17 or more" in line
    code, stdout, _ = run([folder / "color.png", "--output", tmp_path / "o", "--tile", "17"],
                          tiny_checkpoint, capsys)
    assert code == 0 and "upscaled 1 of 1" in stdout
