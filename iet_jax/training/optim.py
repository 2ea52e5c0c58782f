"""Optimiser and learning-rate schedule of the official IET recipes.

- Schedule: BasicSR's linear warm-up then MultiStepLR. For the update with index `t`
  (0 for the first), `lr(t) = base * (t + 1) / warmup` while `t + 1 < warmup`, else
  `base * gamma ** #{m in milestones : m <= t}`.
- Groups (the official `MuonWithAuxAdam`): 4-D parameters (convolution kernels, including
  the depthwise ones) use Muon at `muon_lr_scale` times the rate; all other parameters use
  Adam (b1, b2, eps, bias-corrected). Both decay the weights decoupled: `p *= 1 - lr * wd`
  with the group's rate. With `muon=False` everything uses Adam.
- `muon_variant="official"`: the update of the `muon-optimizer` package, for a gradient `g`
  of a kernel seen as PyTorch's (out, in*kh*kw) matrix `G` (our kernels are (kh, kw, in, out)):
      m <- beta * m + (1 - beta) * g              (float32, no bias correction)
      u = (1 - beta) * g + beta * m                (Nesterov)
      O = NS5(u as G) * sqrt(max(1, kh / kw))      (bfloat16)
      p <- p * (1 - lr * wd) - lr * O
  NS5 transposes G when it has more rows than columns, divides by (Frobenius norm + 1e-7)
  and runs 5 quintic Newton-Schulz steps X <- a X + (b A + (c A) A) X, A = X X^T, with
  (a, b, c) = (3.4445, -4.7750, 2.0315). Every value from the cast of `u` to the result is
  bfloat16: each matmul sums in float32 and rounds its result, each elementwise operation
  computes in float32 and rounds. The scale uses the last two dimensions of the 4-D gradient,
  (kh, kw), as the package does, so it is 1 for square kernels.
  `muon_variant="optax"`: `optax.contrib.muon` (bias-corrected Nesterov momentum,
  Newton-Schulz in float32, scale sqrt(max(1, out / (kh*kw*in)))).
- Optional global-norm gradient clipping before both.

The rate does not depend on the number of devices: `batch_size` is global.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from optax.contrib import MuonDimensionNumbers

MUON, ADAM = "muon", "adam"
MUON_VARIANTS = ("official", "optax")
# (kh, kw, in, out) kernels: reduce over (kh, kw, in), output axis `out` (optax's Muon).
CONV_DIMENSIONS = MuonDimensionNumbers(reduction_axis=(0, 1, 2), output_axis=3)
NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)  # (a, b, c) of the quintic iteration
NEWTON_SCHULZ_STEPS = 5


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


# ----------------------------------------------------------------------------- official Muon


def _bf16(x: jax.Array) -> jax.Array:
    """Round float32 values to bfloat16 precision (kept as float32). Unlike a pair of casts,
    XLA may not drop this rounding."""
    return jax.lax.reduce_precision(x, exponent_bits=8, mantissa_bits=7)


def _bf16_matmul(x: jax.Array, y: jax.Array) -> jax.Array:
    """bfloat16 x bfloat16 -> float32 sums -> rounded to bfloat16."""
    out = jnp.matmul(x.astype(jnp.bfloat16), y.astype(jnp.bfloat16),
                     preferred_element_type=jnp.float32)
    return _bf16(out)


def newton_schulz_bf16(g: jax.Array, steps: int = NEWTON_SCHULZ_STEPS) -> jax.Array:
    """The official orthogonalisation of a (rows, cols) float32 matrix, in bfloat16 precision
    (returned as float32 holding bfloat16 values)."""
    a, b, c = NEWTON_SCHULZ
    tall = g.shape[0] > g.shape[1]
    x = _bf16(g.T if tall else g)
    norm = _bf16(jnp.sqrt(jnp.sum(x * x)))  # float32 sum of the bfloat16 values
    x = _bf16(x / _bf16(norm + 1e-7))
    for _ in range(steps):
        gram = _bf16_matmul(x, x.T)
        poly = _bf16(_bf16(b * gram) + _bf16_matmul(_bf16(c * gram), gram))
        x = _bf16(_bf16(a * x) + _bf16_matmul(poly, x))
    return x.T if tall else x


def _official_muon_direction(u: jax.Array) -> jax.Array:
    """NS5 of a (kh, kw, in, out) kernel's update, seen as PyTorch's (out, in*kh*kw) matrix."""
    if u.ndim != 4:
        raise ValueError(f"official Muon takes 4-D convolution kernels, got shape {u.shape}")
    kh, kw, cin, cout = u.shape
    matrix = u.transpose(3, 2, 0, 1).reshape(cout, cin * kh * kw)
    out = newton_schulz_bf16(matrix.astype(jnp.float32))
    # PyTorch's gradient is (out, in, kh, kw): its last two dimensions are (kh, kw).
    out = _bf16(out * max(1.0, kh / kw) ** 0.5)
    return out.reshape(cout, cin, kh, kw).transpose(2, 3, 1, 0).astype(u.dtype)


class OfficialMuonState(NamedTuple):
    momentum: Any  # float32 buffer per kernel, like the parameters


def scale_by_official_muon(beta: float = 0.95) -> optax.GradientTransformation:
    """The `muon-optimizer` package's Muon direction (Nesterov momentum, not bias-corrected,
    then bfloat16 Newton-Schulz); the rate and weight decay are applied after it."""

    def init(params):
        return OfficialMuonState(momentum=jax.tree.map(jnp.zeros_like, params))

    def update(grads, state, params=None):
        del params
        momentum = jax.tree.map(lambda m, g: beta * m + (1 - beta) * g, state.momentum, grads)
        nesterov = jax.tree.map(lambda m, g: (1 - beta) * g + beta * m, momentum, grads)
        return jax.tree.map(_official_muon_direction, nesterov), OfficialMuonState(momentum)

    return optax.GradientTransformation(init, update)


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
        muon_rate = lambda count: scale * schedule(count)
        variant = optim.muon_variant
        if variant == "official":
            muon = optax.chain(scale_by_official_muon(optim.muon_momentum),
                               optax.add_decayed_weights(optim.weight_decay),
                               optax.scale_by_learning_rate(muon_rate))
        elif variant == "optax":
            muon = optax.contrib.muon(
                muon_rate, beta=optim.muon_momentum, nesterov=True,
                weight_decay=optim.weight_decay,
                muon_weight_dimension_numbers=lambda tree: jax.tree.map(
                    lambda _: CONV_DIMENSIONS, tree),
            )
        else:
            raise ValueError(f"optim.muon_variant must be one of {MUON_VARIANTS}, got {variant!r}")
        parts.append(optax.multi_transform(
            {MUON: muon, ADAM: adam}, lambda params: param_labels(params, True)))
    else:
        parts.append(adam)
    return optax.chain(*parts), schedule
