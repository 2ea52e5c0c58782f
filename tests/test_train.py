"""Training loop: a tiny run on synthetic images (loss falls, EMA follows its decay, resumable
workdir that load_model reads), and configurations refused before any compute.

The tiny training config, its synthetic images and `read_item` are in `tiny.py`.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from iet_jax import train
from iet_jax.io import model_dir, official, stored
from iet_jax.io import workdir as workdir_lib
from iet_jax.model import config as config_lib
from iet_jax.model.network import abstract_model
from iet_jax.training.config import (ConfigError, model_config_for_training, recipe,
                                     validate_config)
from iet_jax.training.init import load_init_params
from iet_jax.training.loop import NonFiniteError, train_and_evaluate
from iet_jax.training.state import apply_model, init_params
from tiny import CONFIGS, read_item, synthetic_source, tiny_training_config

@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """(workdir, config, summary) of an 8-step run: a checkpoint every step, validation at 8.
    The tests that use it share one worker (`xdist_group`), so it runs once."""
    workdir = tmp_path_factory.mktemp("train") / "wd"
    cfg = tiny_training_config(steps=8)
    cfg.eval_every = 8
    summary = train_and_evaluate(cfg, workdir, train_source=synthetic_source(6, 0),
                                 val_source=synthetic_source(2, 1))
    return workdir, cfg, summary


@pytest.mark.xdist_group("tiny_run")
def test_loss_falls_validation_runs_and_every_step_is_logged(tiny_run):
    workdir, _, summary = tiny_run
    losses = [loss for _, loss in summary["history"]]
    assert len(losses) == 8
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses
    assert summary["validation"]["step"] == 8
    assert np.isfinite(summary["validation"]["psnr"])
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train/loss" in r] == list(range(1, 9))
    assert any("val/psnr" in r for r in records)
    assert {"train/lr", "train/grad_norm"} <= set(records[0])


@pytest.mark.xdist_group("tiny_run")
def test_the_log_has_speed_and_peak_memory_where_reported(tiny_run):
    workdir, cfg, _ = tiny_run
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "train/loss" in r]
    # the first step settled (it compiles) only starts the clock
    assert "train/steps_per_s" not in train_records[0]
    for r in train_records[1:]:
        assert r["train/steps_per_s"] > 0 and r["train/images_per_s"] > 0
        assert r["train/images_per_s"] == pytest.approx(
            cfg.batch_size * r["train/steps_per_s"])
    stats = jax.local_devices()[0].memory_stats()
    reported = stats is not None and stats.get("peak_bytes_in_use") is not None
    assert all(("train/peak_memory_bytes" in r) == reported for r in train_records)
    if reported:
        assert all(r["train/peak_memory_bytes"] > 0 for r in train_records)


@pytest.mark.xdist_group("tiny_run")
def test_ema_follows_its_decay(tiny_run):
    """ema_5 = d * ema_4 + (1 - d) * params_5, exactly as float32 computes it."""
    workdir, cfg, _ = tiny_run
    d = cfg.ema_decay
    ema4, ema5 = read_item(workdir, 4, "ema"), read_item(workdir, 5, "ema")
    params5 = read_item(workdir, 5, "params")
    expect = jax.tree.map(lambda e, p: np.float32(d) * e + np.float32(1 - d) * p, ema4, params5)
    for got, want in zip(jax.tree.leaves(ema5), jax.tree.leaves(expect)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8)
    lag = max(float(np.abs(e - p).max()) for e, p in zip(jax.tree.leaves(ema5),
                                                          jax.tree.leaves(params5)))
    assert lag > 1e-4  # and it really lags the parameters


@pytest.mark.xdist_group("tiny_run")
def test_load_model_reads_the_latest_ema_and_the_checkpoint_its_input_position(tiny_run):
    from flax import nnx

    workdir = tiny_run[0]
    assert workdir_lib.is_training_workdir(workdir)
    assert workdir_lib.workdir_steps(workdir)[-1] == 8
    assert workdir_lib.read_step(workdir, "best").step == 8  # validated only at 8
    model = model_dir.load_model(workdir)
    loaded = stored.with_str_keys(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(read_item(workdir, 8, "ema"))):
        np.testing.assert_array_equal(np.asarray(a), b)
    assert workdir_lib.read_step(workdir, 8).loader["step"] == 8  # the next batch is batch 8


@pytest.mark.xdist_group("tiny_run")
def test_rerunning_a_finished_run_trains_nothing(tiny_run):
    workdir, cfg, _ = tiny_run
    again = train_and_evaluate(cfg, workdir, train_source=synthetic_source(6, 0))
    assert again["start_step"] == 8 and again["history"] == [] and again["step"] == 8


@pytest.mark.xdist_group("tiny_run")
def test_nonfinite_loss_stops_naming_the_step_or_is_skipped(tiny_run, tmp_path):
    """A NaN batch at update 10: 'stop' names the step and keeps checkpoint 9; 'skip' goes
    on to 11 with finite parameters and counts the skipped step."""
    import shutil

    from iet_jax.datasets import loader as loader_lib

    workdir = tmp_path / "wd"
    shutil.copytree(tiny_run[0], workdir)
    cfg = tiny_run[1].copy_and_resolve_references()

    class Poisoned(loader_lib.PairedPatchLoader):
        def __next__(self):
            step = self.step
            out = dict(super().__next__())
            if step == 9:  # the batch of update 10
                out["lr"] = np.full_like(out["lr"], np.nan)
            return out

    cfg.num_steps, cfg.eval_every = 11, 0
    with pytest.raises(NonFiniteError, match="at step 10 "):
        train_and_evaluate(cfg, workdir, train_source=synthetic_source(6, 0),
                           make_loader=Poisoned)
    assert workdir_lib.workdir_steps(workdir)[-1] == 9
    cfg.nonfinite = "skip"
    skipped = train_and_evaluate(cfg, workdir, train_source=synthetic_source(6, 0),
                                 make_loader=Poisoned)
    assert skipped["start_step"] == 9 and skipped["step"] == 11 and skipped["skipped"] == 1
    params = read_item(workdir, 11, "params")
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


# ----------------------------------------------------------------------------- init_from

OFFICIAL_TINY = Path(__file__).parent / "fixtures" / "official_tiny"


def _ours(model_cfg, state_dict):
    """An official state dict as our nested parameter dict (string keys)."""
    from flax import nnx

    model = official.load_state_dict(abstract_model(model_cfg), state_dict)
    return jax.tree.map(np.asarray, stored.with_str_keys(
        nnx.to_pure_dict(nnx.state(model, nnx.Param))))


def _random_official(model_cfg, seed):

    rng = np.random.default_rng(seed)
    shapes = official.official_shapes(abstract_model(model_cfg))
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


def _assert_tree_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_init_from_official_pth_params_and_params_ema(tmp_path):
    """BasicSR: the parameters start from `params`, the EMA from `params_ema`."""
    from iet_jax.io import pth

    model_cfg = official.from_options_file(OFFICIAL_TINY / "tiny_x2.yml")
    path = OFFICIAL_TINY / "tiny_x2.pth"  # written by torch; the two sets differ
    weights = pth.load_pth(path)
    start = jax.device_get(init_params(model_cfg, 0))
    params, ema, fresh, description = load_init_params(str(path), start, model_cfg)
    _assert_tree_equal(params, _ours(model_cfg, weights["params"]))
    _assert_tree_equal(ema, _ours(model_cfg, weights["params_ema"]))
    assert fresh == [] and description == "parameters from 'params', EMA from 'params_ema'"
    assert not np.array_equal(params["conv_first"]["kernel"], ema["conv_first"]["kernel"])


def test_init_from_one_set_starts_both(tmp_path):
    """A .pth with only `params`, only `params_ema` or a bare state dict, and a model dir,
    start parameters and EMA from the same weights; other upsamplers stay fresh."""
    from pth_writer import save_pth

    model_cfg = model_config_for_training(tiny_training_config())
    sd = _random_official(model_cfg, 0)
    want = _ours(model_cfg, sd)
    start = jax.device_get(init_params(model_cfg, 0))
    for name, obj, key in [("params", {"params": sd}, "params"),
                           ("ema", {"params_ema": sd}, "params_ema"),
                           ("bare", {f"module.{k}": v for k, v in sd.items()}, "the state dict")]:
        path = save_pth(tmp_path / f"{name}.pth", obj)
        params, ema, fresh, description = load_init_params(str(path), start, model_cfg)
        _assert_tree_equal(params, want)
        _assert_tree_equal(ema, want)
        assert description == f"parameters from {key!r}, EMA from {key!r}"
    directory = tmp_path / "model"
    model_dir.save_model(directory, official.load_state_dict(
        abstract_model(model_cfg), sd))
    params, ema, _, _ = load_init_params(str(directory), start, model_cfg)
    _assert_tree_equal(params, want)
    _assert_tree_equal(ema, want)
    # a x4 model from these x2 weights: all but the upsampler's shapes agree
    x4_cfg = model_config_for_training(tiny_training_config(scale=4))
    x4 = jax.device_get(init_params(x4_cfg, 0))
    params, ema, fresh, _ = load_init_params(str(tmp_path / "params.pth"), x4, x4_cfg)
    assert fresh == ["upsample/stages/0/bias", "upsample/stages/0/kernel"]
    _assert_tree_equal(params["upsample"], x4["upsample"])
    _assert_tree_equal(params["blocks"], want["blocks"])
    # another architecture is refused by name
    with pytest.raises(ConfigError, match=r"init_from: .*tiny_x2\.pth holds keys this model "
                                          r"does not have .*layers\.0\.residual_group\.layers\.1"):
        load_init_params(str(OFFICIAL_TINY / "tiny_x2.pth"), start, model_cfg)
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(ConfigError, match=r"init_from: .*junk\.pth: not a readable PyTorch"):
        load_init_params(str(tmp_path / "junk.pth"), start, model_cfg)


def test_init_from_in_a_run_and_from_a_workdir(tmp_path):
    """A run from a .pth with different `params` and `params_ema`: its first update moves the
    parameters a little from `params`, and the EMA averages them into `params_ema`. A workdir
    source then gives its parameters and its EMA."""
    from pth_writer import save_pth

    cfg = tiny_training_config(steps=1)
    model_cfg = model_config_for_training(cfg)
    sd_params, sd_ema = _random_official(model_cfg, 1), _random_official(model_cfg, 2)
    cfg.init_from = str(save_pth(tmp_path / "both.pth", {"params": sd_params,
                                                         "params_ema": sd_ema}))
    workdir = tmp_path / "run"
    train_and_evaluate(cfg, workdir, train_source=synthetic_source(4, 0))
    params1, ema1 = read_item(workdir, 1, "params"), read_item(workdir, 1, "ema")
    start, start_ema = _ours(model_cfg, sd_params), _ours(model_cfg, sd_ema)
    d = np.float32(cfg.ema_decay)
    for p1, e1, p0, e0 in zip(*map(jax.tree.leaves, (params1, ema1, start, start_ema))):
        assert np.abs(p1 - p0).max() < 0.05  # one small update from `params`
        np.testing.assert_allclose(e1, d * e0 + (1 - d) * p1, rtol=1e-6, atol=1e-7)
    init = jax.device_get(init_params(model_cfg, 0))
    params, ema, fresh, description = load_init_params(str(workdir), init, model_cfg)
    _assert_tree_equal(params, params1)
    _assert_tree_equal(ema, ema1)
    assert description == "parameters and EMA of its step 1"


# ----------------------------------------------------------------------------- refused configs


def _refused(cfg, match, tmp_path, **kw):
    with pytest.raises(ConfigError, match=match):
        train_and_evaluate(cfg, tmp_path / "wd", **kw)
    assert not (tmp_path / "wd" / "checkpoints").exists()


def test_patch_smaller_than_window_is_refused(tmp_path):
    cfg = tiny_training_config()
    cfg.data.patch_size = 4  # sparse_range 5 x dilation 1 = 5 tokens needed
    _refused(cfg, r"data\.patch_size 4 .*sparse_range x model\.dilation", tmp_path,
             train_source=synthetic_source(2, 0))
    official = recipe("iet_light", 2)
    official.data.patch_size = 64
    with pytest.raises(ConfigError, match=r"data\.patch_size 64 .*= 75 tokens"):
        validate_config(official)


def test_batch_not_divisible_by_devices_is_refused(tmp_path):
    cfg = tiny_training_config(batch=4)
    cfg.optim.grad_accum_steps = 3
    with pytest.raises(ConfigError, match=r"batch_size 4 .*optim\.grad_accum_steps 3"):
        validate_config(cfg)
    cfg = tiny_training_config(batch=3)
    cfg.mesh.data = 2  # needs 2 devices: refused by the mesh before anything else
    _refused(cfg, r"mesh\.data x mesh\.fsdp = 2 x 1", tmp_path,
             train_source=synthetic_source(2, 0))


def test_init_from_other_architecture_is_refused(tmp_path):
    other = tmp_path / "x2"
    other.mkdir()
    light = config_lib.official("iet_light", 2, "train")
    (other / "config.json").write_text(stored.config_to_json(light))
    cfg = recipe("iet", 3)
    cfg.init_from = str(other)
    with pytest.raises(ConfigError, match=r"(?s)init_from: .*another architecture.*model\.embed_dim"):
        validate_config(cfg)
    cfg.init_from = str(tmp_path / "missing")
    with pytest.raises(ConfigError, match=r"(?s)init_from: .*missing.*init_from=''"):
        validate_config(cfg)


def test_missing_dataset_is_refused_with_build_command(tmp_path):
    cfg = tiny_training_config()
    cfg.data.dataset = "demo"
    cfg.data.data_dir = str(tmp_path / "no_data")
    _refused(cfg, r"(?s)data\.dataset 'demo' .*not built; build it with:\n.*iet_jax\.datasets\.build",
             tmp_path)


def test_other_fields_are_named(tmp_path):
    for field, value, match in [("nonfinite", "ignore", "nonfinite"),
                                ("param_sharding", "zero3", "param_sharding"),
                                ("ema_decay", 1.0, "ema_decay"),
                                ("batch_size", 0, "batch_size")]:
        cfg = tiny_training_config()
        cfg[field] = value
        with pytest.raises(ConfigError, match=match):
            validate_config(cfg)
    cfg = tiny_training_config()
    cfg.data.scale = 3
    with pytest.raises(ConfigError, match=r"data\.scale \(3\) must equal model\.scale \(2\)"):
        validate_config(cfg)
    cfg = tiny_training_config()
    cfg.optim.muon_variant = "keller"
    with pytest.raises(ConfigError, match=r"optim\.muon_variant must be one of \('official', "
                                          r"'optax'\), got 'keller'"):
        validate_config(cfg)
    cfg = tiny_training_config()
    cfg.data.num_workers = -1
    with pytest.raises(ConfigError, match=r"data\.num_workers must be an integer >= 0 .*got -1"):
        validate_config(cfg)


def test_command_line_overrides_and_refusal(tmp_path, capsys):
    rc = train.main(["train", f"--config={CONFIGS / 'demo.py'}", f"--workdir={tmp_path / 'wd'}",
                     "--config.data.patch_size=4", "--config.batch_size=32",
                     "--config.model.dtype=bfloat16"])
    assert rc == 2
    assert "data.patch_size 4" in capsys.readouterr().err


def test_official_recipes_validate():
    for variant, scale, stage in (("iet", 4, None), ("iet", 2, "finetune"), ("iet_light", 3, None)):
        cfg = recipe(variant, scale, stage=stage)  # (tracing IET takes a while)
        cfg.init_from = ""
        validate_config(cfg)


def test_bfloat16_keeps_float32_state_and_remat_rematerialises():
    cfg = tiny_training_config()
    cfg.model.dtype = "bfloat16"
    cfg.model.remat = True
    model_cfg = validate_config(cfg)
    assert (model_cfg.dtype, model_cfg.param_dtype) == ("bfloat16", "float32")
    params = jax.eval_shape(lambda: init_params(model_cfg, 0))
    assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype("float32")}
    from flax import nnx
    x = jax.ShapeDtypeStruct((2, 8, 8, 3), np.float32)

    def residual_bytes(remat: bool) -> int:
        """What the backward keeps from the forward: the residuals in `jax.vjp`'s function."""
        variant = model_cfg.copy_and_resolve_references()
        variant.remat = remat
        graphdef, _ = nnx.split(abstract_model(variant))
        loss = lambda p, x: apply_model(graphdef, p, x, train=True).astype(np.float32).mean()
        residuals = jax.eval_shape(lambda p, x: jax.vjp(loss, p, x)[1], params, x)
        return sum(r.size * r.dtype.itemsize for r in jax.tree.leaves(residuals))

    kept, all_of_it = residual_bytes(True), residual_bytes(False)
    assert kept < all_of_it / 2, (kept, all_of_it)
    graphdef, _ = nnx.split(abstract_model(model_cfg))
    out = jax.eval_shape(lambda p, x: apply_model(graphdef, p, x, train=True), params, x)
    assert out.dtype == np.dtype("bfloat16")  # computed in bfloat16
