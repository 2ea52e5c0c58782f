"""The commands: every front door's `--help`, the console scripts of pyproject.toml, the
packaged recipes named on the command line (`--config iet_x4:eval`), and `--which` picking a
training workdir's checkpoint for evaluate and upscale."""

from __future__ import annotations

import importlib
import sys
import tomllib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from ml_collections import ConfigDict
from PIL import Image

from iet_jax.evaluation.command_line import load_checkpoint
from iet_jax.io import model_dir, stored
from iet_jax.io import workdir as workdir_lib
from iet_jax.training import recipes
from tiny import CONFIGS, random_model, read_item, tiny_model_config

ROOT = Path(__file__).resolve().parents[1]
# console script -> "module:main", as pyproject.toml declares them
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
ABSL = {"iet-train", "iet-flops"}  # their main takes sys.argv (the program first)


def front_door(script: str):
    """The `main` that the console script `script` runs."""
    module, _, attr = SCRIPTS[script].partition(":")
    return getattr(importlib.import_module(module), attr)


def run(capsys, script: str, *args: str) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of the front door of `script`, run in this process."""
    main = front_door(script)
    argv = [script, *args] if script in ABSL else list(args)
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return (0 if rc is None else rc), out, err


def one_line(err: str, *words: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, lines
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


# ----------------------------------------------------------------------------- --help

@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_every_front_door_prints_its_usage_for_help(capsys, script):
    module = SCRIPTS[script].partition(":")[0]
    for flag in ("--help", "-h"):
        rc, out, err = run(capsys, script, flag)
        assert rc == 0, err
        assert f"usage: python -m {module}" in out, out[:300]
        assert "--" in out.split("usage:", 1)[1]  # the flags are described


def test_train_help_lists_the_recipes_and_the_fields_of_the_config_given(capsys):
    rc, out, _ = run(capsys, "iet-train", "--help")
    assert rc == 0
    for name in recipes.names():
        assert f"\n  {name} " in out, name
    assert "config fields of demo" in out and "  batch_size = 4\n" in out
    assert "  optim.muon = True\n" in out and "--workdir DIR" in out
    rc, out, _ = run(capsys, "iet-train", "--config", "iet_x4:eval", "--help")
    assert rc == 0
    assert "config fields of iet_x4:eval" in out
    assert "  settings = 'eval'\n" in out and "  model.dilation = 3\n" in out


def test_flops_help_lists_the_recipes(capsys):
    rc, out, _ = run(capsys, "iet-flops", "--help")
    assert rc == 0 and all(f"\n  {name} " in out for name in recipes.names())


# ----------------------------------------------------------------------------- console scripts

def test_pyproject_declares_a_console_script_for_each_front_door():
    assert SCRIPTS == {
        "iet-train": "iet_jax.train:main", "iet-evaluate": "iet_jax.evaluate:main",
        "iet-upscale": "iet_jax.upscale:main", "iet-convert": "iet_jax.convert:main",
        "iet-build": "iet_jax.datasets.build:main", "iet-flops": "iet_jax.flops:main",
        "iet-export": "iet_jax.export:main", "iet-visualize": "iet_jax.visualize:main"}
    for script in SCRIPTS:
        assert callable(front_door(script)), script


@pytest.mark.parametrize("script,bad", [("iet-flops", ["--config", "nope"]),
                                        ("iet-upscale", ["--which", "newest"])])
def test_a_console_script_runs_main_on_its_command_line_and_names_itself(capsys, monkeypatch,
                                                                       script, bad):
    """What pip's launcher does: sys.exit(main()), main reading sys.argv."""
    monkeypatch.setattr(sys, "argv", [f"/venv/bin/{script}", "--help"])
    with pytest.raises(SystemExit) as e:
        sys.exit(front_door(script)())
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: {script} ")
    monkeypatch.setattr(sys, "argv", [script, *bad])
    with pytest.raises(SystemExit) as e:
        sys.exit(front_door(script)())
    assert e.value.code == 2


# ----------------------------------------------------------------------------- named recipes

def test_a_name_resolves_to_the_packaged_recipe_and_a_path_stays_a_path(tmp_path, monkeypatch):
    assert {"demo", "iet_x4", "iet_light_x2", "iet_x2_finetune"} <= set(recipes.names())
    packaged = Path(recipes.__file__).parent
    assert recipes.resolve("iet_x4:eval") == f"{packaged / 'iet_x4.py'}:eval"
    assert recipes.resolve("demo") == str(packaged / "demo.py")
    for path in ("configs/demo.py", "configs/iet_x4.py:eval", str(CONFIGS / "demo.py"), "x.py"):
        assert recipes.resolve(path) == path
    monkeypatch.chdir(tmp_path)
    (tmp_path / "myrecipe").write_text("")  # a file that exists is a path, even without .py
    assert recipes.resolve("myrecipe") == "myrecipe"
    argv = ["train", "--config", "demo", "--config=iet_x3:eval", "--config.batch_size=2"]
    assert recipes.resolve_argv(argv) == [
        "train", "--config", str(packaged / "demo.py"), f"--config={packaged / 'iet_x3.py'}:eval",
        "--config.batch_size=2"]


def test_the_checkout_configs_load_the_packaged_recipes():
    """configs/NAME.py holds no recipe of its own: one name, one config."""
    from ml_collections.config_flags import config_flags as cf

    assert sorted(p.stem for p in CONFIGS.glob("*.py")) == recipes.names()
    for name, settings in [("demo", ""), ("iet_x4", ":eval"), ("iet_x2_finetune", "")]:
        by_path = cf.ConfigFileFlagParser("c").parse(f"{CONFIGS / name}.py{settings}")
        by_name = cf.ConfigFileFlagParser("c").parse(recipes.resolve(name + settings))
        assert by_path.to_dict() == by_name.to_dict(), name
    for path in CONFIGS.glob("*.py"):
        assert f"from iet_jax.training.recipes.{path.stem} import get" in path.read_text()


def test_flops_of_a_named_recipe(capsys):
    rc, out, err = run(capsys, "iet-flops", "--config", "iet_light_x4:eval")
    assert rc == 0, err
    assert out.splitlines() == ["parameters: 800,631", "FLOPs (multiply-adds) for a 1280x720 "
                                "output (LR 320x180 at x4): 0.07T"]


def test_train_loads_a_named_recipe_before_any_compute(capsys, tmp_path):
    """`--config demo` is read, its fields set, and the run refused for the data it lacks."""
    rc, _, err = run(capsys, "iet-train", "--config", "demo", f"--workdir={tmp_path / 'wd'}",
                     f"--config.data.data_dir={tmp_path / 'none'}", "--config.batch_size=2")
    assert rc == 2
    one_line(err, "is not built; build it with: python -m iet_jax.datasets.build --dataset demo")


@pytest.mark.parametrize("script,args", [
    ("iet-train", ["--config", "nope:eval", "--workdir", "wd"]),
    ("iet-train", ["--config=nope", "--help"]),
    ("iet-flops", ["--config", "iet_x5"]),
])
def test_an_unknown_recipe_name_is_one_line_listing_the_names(capsys, script, args):
    rc, out, err = run(capsys, script, *args)
    assert rc == 2 and out == ""
    line = one_line(err, "error: ", "no recipe named", "configs/demo.py")
    assert all(name in line for name in recipes.names())


# ----------------------------------------------------------------------------- --which

def param_tree(model) -> dict:
    """A model's parameters as a checkpoint stores them."""
    return stored.with_str_keys(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A training workdir as `iet-train` leaves it (config.json + checkpoints 1-4, validated
    at 2 and 4, the best at 2), written with the workdir's own writer instead of training: no
    training step compiles, so the file stays fast. Each step holds other random weights."""
    wd = tmp_path_factory.mktemp("commands") / "wd"
    cfg = tiny_model_config()
    checkpoints = workdir_lib.Checkpoints(wd, keep=10, async_save=False, keep_best=False)
    try:
        for step in (1, 2, 3, 4):
            items = {"params": param_tree(random_model(cfg, seed=step)),
                     "ema": param_tree(random_model(cfg, seed=10 + step)),
                     "opt_state": {"count": jnp.asarray(step, jnp.int32)},
                     "train": {"step": jnp.asarray(step, jnp.int32)}}
            meta = {"step": step, **({2: {"val_psnr": 30.0}, 4: {"val_psnr": 29.5}}.get(step, {}))}
            checkpoints.save(items, {"step": step}, meta)
    finally:
        checkpoints.close()
    (wd / stored.CONFIG_FILE).write_text(stored.config_to_json(ConfigDict(cfg.to_dict())))
    assert workdir_lib.is_training_workdir(wd)
    return wd


def weights(model) -> list[np.ndarray]:
    return [np.asarray(a) for a in jax.tree.leaves(param_tree(model))]


def same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.xdist_group("commands_workdir")
def test_which_loads_the_best_or_the_step_asked_for(workdir):
    assert workdir_lib.workdir_steps(workdir) == [1, 2, 3, 4]
    ema = {s: jax.tree.leaves(read_item(workdir, s, "ema")) for s in (2, 3, 4)}
    assert same(weights(load_checkpoint(str(workdir), None, False, "best")), ema[2])
    assert same(weights(load_checkpoint(str(workdir), None, False, 3)), ema[3])
    assert same(weights(load_checkpoint(str(workdir), None, False)), ema[4])  # latest
    assert not same(ema[2], ema[3]) and not same(ema[3], ema[4])


def inputs_of(script: str, tmp_path: Path) -> list[str]:
    """The arguments besides the checkpoint: a dataset to evaluate, or an image to upscale
    into tmp_path/out."""
    if script == "iet-evaluate":
        return ["--datasets", "demo"]
    image = tmp_path / "in.png"
    Image.fromarray(np.zeros((12, 12, 3), np.uint8)).save(image)
    return [str(image), "--output", str(tmp_path / "out")]


@pytest.mark.xdist_group("commands_workdir")
@pytest.mark.parametrize("script", ["iet-evaluate", "iet-upscale"])
def test_which_reaches_load_model_from_the_command_line(capsys, monkeypatch, tmp_path,
                                                        workdir, script):
    asked = []

    def spy(directory, dtype=None, which="latest"):
        asked.append(which)
        raise model_dir.CheckpointError("stop here")

    monkeypatch.setattr(model_dir, "load_model", spy)
    rest = inputs_of(script, tmp_path)
    for which in ("best", "3", None):
        flag = [] if which is None else ["--which", which]
        rc, _, err = run(capsys, script, "--checkpoint", str(workdir), *flag, *rest)
        assert rc == 2 and err.strip() == "error: stop here"
    assert asked == ["best", 3, "latest"]


@pytest.mark.xdist_group("commands_workdir")
@pytest.mark.parametrize("script", ["iet-evaluate", "iet-upscale"])
def test_which_a_step_that_is_not_there_names_the_steps(capsys, tmp_path, workdir, script):
    rest = inputs_of(script, tmp_path)
    rc, _, err = run(capsys, script, "--checkpoint", str(workdir), "--which", "7", *rest)
    assert rc == 2
    one_line(err, "has no checkpoint 7; it has [1, 2, 3, 4]")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("script", ["iet-evaluate", "iet-upscale"])
def test_which_is_refused_for_a_model_directory_and_checked_by_the_parser(capsys, tmp_path,
                                                                          script):
    directory = model_dir.save_model(tmp_path / "model", random_model(tiny_model_config()))
    rest = inputs_of(script, tmp_path)
    rc, _, err = run(capsys, script, "--checkpoint", str(directory), "--which", "best", *rest)
    assert rc == 2
    one_line(err, "--which best", "is a model directory", "leave it out")
    for bad in ("newest", "-1"):
        rc, _, err = run(capsys, script, "--checkpoint", str(directory), "--which", bad, *rest)
        assert rc == 2 and "--which: give latest, best or a step number" in err
