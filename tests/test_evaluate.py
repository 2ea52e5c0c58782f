"""Benchmark evaluation: evaluate_source on in-memory sources, and the CLI end to end."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from iet_jax import datasets, evaluate
from iet_jax.conventions import metrics
from iet_jax.conventions.imresize import imresize
from iet_jax.evaluation import benchmark, inference
from iet_jax.io import model_dir
from tiny import nearest, neighbourly, photo


def make_source(scale, sizes=((24, 30), (18, 22), (20, 20))):
    """{'hr', 'lr', 'name'} dicts: photo crops and their MATLAB-bicubic downscales."""
    out = []
    for i, (h, w) in enumerate(sizes):
        hr = (photo(h * scale, w * scale, 60 + 40 * i, 100 + 50 * i) * 255).round().astype(np.uint8)
        out.append({"hr": hr, "lr": imresize(hr, output_shape=(h, w)), "name": f"img{i}.png"})
    return out


def test_evaluate_source_numbers_and_saved_images(tmp_path):
    source = make_source(2)
    res = benchmark.evaluate_source(nearest, source, 2, save_dir=tmp_path / "sr")
    assert res["count"] == 3 and len(res["images"]) == 3
    for ex, row in zip(source, res["images"]):
        sr = metrics.to_uint8(np.asarray(nearest(jnp.asarray(ex["lr"][None] / 255.0)))[0])
        assert row["psnr"] == metrics.psnr(sr, ex["hr"], 2)
        assert row["ssim"] == metrics.ssim(sr, ex["hr"], 2)
        ref = imresize(ex["lr"], 2)
        assert row["bicubic_psnr"] == metrics.psnr(ref, ex["hr"], 2)
        saved = np.asarray(Image.open(tmp_path / "sr" / f"{ex['name'][:-4]}.png"))
        np.testing.assert_array_equal(saved, sr)
    assert res["psnr"] == pytest.approx(np.mean([r["psnr"] for r in res["images"]]))
    assert res["bicubic_psnr"] > res["psnr"]  # MATLAB bicubic beats nearest neighbour
    # Tiled and self-ensembled evaluation of an equivariant per-pixel model: same numbers.
    again = benchmark.evaluate_source(nearest, source, 2, tile=8, overlap=2, self_ensemble=True,
                                     bicubic=False)
    assert again["psnr"] == pytest.approx(res["psnr"], abs=1e-9)
    assert "bicubic_psnr" not in again


def test_evaluate_source_with_the_split_test():
    source = make_source(2)  # LR 24x30 (split 2 x 2 at 20), 18x22 (396 < 400: whole), 20x20
    res = benchmark.evaluate_source(neighbourly, source, 2, split=20, bicubic=False)
    assert res["protocol"] == "official-split"
    assert [r["patches"] for r in res["images"]] == [[2, 2], [1, 1], [2, 2]]
    split = inference.Upscaler(neighbourly, split=20)
    for ex, row in zip(source, res["images"]):
        sr = metrics.to_uint8(split(ex["lr"] / np.float32(255.0)))
        assert row["psnr"] == metrics.psnr(sr, ex["hr"], 2)
    whole = benchmark.evaluate_source(neighbourly, source, 2, bicubic=False)
    assert whole["protocol"] == "whole" and "patches" not in whole["images"][0]
    assert whole["images"][1]["psnr"] == res["images"][1]["psnr"]  # below the threshold
    assert whole["images"][0]["psnr"] != res["images"][0]["psnr"]


def test_scale_mismatch_is_explained():
    with pytest.raises(ValueError, match=r"x3 pair, but the model upscales x2"):
        benchmark.evaluate_source(nearest, make_source(3), 2)
    with pytest.raises(ValueError, match=r"checkpoint upscales x2 but the dataset is x4"):
        benchmark.evaluate_source(nearest, make_source(4), 4)


def test_dataset_names_and_splits():
    assert benchmark.parse_datasets("Set5, demo:train,div2k") == [
        ("set5", "test"), ("demo", "train"), ("div2k", "validation")]
    assert benchmark.parse_datasets("set5,demo", "validation") == [
        ("set5", "validation"), ("demo", "validation")]
    with pytest.raises(ValueError, match="twice"):
        benchmark.parse_datasets("set5,set5")


def test_markdown_table():
    res = {"set5": {"psnr": 30.0, "ssim": 0.9, "bicubic_psnr": 28.0, "bicubic_ssim": 0.8},
           "urban100": {"psnr": 25.5, "ssim": 0.75, "bicubic_psnr": 23.1, "bicubic_ssim": 0.66}}
    table = benchmark.markdown_table(res, 4, "iet_x4")
    assert table.splitlines() == [
        "| method | scale | Set5 | Urban100 |", "|---|---|---|---|",
        "| bicubic | x4 | 28.00 / 0.8000 | 23.10 / 0.6600 |",
        "| iet_x4 | x4 | 30.00 / 0.9000 | 25.50 / 0.7500 |"]


@pytest.fixture
def fake_datasets(monkeypatch):
    """open_source over in-memory benchmarks; anything else is 'not built'."""
    built = {("set5", "test"): make_source(2), ("demo", "validation"): make_source(2, ((16, 20),))}
    calls = []

    def open_source(name, split=None, scale=4, data_dir=None):
        calls.append((name, split, scale, data_dir))
        if (name, split) not in built or scale != 2:
            raise datasets.DatasetNotBuiltError(
                f"python -m iet_jax.datasets.build --dataset benchmark --name {name} --scale {scale}")
        return built[name, split]

    monkeypatch.setattr(datasets, "open_source", open_source)
    return calls


def test_cli_end_to_end(tiny_checkpoint, fake_datasets, tmp_path, capsys):
    out, images = tmp_path / "results", tmp_path / "images"
    code = evaluate.main(["--checkpoint", str(tiny_checkpoint), "--datasets", "set5",
                          "--tile", "12", "--tile-overlap", "4", "--save-images", str(images),
                          "--output", str(out), "--no-progress", "--data-dir", "/data"])
    printed = capsys.readouterr().out
    assert code == 0
    assert fake_datasets == [("set5", "test", 2, "/data")]
    assert "| bicubic | x2 |" in printed and "| tiny_x2 | x2 |" in printed
    saved = json.loads((out / "results.json").read_text())
    set5 = saved["datasets"]["set5"]
    assert set5["count"] == 3 and np.isfinite(set5["psnr"]) and 0 < set5["ssim"] <= 1
    assert saved["settings"]["tile"] == 12 and saved["settings"]["scale"] == 2
    assert saved["settings"]["protocol"] == "tiled" and set5["protocol"] == "tiled"
    assert "tiles 12 (overlap 4)" in (out / "results.md").read_text()
    assert "| tiny_x2 | x2 |" in (out / "results.md").read_text()
    assert sorted(p.name for p in (images / "set5").iterdir()) == ["img0.png", "img1.png",
                                                                   "img2.png"]
    # The same numbers straight from evaluate_source (the CLI adds nothing to them).
    model = model_dir.load_model(tiny_checkpoint)
    direct = benchmark.evaluate_source(model, make_source(2), 2, tile=12, overlap=4)
    assert direct["psnr"] == pytest.approx(set5["psnr"], abs=1e-9)
    # The demo data's validation split (the default split for non-benchmarks).
    fake_datasets.clear()
    assert evaluate.main(["--checkpoint", str(tiny_checkpoint), "--datasets", "demo",
                          "--tile", "12", "--tile-overlap", "4", "--no-progress"]) == 0
    assert fake_datasets == [("demo", "validation", 2, None)]


def test_cli_official_split(tiny_checkpoint, fake_datasets, tmp_path, capsys):
    out = tmp_path / "results"
    code = evaluate.main(["--checkpoint", str(tiny_checkpoint), "--datasets", "demo",
                          "--official-split", "--output", str(out), "--no-progress",
                          "--no-bicubic"])
    assert code == 0
    assert "protocol: official split test" in capsys.readouterr().out
    saved = json.loads((out / "results.json").read_text())
    assert saved["settings"]["protocol"] == "official-split"
    assert saved["settings"]["split_patch"] == 384 and saved["settings"]["tile"] is None
    demo = saved["datasets"]["demo"]
    assert demo["protocol"] == "official-split" and demo["images"][0]["patches"] == [1, 1]
    assert "official split test (IETModel.test: LR images of 384x384 pixels or more" in (
        out / "results.md").read_text()
    # A 16x20 LR image is below the threshold: the numbers of the whole-image protocol.
    model = model_dir.load_model(tiny_checkpoint)
    whole = benchmark.evaluate_source(model, make_source(2, ((16, 20),)), 2, bicubic=False)
    assert whole["psnr"] == demo["psnr"]
    assert evaluate.main(["--checkpoint", str(tiny_checkpoint), "--datasets", "demo",
                          "--official-split", "--tile", "12"]) == 2
    assert "use either tile (--tile) or split (--official-split)" in capsys.readouterr().err


def test_cli_errors(tiny_checkpoint, fake_datasets, tmp_path, capsys):
    ck = str(tiny_checkpoint)
    assert evaluate.main(["--checkpoint", ck, "--datasets", "set5,urban100"]) == 1
    err = capsys.readouterr().err
    assert "urban100 (x2) is not built" in err and "--name urban100 --scale 2" in err
    assert evaluate.main(["--checkpoint", str(tmp_path / "missing")]) == 2
    assert "checkpoint directory not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert evaluate.main(["--checkpoint", str(tmp_path / "empty")]) == 2
    assert "is not an iet-jax model checkpoint" in capsys.readouterr().err
    assert evaluate.main(["--checkpoint", ck, "--tile", "9"]) == 2
    assert "minimum tile is 10" in capsys.readouterr().err
    assert evaluate.main(["--checkpoint", ck, "--scale", "4"]) == 2
    assert "upscales x2, not x4" in capsys.readouterr().err


# ---------------------------------------------------------------- nothing silently wrong (#12)
def test_cli_tile_covering_the_images_equals_whole(tiny_checkpoint, fake_datasets, tmp_path,
                                                   capsys):
    psnr = {}
    for extra in ([], ["--tile", "20"], ["--tile", "64", "--tile-overlap", "4"]):
        out = tmp_path / f"r{len(psnr)}"
        assert evaluate.main(["--checkpoint", str(tiny_checkpoint), "--datasets", "demo",
                              "--no-progress", "--no-bicubic", "--output", str(out),
                              *extra]) == 0
        saved = json.loads((out / "results.json").read_text())["datasets"]["demo"]["images"]
        psnr[" ".join(extra)] = [row["psnr"] for row in saved]  # LR 16 x 20
    whole = psnr.pop("")
    assert psnr == {"--tile 20": whole, "--tile 64 --tile-overlap 4": whole}


def test_output_folders_that_are_files_are_refused_before_computing(
        tiny_checkpoint, fake_datasets, tmp_path, capsys, monkeypatch):
    def must_not_load(*args, **kwargs):
        raise AssertionError("the checkpoint was loaded although the run had to be refused")

    monkeypatch.setattr(model_dir, "load_model", must_not_load)
    a_file = tmp_path / "results.md"
    a_file.write_text("a file")
    for flag in ["--output", "--save-images"]:
        for folder in [a_file, a_file / "sub"]:
            code = evaluate.main(["--checkpoint", str(tiny_checkpoint), "--datasets", "demo",
                                  flag, str(folder), "--no-progress"])
            err = capsys.readouterr().err
            assert code == 2 and err.count("\n") == 1, err
            assert f"{flag} {folder} is not a folder" in err and "give a folder" in err
    assert fake_datasets == [] and a_file.read_text() == "a file"


def test_checkpoint_problems_are_one_line(tiny_checkpoint, tmp_path, capsys):
    from test_upscale import make_broken_checkpoints

    for name, (path, says) in make_broken_checkpoints(tiny_checkpoint, tmp_path).items():
        args = ["--checkpoint", str(path), "--datasets", "demo", "--no-progress"]
        code = evaluate.main(args)
        err = capsys.readouterr().err
        lines = err.splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (name, err)
        assert all(s in lines[0] for s in says), (name, lines[0])
        assert evaluate.main(args + ["--verbose"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(lines[0]) and "Traceback" in err, name


def test_names_are_escaped_in_messages(tiny_checkpoint, fake_datasets, tmp_path, capsys):
    assert evaluate.main(["--checkpoint", str(tmp_path / "ck\x1b[2J"), "--datasets", "demo"]) == 2
    err = capsys.readouterr().err
    assert "\x1b" not in err and "ck\\x1b[2J" in err
    assert evaluate.main(["--checkpoint", str(tiny_checkpoint), "--datasets", "set\x1b]0;x\x07",
                          "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\x07" not in err and "set\\x1b]0;x\\x07" in err
    with pytest.raises(SystemExit):
        evaluate.main(["--checkpoint", "c", "--limit", "\x1b[2J"])
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\\x1b[2J" in err
