"""Optimiser and learning-rate schedule of the official IET recipes (DESIGN.md section 5).

- Schedule: BasicSR's linear warm-up then MultiStepLR. For the update with index `t`
  (0 for the first), `lr(t) = base * (t + 1) / warmup` while `t + 1 < warmup`, else
  `base * gamma ** #{m in milestones : m <= t}`.
- Groups (the official `MuonWithAuxAdam`): 4-D parameters (convolution kernels, including
  the depthwise ones) use Muon at `muon_lr_scale` times the rate, with the kernel seen as an
  (kh*kw*in, out) matrix; all other parameters use Adam (b1, b2). Both decay the weights
  decoupled, by `lr * weight_decay` per step. With `muon=False` everything uses Adam.
- Optional global-norm gradient clipping before both.

The rate does not depend on the number of devices: `batch_size` is global.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from optax.contrib import MuonDimensionNumbers

MUON, ADAM = "muon", "adam"
# (kh, kw, in, out) kernels: reduce over (kh, kw, in), output axis `out`. This is
# PyTorch's `weight.view(out, -1)` of the official Muon for (out, in, kh, kw) kernels.
CONV_DIMENSIONS = MuonDimensionNumbers(reduction_axis=(0, 1, 2), output_axis=3)


def learning_rate_schedule(base: float, warmup_steps: int, milestones, gamma: float = 0.5
                           ) -> Callable[[Any], jax.Array]:
    """The rate of update `count` (0-based), as optax passes it."""
    milestones = tuple(int(m) for m in milestones)
    if list(milestones) != sorted(milestones):
        raise ValueError(f"optim.milestones must be increasing, got {milestones}")

    def schedule(count):
        count = jnp.asarray(count)
        decays = sum((count >= m).astype(jnp.int32) for m in milestones) if milestones else 0
        rate = base * jnp.asarray(gamma, jnp.float32) ** decays
        if warmup_steps > 0:
            warm = base * (count + 1).astype(jnp.float32) / warmup_steps
            rate = jnp.where(count + 1 < warmup_steps, warm, rate)
        return jnp.asarray(rate, jnp.float32)

    return schedule


def param_labels(params, muon: bool = True):
    """'muon' for 4-D leaves (conv kernels) when `muon`, else 'adam'."""
    return jax.tree.map(lambda p: MUON if muon and jnp.ndim(p) == 4 else ADAM, params)


def make_optimizer(optim: ml_collections.ConfigDict
                   ) -> tuple[optax.GradientTransformation, Callable[[Any], jax.Array]]:
    """(transformation, schedule of the base rate) from a config's `optim` section."""
    schedule = learning_rate_schedule(optim.learning_rate, optim.warmup_steps,
                                      optim.milestones, optim.gamma)
    adam = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                       weight_decay=optim.weight_decay)
    parts = []
    if optim.grad_clip_norm and optim.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(optim.grad_clip_norm))
    if optim.muon:
        scale = float(optim.muon_lr_scale)
        muon = optax.contrib.muon(
            lambda count: scale * schedule(count), beta=optim.muon_momentum, nesterov=True,
            weight_decay=optim.weight_decay,
            muon_weight_dimension_numbers=lambda tree: jax.tree.map(
                lambda _: CONV_DIMENSIONS, tree),
        )
        parts.append(optax.multi_transform(
            {MUON: muon, ADAM: adam}, lambda params: param_labels(params, True)))
    else:
        parts.append(adam)
    return optax.chain(*parts), schedule
