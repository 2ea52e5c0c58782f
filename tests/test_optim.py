"""Learning-rate schedule, Muon/Adam grouping, the official update rule and the recipe table."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from flax import nnx

from iet_jax.model import IET
from iet_jax.model import config as config_lib
from iet_jax.training import optim
from iet_jax.training.config import recipe

TABLE = {  # options/train/*.yml: (dataset, LR patch, global batch, lr, iterations, milestones,
    # warm-up, remat (use_checkpoint), starts from)
    ("iet", 2, "scratch"): ("df2k", 58, 48, 2e-4, 400_000,
                            (250_000, 350_000, 375_000, 390_000), 10_000, False, ""),
    ("iet", 2, "finetune"): ("df2k", 82, 24, 3e-5, 250_000,
                             (100_000, 150_000, 170_000, 190_000, 200_000), 100, True,
                             "workdirs/iet_x2"),
    ("iet", 3, "finetune"): ("df2k", 82, 24, 2e-5, 250_000, (50_000, 70_000, 90_000, 95_000),
                             100, True, "workdirs/iet_x2_finetune"),
    ("iet", 4, "finetune"): ("df2k", 56, 48, 3e-5, 250_000, (50_000, 70_000, 90_000, 95_000),
                             1000, True, "workdirs/iet_x2_finetune"),
    ("iet_light", 2, "scratch"): ("div2k", 78, 56, 5e-4, 400_000,
                                  (200_000, 300_000, 350_000, 375_000, 390_000), 20_000, False,
                                  ""),
    ("iet_light", 3, "finetune"): ("div2k", 78, 56, 5e-4, 250_000,
                                   (25_000, 40_000, 50_000, 60_000), 10_000, False,
                                   "workdirs/iet_light_x2"),
    ("iet_light", 4, "finetune"): ("div2k", 78, 56, 5e-4, 250_000,
                                   (50_000, 70_000, 90_000, 100_000), 10_000, False,
                                   "workdirs/iet_light_x2"),
}
# Train-settings networks (dilation, img_size): 001 changes both from 000's.
NETWORKS = {("iet", 2, "scratch"): (2, 58), ("iet", 2, "finetune"): (3, 82),
            ("iet", 3, "finetune"): (3, 82), ("iet", 4, "finetune"): (2, 56)}


@pytest.mark.parametrize("variant,scale,stage", sorted(TABLE))
def test_recipe_fields(variant, scale, stage):
    cfg = recipe(variant, scale, stage=stage)
    dataset, patch, batch, lr, steps, milestones, warmup, remat, start = TABLE[
        variant, scale, stage]
    assert (cfg.data.dataset, cfg.data.patch_size, cfg.batch_size) == (dataset, patch, batch)
    assert (cfg.optim.learning_rate, cfg.num_steps) == (lr, steps)
    assert (tuple(cfg.optim.milestones), cfg.optim.warmup_steps) == (milestones, warmup)
    assert cfg.optim.gamma == 0.5 and cfg.optim.weight_decay == 1e-3
    assert (cfg.optim.b1, cfg.optim.b2, cfg.optim.eps) == (0.9, 0.99, 1e-10)
    assert cfg.optim.muon and cfg.optim.muon_lr_scale == (5.0 if variant == "iet" else 6.0)
    assert cfg.optim.muon_variant == "official" and cfg.optim.muon_momentum == 0.95
    assert cfg.ema_decay == 0.999
    assert cfg.data.scale == cfg.model.scale == scale
    assert cfg.model.remat == remat
    assert cfg.init_from == start
    if (variant, scale, stage) in NETWORKS:
        assert (cfg.model.dilation, cfg.model.img_size) == NETWORKS[variant, scale, stage]
    assert cfg.data.patch_size >= cfg.model.sparse_range * cfg.model.dilation
    assert cfg.data.patch_size >= cfg.model.img_size
    # the config files name the recipes
    name = f"{variant}_x{scale}" + ("_finetune" if (scale, stage) == (2, "finetune") else "")
    assert cfg.name == name
    from_file = _config_file(name).get_config()
    assert from_file.to_json() == cfg.to_json()
    assert _config_file(name).get_config("eval").model == recipe(
        variant, scale, "eval", stage).model


def _config_file(name):
    import importlib.util
    path = Path(__file__).parent.parent / "configs" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"config_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_recipe_default_stage_and_refusal():
    scratch = recipe("iet", 2, stage="scratch")
    assert recipe("iet", 2).to_json() == scratch.to_json()
    assert recipe("iet", 4).name == "iet_x4"
    eval_ft = recipe("iet", 2, "eval", stage="finetune")
    assert eval_ft.model == config_lib.official("iet", 2, "eval", remat=True)
    with pytest.raises(ValueError,
                       match=r"no official recipe \('iet_light', 2, 'finetune'\); choose one of"):
        recipe("iet_light", 2, stage="finetune")


def test_schedule_warmup_and_milestones():
    cfg = recipe("iet_light", 2).optim
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


# ----------------------------------------------------------------------------- official Muon
# A NumPy transcription of the muon-optimizer package's MuonWithAuxAdam rule, written from
# its description, on PyTorch-layout tensors: (out, in, kh, kw) kernels, (out, in) matrices.

BF16 = ml_dtypes.bfloat16
NS_ABC = (3.4445, -4.7750, 2.0315)


def _round(x, bfloat16=True):
    """One operation's result: computed in float32, stored in bfloat16."""
    x = np.asarray(x, np.float32)
    return x.astype(BF16).astype(np.float32) if bfloat16 else x


def oracle_newton_schulz(g, bfloat16=True):
    """Orthogonalise a (rows, cols) matrix: cast to bfloat16, transpose if rows > cols,
    divide by (Frobenius norm + 1e-7), then 5 times A = X X^T, B = b A + (c A) A,
    X = a X + B X; matmuls sum in float32, every result is rounded to bfloat16."""
    r = lambda x: _round(x, bfloat16)
    a, b, c = NS_ABC
    x = r(g)
    tall = g.shape[0] > g.shape[1]
    if tall:
        x = x.T
    x = r(x / r(r(np.sqrt(np.sum(x * x, dtype=np.float32))) + np.float32(1e-7)))
    for _ in range(5):
        gram = r(x @ x.T)
        poly = r(r(b * gram) + r(r(c * gram) @ gram))
        x = r(r(a * x) + r(poly @ x))
    return x.T if tall else x


def oracle_muon_step(p, g, m, lr, wd, beta=0.95, bfloat16=True):
    """One Muon step on a PyTorch (out, in, kh, kw) kernel -> (new p, new momentum)."""
    m = beta * m + (1 - beta) * g
    u = (1 - beta) * g + beta * m  # Nesterov, no bias correction
    o = oracle_newton_schulz(u.reshape(len(u), -1), bfloat16)
    o = _round(o * max(1.0, g.shape[-2] / g.shape[-1]) ** 0.5, bfloat16)  # of the 4-D grad
    return p * (1 - lr * wd) - lr * o.reshape(p.shape).astype(np.float64), m


def oracle_adam_step(p, g, mu, nu, t, lr, wd, b1=0.9, b2=0.99, eps=1e-10):
    """One step of the auxiliary Adam (t counts from 1)."""
    mu = b1 * mu + (1 - b1) * g
    nu = b2 * nu + (1 - b2) * g * g
    update = (mu / (1 - b1 ** t)) / (np.sqrt(nu / (1 - b2 ** t)) + eps)
    return p * (1 - lr * wd) - lr * update, mu, nu


# (out, in, kh, kw): wide, depthwise (tall, Newton-Schulz on the transpose), a non-square
# kernel (scale sqrt(kh / kw) = sqrt(3) although its matrix is square), a 64-channel conv.
MUON_SHAPES = {"wide": (8, 4, 3, 3), "depthwise": (24, 1, 3, 3), "tall_kernel": (6, 2, 3, 1),
               "conv64": (64, 64, 3, 3)}
ADAM_SHAPES = {"bias": (8,), "linear": (16, 8), "tiny_grads": (5,)}
# Bounds on the relative (Frobenius) error of each kernel's update. Both sides round the same
# bfloat16 operations; only the float32 summation order differs (XLA vs NumPy's BLAS). On
# sums of up to 36 terms that changed nothing here (errors ~1e-7, from the float32 decay).
# On longer sums an order change can flip a rounding by one bfloat16 ulp (2^-8 relative),
# and the Newton-Schulz steps amplify it: for random (64, 576) matrices two valid orders
# (float32 and float64 sums) differed by up to 1.2%. Newton-Schulz in float32 instead of
# bfloat16 is 2.5-3.5% away, so both bounds still see the precision (checked below).
MUON_RTOL = {"wide": 0.005, "depthwise": 0.005, "tall_kernel": 0.005, "conv64": 0.02}


def _rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def _run_both(variant: str, steps: int = 3):
    """Our optimizer and the oracle from the same start on the same gradients: per-step
    relative errors of the Muon kernels' updates, and max relative error of the Adam ones."""
    cfg = recipe("iet", 2).optim
    cfg.muon_variant = variant
    cfg.learning_rate, cfg.warmup_steps, cfg.milestones = 1e-2, 2, (2,)
    lrs = [cfg.learning_rate / 2, cfg.learning_rate, cfg.learning_rate / 2]  # BasicSR's rule
    scale, wd = cfg.muon_lr_scale, cfg.weight_decay
    tx, _ = optim.make_optimizer(cfg)
    rng = np.random.default_rng(0)
    torch_p = {k: rng.standard_normal(s) for k, s in {**MUON_SHAPES, **ADAM_SHAPES}.items()}
    ours = lambda k, x: x.transpose(2, 3, 1, 0) if k in MUON_SHAPES else x  # -> (kh, kw, in, out)
    theirs = lambda k, x: x.transpose(3, 2, 0, 1) if k in MUON_SHAPES else x
    params = {k: jnp.asarray(ours(k, v), jnp.float32) for k, v in torch_p.items()}
    torch_p = {k: np.asarray(theirs(k, np.asarray(v)), np.float64) for k, v in params.items()}
    state = tx.init(params)
    moments = {k: [np.zeros(v.shape, np.float32 if k in MUON_SHAPES else np.float64)] * 2
               for k, v in torch_p.items()}
    update_fn = jax.jit(tx.update)
    muon_err, adam_err = [], 0.0
    for t in range(steps):
        grads = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in torch_p.items()}
        grads["tiny_grads"] *= np.float32(1e-10)  # Adam's eps (1e-10) matters here
        updates, state = update_fn({k: jnp.asarray(ours(k, g)) for k, g in grads.items()},
                                   state, params)
        params = optax.apply_updates(params, updates)
        errors = {}
        for k, g in grads.items():
            if k in MUON_SHAPES:
                new, moments[k][0] = oracle_muon_step(torch_p[k], g, moments[k][0],
                                                      scale * lrs[t], wd)
            else:
                new, *moments[k] = oracle_adam_step(torch_p[k], g.astype(np.float64),
                                                    *moments[k], t + 1, lrs[t], wd)
            errors[k] = _rel(theirs(k, np.asarray(updates[k])), new - torch_p[k])
            torch_p[k] = new
        muon_err.append({k: errors[k] for k in MUON_SHAPES})
        adam_err = max([adam_err] + [errors[k] for k in ADAM_SHAPES])
    return muon_err, adam_err


def test_official_muon_equals_the_official_rule():
    muon_err, adam_err = _run_both("official")
    for t, errors in enumerate(muon_err):
        for name, err in errors.items():
            assert err < MUON_RTOL[name], (t, name, err)
    assert adam_err < 1e-5, adam_err  # float32 vs the float64 oracle


def test_the_oracle_check_sees_bfloat16_and_the_optax_variant():
    """The bound of the test above separates bfloat16 from float32 Newton-Schulz, and
    optax's Muon (bias-corrected momentum, float32, other scale) is far outside it."""
    rng = np.random.default_rng(1)
    for name, shape in MUON_SHAPES.items():
        g = rng.standard_normal(shape).astype(np.float32).reshape(shape[0], -1)
        err = _rel(oracle_newton_schulz(g, bfloat16=False), oracle_newton_schulz(g))
        assert err > 1.2 * MUON_RTOL[name], (name, err)
    muon_err, adam_err = _run_both("optax")
    for name, err in muon_err[-1].items():
        assert err > 1.5 * MUON_RTOL[name], (name, err)
    assert adam_err < 1e-5  # the Adam group is the same in both variants


def test_muon_variant_is_validated():
    cfg = recipe("iet", 2).optim
    cfg.muon_variant = "keller"
    with pytest.raises(ValueError, match=r"optim\.muon_variant must be one of "
                                         r"\('official', 'optax'\), got 'keller'"):
        optim.make_optimizer(cfg)


def test_no_muon_is_plain_adamw():
    cfg = recipe("iet", 2).optim
    cfg.muon = False
    cfg.grad_clip_norm = 1.0
    tx, _ = optim.make_optimizer(cfg)
    params = {"conv": jnp.ones((3, 3, 2, 2))}
    grads = {"conv": jnp.full((3, 3, 2, 2), 10.0)}
    updates, _ = tx.update(grads, tx.init(params), params)
    lr = cfg.learning_rate / cfg.warmup_steps  # first warm-up step
    np.testing.assert_allclose(updates["conv"], -lr * (1.0 + 1e-3), rtol=1e-5)
    assert isinstance(optax.tree.norm(grads), jax.Array)
