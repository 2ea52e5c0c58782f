"""Learning-rate schedule, Muon/Adam grouping and the recipe table (DESIGN.md section 5)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from iet_jax import config as config_lib
from iet_jax import optim
from iet_jax.model import IET

TABLE = {  # recipe: (dataset, LR patch, global batch, lr, iterations, milestones, warm-up)
    ("iet", 2): ("df2k", 58, 48, 2e-4, 400_000, (250_000, 350_000, 375_000, 390_000), 10_000),
    ("iet", 3): ("df2k", 82, 24, 2e-5, 250_000, (50_000, 70_000, 90_000, 95_000), 100),
    ("iet", 4): ("df2k", 56, 48, 3e-5, 250_000, (50_000, 70_000, 90_000, 95_000), 1000),
    ("iet_light", 2): ("div2k", 78, 56, 5e-4, 400_000,
                       (200_000, 300_000, 350_000, 375_000, 390_000), 20_000),
    ("iet_light", 3): ("div2k", 78, 56, 5e-4, 250_000, (25_000, 40_000, 50_000, 60_000), 10_000),
    ("iet_light", 4): ("div2k", 78, 56, 5e-4, 250_000, (50_000, 70_000, 90_000, 100_000), 10_000),
}


@pytest.mark.parametrize("variant,scale", sorted(TABLE))
def test_recipe_fields(variant, scale):
    cfg = config_lib.recipe(variant, scale)
    dataset, patch, batch, lr, steps, milestones, warmup = TABLE[variant, scale]
    assert (cfg.data.dataset, cfg.data.patch_size, cfg.batch_size) == (dataset, patch, batch)
    assert (cfg.optim.learning_rate, cfg.num_steps) == (lr, steps)
    assert (tuple(cfg.optim.milestones), cfg.optim.warmup_steps) == (milestones, warmup)
    assert cfg.optim.gamma == 0.5 and cfg.optim.weight_decay == 1e-3
    assert (cfg.optim.b1, cfg.optim.b2) == (0.9, 0.99)
    assert cfg.optim.muon and cfg.optim.muon_lr_scale == (5.0 if variant == "iet" else 6.0)
    assert cfg.ema_decay == 0.999
    assert cfg.data.scale == cfg.model.scale == scale
    assert bool(cfg.init_from) == (scale != 2)  # x3/x4 fine-tune from the x2 model
    assert cfg.data.patch_size >= cfg.model.sparse_range * cfg.model.dilation


def test_schedule_warmup_and_milestones():
    cfg = config_lib.recipe("iet_light", 2).optim
    schedule = optim.learning_rate_schedule(cfg.learning_rate, cfg.warmup_steps, cfg.milestones,
                                            cfg.gamma)
    base = 5e-4
    # BasicSR: update t (0-based) is iteration t + 1; linear warm-up while t + 1 < 20000,
    # then MultiStepLR halves at each milestone m once t >= m.
    expect = {0: base / 20000, 9: base * 10 / 20000, 19_998: base * 19_999 / 20000,
              19_999: base, 199_999: base, 200_000: base / 2, 299_999: base / 2,
              300_000: base / 4, 350_000: base / 8, 375_000: base / 16, 390_000: base / 32,
              399_999: base / 32}
    for t, want in expect.items():
        np.testing.assert_allclose(float(schedule(t)), want, rtol=1e-6, err_msg=str(t))


def test_muon_for_conv_kernels_adam_for_the_rest():
    model = nnx.eval_shape(lambda: IET(config_lib.official("iet_light", 2), rngs=nnx.Rngs(0)))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    labels = optim.param_labels(params)
    flat = {"/".join(str(getattr(k, "key", k)) for k in path): (leaf, lab)
            for (path, leaf), lab in zip(jax.tree_util.tree_leaves_with_path(params),
                                         jax.tree.leaves(labels))}
    for name, (leaf, lab) in flat.items():
        assert lab == ("muon" if len(leaf.shape) == 4 else "adam"), name
    assert flat["conv_first/kernel"][1] == "muon"
    assert flat["blocks/0/layers/0/lepe/conv/kernel"][1] == "muon"  # depthwise too
    assert flat["blocks/0/layers/0/wqkv/kernel"][1] == "adam"  # linear layers: Adam
    assert flat["conv_first/bias"][1] == "adam"
    assert optim.param_labels(params, muon=False) == jax.tree.map(lambda _: "adam", params)


def test_optimizer_groups_update_as_configured():
    """First update: Adam moves every non-4-D weight by lr (sign of the gradient); Muon moves
    conv kernels by muon_lr_scale * lr times an orthogonalised direction, plus decoupled decay."""
    cfg = config_lib.recipe("iet", 2).optim
    cfg.warmup_steps = 0
    tx, schedule = optim.make_optimizer(cfg)
    key = jax.random.key(0)
    params = {"conv": jax.random.normal(key, (3, 3, 4, 8)), "bias": jnp.ones((8,)),
              "linear": jnp.ones((8, 16))}
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(1), p.shape), params)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    lr, wd = cfg.learning_rate, cfg.weight_decay
    for name in ("bias", "linear"):  # Adam's first step is lr * g/|g| (eps negligible)
        want = -lr * (np.sign(grads[name]) + wd * params[name])
        np.testing.assert_allclose(updates[name], want, rtol=1e-4, atol=1e-12)
    # Muon: NS-orthogonalised (kh*kw*in, out) matrix, scaled by sqrt(max(1, out/in)) = 1
    u = -(np.asarray(updates["conv"]) + 5 * lr * wd * np.asarray(params["conv"])) / (5 * lr)
    m = u.reshape(36, 8)
    sv = np.linalg.svd(m, compute_uv=False)
    assert np.all((sv > 0.5) & (sv < 1.3)), sv  # Muon's approximate orthogonalisation
    assert not np.allclose(updates["conv"], -5 * lr * np.sign(grads["conv"]))


def test_no_muon_is_plain_adamw():
    cfg = config_lib.recipe("iet", 2).optim
    cfg.muon = False
    cfg.grad_clip_norm = 1.0
    tx, _ = optim.make_optimizer(cfg)
    params = {"conv": jnp.ones((3, 3, 2, 2))}
    grads = {"conv": jnp.full((3, 3, 2, 2), 10.0)}
    updates, _ = tx.update(grads, tx.init(params), params)
    lr = cfg.learning_rate / cfg.warmup_steps  # first warm-up step
    np.testing.assert_allclose(updates["conv"], -lr * (1.0 + 1e-3), rtol=1e-5)
    assert isinstance(optax.tree.norm(grads), jax.Array)
