"""Non-finite training states: an update that would make the parameters, EMA or optimiser state
NaN/inf is skipped like a non-finite loss, such a state is never saved, and absurd learning
rates are refused before any compute.

The updates are made non-finite by an optimiser transform (`poison`), since every rate the
config accepts keeps them finite.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from iet_jax import train
from iet_jax.io import workdir as workdir_lib
from iet_jax.model.network import abstract_model
from iet_jax.training import optim as optim_lib
from iet_jax.training import state as ts
from iet_jax.training.config import ConfigError, validate_config
from iet_jax.training.loop import NonFiniteError, save_checkpoint, train_and_evaluate
from iet_jax.training.step import make_train_step
from tiny import CONFIGS, read_item, synthetic_source, tiny_training_config

FINE, INF_UPDATES, INF_STATE = 0, 1, 2


class PoisonState(NamedTuple):
    mode: jax.Array  # int32: FINE, INF_UPDATES or INF_STATE
    junk: jax.Array  # float32: becomes inf in mode INF_STATE


def poison(mode: int) -> optax.GradientTransformation:
    """Passes the updates through (FINE), makes them inf (INF_UPDATES), or leaves them and
    makes its own state inf (INF_STATE)."""

    def init(params):
        del params
        return PoisonState(jnp.asarray(mode, jnp.int32), jnp.zeros((), jnp.float32))

    def update(updates, state, params=None):
        del params
        updates = jax.tree.map(lambda u: jnp.where(state.mode == INF_UPDATES, jnp.inf, u),
                               updates)
        junk = jnp.where(state.mode == INF_STATE, jnp.inf, state.junk)
        return updates, PoisonState(state.mode, junk)

    return optax.GradientTransformation(init, update)


def finite(tree) -> bool:
    return all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(tree)
               if np.issubdtype(np.asarray(x).dtype, np.inexact))


def assert_same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_update_making_the_state_nonfinite_is_skipped():
    """Finite loss and gradients, but inf updates or an inf optimiser state: nothing but the
    counters changes, and the metrics say why. A fine update is applied."""
    cfg = tiny_training_config()
    model_cfg = validate_config(cfg)
    tx = optax.chain(optax.adam(1e-3), poison(FINE))  # adam's count: an integer leaf
    state = ts.create_train_state(model_cfg, cfg, tx)()
    graphdef, _ = nnx.split(abstract_model(model_cfg))
    step = jax.jit(make_train_step(cfg, graphdef, tx, lambda count: 1e-3, jnp.float32))
    rng = np.random.default_rng(0)
    batch = {"lr": jnp.asarray(rng.random((4, 8, 8, 3), np.float32)),
             "hr": jnp.asarray(rng.random((4, 16, 16, 3), np.float32))}

    def with_mode(mode):
        adam, _ = state.opt_state
        return state.replace(opt_state=(adam, PoisonState(jnp.asarray(mode, jnp.int32),
                                                          jnp.zeros((), jnp.float32))))

    for mode in (INF_UPDATES, INF_STATE):
        old = with_mode(mode)
        new, m = step(old, batch)
        assert (int(new.step), int(new.skipped)) == (1, 1), mode
        assert (bool(m["finite"]), bool(m["finite_grads"]), bool(m["finite_update"])) == (
            False, True, False), mode
        assert np.isfinite(float(m["loss"])) and np.isfinite(float(m["grad_norm"]))
        assert_same(new.params, old.params)
        assert_same(new.ema, old.ema)
        assert_same(new.opt_state, old.opt_state)  # adam's count too

    old = with_mode(FINE)
    new, m = step(old, batch)
    assert (int(new.step), int(new.skipped)) == (1, 0)
    assert bool(m["finite"]) and bool(m["finite_update"])
    assert int(new.opt_state[0][0].count) == 1
    assert not np.array_equal(np.asarray(new.params["conv_first"]["kernel"]),
                              np.asarray(old.params["conv_first"]["kernel"]))


@pytest.fixture
def inf_updates(monkeypatch):
    """Every update of a run's optimiser is inf (loss and gradients stay finite)."""
    real = optim_lib.make_optimizer

    def make_optimizer(optim):
        tx, schedule = real(optim)
        return optax.chain(tx, poison(INF_UPDATES)), schedule

    monkeypatch.setattr(optim_lib, "make_optimizer", make_optimizer)


def test_stop_before_any_checkpoint_names_the_step_and_a_fresh_start(tmp_path, inf_updates):
    cfg = tiny_training_config(steps=3)
    assert cfg.nonfinite == "stop"
    with pytest.raises(NonFiniteError) as info:
        train_and_evaluate(cfg, tmp_path / "wd", train_source=synthetic_source(4, 0))
    message = str(info.value)
    assert message.startswith("the update made the parameters, EMA or optimiser state "
                              "non-finite at step 1 "), message
    assert "No checkpoint was saved yet" in message and "from scratch" in message
    assert "None" not in message and "\n" not in message
    assert workdir_lib.workdir_steps(tmp_path / "wd") == []


def test_skip_never_saves_a_nonfinite_state(tmp_path, inf_updates):
    """With nonfinite=skip and every update inf, the run ends with the initial weights, and
    each checkpoint holds them; a rerun with nonfinite=stop names its last checkpoint."""
    cfg = tiny_training_config(steps=3)
    cfg.nonfinite = "skip"
    workdir = tmp_path / "wd"
    summary = train_and_evaluate(cfg, workdir, train_source=synthetic_source(4, 0))
    assert (summary["step"], summary["skipped"]) == (3, 3)
    assert workdir_lib.workdir_steps(workdir) == [1, 2, 3]
    for step in (1, 2, 3):
        for item in ("params", "ema", "opt_state"):
            assert finite(read_item(workdir, step, item)), (step, item)
        assert_same(read_item(workdir, step, "params"), summary["state"].params)
        assert_same(read_item(workdir, step, "ema"), summary["state"].ema)

    cfg.nonfinite, cfg.num_steps = "stop", 4
    with pytest.raises(NonFiniteError, match=r"at step 4 .*Last good checkpoint: step 3 in "):
        train_and_evaluate(cfg, workdir, train_source=synthetic_source(4, 0))


def test_save_checkpoint_refuses_a_nonfinite_state(tmp_path):
    checkpoints = workdir_lib.Checkpoints(tmp_path / "wd", keep=3, async_save=False,
                                          keep_best=False)

    class Loader:
        def get_state(self):
            return {"step": 5}

    params = {"w": jnp.ones((2, 2)), "b": jnp.zeros((2,))}
    tx = optax.adam(1e-3)
    state = ts.TrainState(step=jnp.asarray(5, jnp.int32), params=params,
                          ema=jax.tree.map(jnp.copy, params), opt_state=tx.init(params),
                          rng=jax.random.key_data(jax.random.key(0)),
                          skipped=jnp.zeros((), jnp.int32))
    bad = {"params": {"w": params["w"].at[0, 1].set(jnp.inf), "b": params["b"]},
           "ema": {"w": params["w"], "b": params["b"].at[1].set(jnp.nan)},
           "opt_state": (optax.ScaleByAdamState(jnp.asarray(5, jnp.int32), params,
                                                {"w": params["w"], "b": params["b"] / 0}),
                         *state.opt_state[1:])}
    try:
        for field, value in bad.items():
            with pytest.raises(NonFiniteError, match=r"refusing to save step 5: .* not finite\. "
                                                     r"No checkpoint was saved yet"):
                save_checkpoint(checkpoints, state.replace(**{field: value}), Loader(), 5,
                                None, None)
        assert checkpoints.latest_step() is None
        save_checkpoint(checkpoints, state, Loader(), 5, None, None)  # a finite one is saved
        assert checkpoints.latest_step() == 5
    finally:
        checkpoints.close()


@pytest.mark.parametrize("rate", [1e39, -1.0, float("nan"), float("inf"), 0.0, 0.5])
def test_absurd_learning_rates_are_refused(rate):
    """The base rate must be finite and in (0, 1 / muon_lr_scale]: 0.5 is refused with
    Muon at 6 x the rate (3 per step) but accepted with Adam alone."""
    cfg = tiny_training_config()
    cfg.optim.learning_rate = rate
    with pytest.raises(ConfigError, match=r"^optim\.learning_rate must be finite with 0 < "
                                          r"optim\.learning_rate <= 0\.166667 .*, got "):
        validate_config(cfg)
    if rate == 0.5:
        cfg.optim.muon = False
        validate_config(cfg)


def test_absurd_learning_rate_on_the_command_line(tmp_path, capsys):
    rc = train.main(["train", f"--config={CONFIGS / 'demo.py'}", f"--workdir={tmp_path / 'wd'}",
                     "--config.optim.learning_rate=1e39"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "optim.learning_rate" in err and "1e+39" in err
    assert not (tmp_path / "wd").exists()
