"""The train step: L1 loss, gradients (optionally over micro-batches), the optimiser update and
the EMA, as one function of (state, batch) for `jax.jit`.

A step whose loss or gradient norm is not finite, or whose update would make the parameters,
the EMA or the optimiser state non-finite, changes nothing but the counters (`skipped`); the
loop decides whether to stop.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from iet_jax.model.network import abstract_model
from iet_jax.training import sharding as sharding_lib
from iet_jax.training import state as ts


def all_finite(tree) -> jax.Array:
    """One boolean: every floating-point leaf of `tree` is finite (integer leaves, such as
    optax's step counts, cannot be NaN or inf and are not read)."""
    checks = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    return jnp.stack(checks).all() if checks else jnp.asarray(True)


def accumulate_gradients(loss_fn, params, batch: dict, steps: int, acc_dtype=jnp.float32):
    """(mean loss, mean gradients) of `loss_fn(params, lr, hr)` over `steps` micro-batches.

    Micro-batch i holds rows i, i + steps, ...: every device keeps its share of the batch.
    With `steps == 1` it is one `jax.value_and_grad` call on the whole batch.
    """
    grad_fn = jax.value_and_grad(loss_fn)
    if steps == 1:
        return grad_fn(params, batch["lr"], batch["hr"])

    def split(x):
        x = x.reshape((x.shape[0] // steps, steps) + x.shape[1:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(
            x, jax.sharding.PartitionSpec(None, sharding_lib.BATCH_AXES))

    micro = jax.tree.map(split, batch)

    def body(carry, mb):
        loss, grads = grad_fn(params, mb["lr"], mb["hr"])
        return (carry[0] + loss, jax.tree.map(jnp.add, carry[1], grads)), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    (loss, grads), _ = jax.lax.scan(body, (jnp.zeros((), acc_dtype), zeros), micro)
    return loss / steps, jax.tree.map(lambda g: g / steps, grads)


def make_train_step(config, graphdef, tx, schedule, compute_dtype):
    """step(state, batch) -> (new state, metrics): the function `compile_train_step` jits.

    The metrics hold the loss, gradient norm and rate, and three booleans: `finite` (the
    update was applied), `finite_grads` (the loss and gradient norm were finite) and
    `finite_update` (the new parameters, EMA and optimiser state were finite)."""
    accum = config.optim.grad_accum_steps
    decay = float(config.ema_decay)
    acc_dtype = jnp.float64 if compute_dtype == jnp.float64 else jnp.float32

    def loss_fn(params, lr, hr):
        sr = ts.apply_model(graphdef, params, lr.astype(compute_dtype), train=True)
        return jnp.mean(jnp.abs(sr.astype(acc_dtype) - hr.astype(acc_dtype)))

    def step(state: ts.TrainState, batch: dict):
        loss, grads = accumulate_gradients(loss_fn, state.params, batch, accum, acc_dtype)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = ts.ema_update(state.ema, params, decay)
        finite_grads = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        finite_update = all_finite((params, ema, opt_state))
        ok = finite_grads & finite_update

        def keep(new, old):  # a non-finite step changes nothing but the counters
            return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)

        new_state = ts.TrainState(
            step=state.step + 1, params=keep(params, state.params), ema=keep(ema, state.ema),
            opt_state=keep(opt_state, state.opt_state), rng=state.rng,
            skipped=state.skipped + (~ok).astype(jnp.int32))
        metrics = {"loss": loss.astype(jnp.float32), "grad_norm": grad_norm.astype(jnp.float32),
                   "lr": schedule(state.step),
                   "finite": ok, "finite_grads": finite_grads,
                   "finite_update": finite_update}
        return new_state, metrics

    return step


def compile_train_step(config, model_cfg, tx, schedule, shardings, mesh):
    """The train step jitted over `mesh`: the state (donated) in `shardings`, the batch split
    over the data axes, the metrics replicated. Compiled on its first call."""
    graphdef, _ = nnx.split(abstract_model(model_cfg))
    step = make_train_step(config, graphdef, tx, schedule, jnp.dtype(model_cfg.dtype))
    return jax.jit(step, in_shardings=(shardings, sharding_lib.batch_sharding(mesh)),
                   out_shardings=(shardings, sharding_lib.replicated(mesh)),
                   donate_argnums=(0,))
