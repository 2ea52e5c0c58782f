"""The train step: L1 loss, gradients (optionally over micro-batches), the optimiser update and
the EMA, as one function of (state, batch) for `jax.jit`.

A step whose loss or gradient norm is not finite changes nothing but the counters
(`skipped`); the loop decides whether to stop.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from iet_jax.training import sharding as sharding_lib
from iet_jax.training import state as ts


def make_train_step(config, graphdef, tx, schedule, compute_dtype):
    accum = config.optim.grad_accum_steps
    decay = float(config.ema_decay)
    acc_dtype = jnp.float64 if compute_dtype == jnp.float64 else jnp.float32

    def loss_fn(params, lr, hr):
        sr = ts.apply_model(graphdef, params, lr.astype(compute_dtype), train=True)
        return jnp.mean(jnp.abs(sr.astype(acc_dtype) - hr.astype(acc_dtype)))

    grad_fn = jax.value_and_grad(loss_fn)

    def step(state: ts.TrainState, batch: dict):
        if accum == 1:
            loss, grads = grad_fn(state.params, batch["lr"], batch["hr"])
        else:
            # Micro-batch i holds rows i, i + accum, ...: every device keeps its share.
            def split(x):
                x = x.reshape((x.shape[0] // accum, accum) + x.shape[1:]).swapaxes(0, 1)
                return jax.lax.with_sharding_constraint(
                    x, jax.sharding.PartitionSpec(None, sharding_lib.BATCH_AXES))

            micro = jax.tree.map(split, batch)

            def body(carry, mb):
                loss, grads = grad_fn(state.params, mb["lr"], mb["hr"])
                return (carry[0] + loss, jax.tree.map(jnp.add, carry[1], grads)), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            (loss, grads), _ = jax.lax.scan(body, (jnp.zeros((), acc_dtype), zeros), micro)
            loss = loss / accum
            grads = jax.tree.map(lambda g: g / accum, grads)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = ts.ema_update(state.ema, params, decay)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def keep(new, old):  # a non-finite step changes nothing but the counters
            return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)

        new_state = ts.TrainState(
            step=state.step + 1, params=keep(params, state.params), ema=keep(ema, state.ema),
            opt_state=keep(opt_state, state.opt_state), rng=state.rng,
            skipped=state.skipped + (~ok).astype(jnp.int32))
        metrics = {"loss": loss.astype(jnp.float32), "grad_norm": grad_norm.astype(jnp.float32),
                   "lr": schedule(state.step),
                   "finite": ok}
        return new_state, metrics

    return step
