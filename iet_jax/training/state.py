"""The train state: everything a train step reads and writes, and its EMA update.

Parameters travel as nested dicts with string keys (the form orbax stores): `init_params`
makes them, `apply_model` runs the network on them. `to_items` / `from_items` turn the state
into the array items a training workdir stores (`iet_jax.io.workdir.Checkpoints`) and back.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from iet_jax.io import stored
from iet_jax.model.network import IET


@flax.struct.dataclass
class TrainState:
    """Everything a train step reads and writes. `params`/`ema` are nested dicts with string
    keys (the form orbax stores); `opt_state` is optax's state for `params`."""

    step: jax.Array  # int32: updates applied so far
    params: Any
    ema: Any
    opt_state: Any
    rng: jax.Array  # uint32 key data (reserved for stochastic training; saved and restored)
    skipped: jax.Array  # int32: steps skipped (non-finite loss/gradients or new state)


def to_items(state: TrainState) -> dict[str, Any]:
    """The state as the array items of a workdir checkpoint (`Checkpoints.save`)."""
    return {"params": state.params, "ema": state.ema, "opt_state": state.opt_state,
            "train": {"step": state.step, "rng": state.rng, "skipped": state.skipped}}


def from_items(items: dict[str, Any]) -> TrainState:
    train = items["train"]
    return TrainState(step=train["step"], params=items["params"], ema=items["ema"],
                      opt_state=items["opt_state"], rng=train["rng"], skipped=train["skipped"])


def abstract_like(state: TrainState, shardings) -> TrainState:
    """ShapeDtypeStructs with the given shardings (a tree like `state`)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        state, shardings)


def ema_update(ema, params, decay: float):
    """ema <- decay * ema + (1 - decay) * params (BasicSR's `model_ema`)."""
    return jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p).astype(e.dtype),
                        ema, params)


def init_params(model_cfg, seed: int):
    """Freshly initialised parameters as a nested dict with string keys."""
    model = IET(model_cfg, rngs=nnx.Rngs(seed))
    return stored.with_str_keys(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def create_train_state(model_cfg, config, tx):
    """A function of no arguments making the fresh train state (`config.seed`): for
    `jax.eval_shape`, and for `jax.jit` with the state's shardings as `out_shardings`.
    The EMA is a copy of the parameters, so the two get buffers of their own (donation)."""

    def create() -> TrainState:
        seed = config.seed
        params = init_params(model_cfg, seed)
        return TrainState(
            step=jnp.zeros((), jnp.int32), params=params, ema=jax.tree.map(jnp.copy, params),
            opt_state=tx.init(params),
            rng=jax.random.key_data(jax.random.key(seed)), skipped=jnp.zeros((), jnp.int32))

    return create


def apply_model(graphdef, params, x, *, train: bool):
    return nnx.merge(graphdef, stored.with_int_keys(params))(x, train=train)
