"""Model structure: parameter counts, PixelShuffle order, padding, dtypes, input checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from iet_jax.io import official
from iet_jax.model import IET, config
from iet_jax.model.network import abstract_model, count_parameters, mirror_pad, pixel_shuffle


@pytest.mark.parametrize("variant,scale", sorted(config.OFFICIAL_PARAMETER_COUNTS))
@pytest.mark.parametrize("settings", ["train", "eval"])
def test_parameter_counts_equal_official(variant, scale, settings):
    model = abstract_model(config.official(variant, scale, settings))
    assert count_parameters(model) == config.OFFICIAL_PARAMETER_COUNTS[variant, scale]


def test_pixel_shuffle_uses_pytorch_channel_order():
    # PyTorch: out[c, h*r + i, w*r + j] = in[c*r*r + i*r + j, h, w]
    b, h, w, c, r = 2, 3, 4, 5, 3
    x = np.random.default_rng(0).standard_normal((b, h, w, c * r * r)).astype(np.float32)
    out = np.asarray(pixel_shuffle(jnp.asarray(x), r))
    for ci, hi, wi, i, j in np.ndindex(c, h, w, r, r):
        np.testing.assert_array_equal(out[:, hi * r + i, wi * r + j, ci],
                                      x[:, hi, wi, ci * r * r + i * r + j])


def test_mirror_pad_matches_official_single_flip_and_repeats_when_short():
    x = jnp.arange(2 * 30 * 7 * 3, dtype=jnp.float32).reshape(2, 30, 7, 3)
    padded = np.asarray(mirror_pad(x, 50))
    # Official: cat([x, flip(x)])[:50] along each short axis (H first, then W).
    xn = np.asarray(x)
    ref = np.concatenate([xn, xn[:, ::-1]], 1)[:, :50]  # H: one flip, as official
    # W = 7 < 50/2: the official code breaks; we keep alternating copies until long enough.
    ref = np.concatenate([ref, ref[:, :, ::-1]] * 4, 2)[:, :, :50]
    np.testing.assert_array_equal(padded, ref)
    assert mirror_pad(x, 20).shape == (2, 30, 20, 3)  # long axes are left alone


@pytest.fixture(scope="module")
def tiny_model():
    cfg = config.model_config(
        embed_dim=12, nattn_dim=12, depths=(2,) + (1,) * 7, num_heads=2, scale=2,
        upsampler="pixelshuffledirect", mlp_ratio=1.0, dilation=2, img_size=50,
        topk_focus=((914, 225), (225,), (125,), (81,), (81,), (64,), (36,), (24,)),
    )
    return IET(cfg, rngs=nnx.Rngs(0))


def test_forward_shapes_and_crop(tiny_model):
    x = jax.random.uniform(jax.random.key(0), (2, 30, 41, 3))
    y = nnx.jit(lambda m, x: m(x))(tiny_model, x)
    assert y.shape == (2, 60, 82, 3) and bool(jnp.isfinite(y).all())


def test_bfloat16_compute_keeps_float32_params(tiny_model):
    cfg = config.model_config(**{**tiny_model.config.to_dict(),
                                 **config.dtype_fields("bfloat16")})
    model = IET(cfg, rngs=nnx.Rngs(0))
    params = jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))
    assert {p.dtype for p in params} == {jnp.dtype("float32")}
    y = nnx.jit(lambda m, x: m(x))(model, jnp.full((1, 50, 50, 3), 0.5))
    assert y.dtype == jnp.bfloat16 and bool(jnp.isfinite(y.astype(jnp.float32)).all())


def test_bad_input_shape(tiny_model):
    with pytest.raises(ValueError, match="NHWC"):
        tiny_model(jnp.zeros((1, 3, 50, 50)))


def test_float64_needs_x64():
    cfg = config.model_config(dtype="float64", param_dtype="float64")
    with pytest.raises(ValueError, match="jax_enable_x64"):
        IET(cfg, rngs=nnx.Rngs(0))


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="unknown model config fields"):
        config.model_config(embed=3)
    with pytest.raises(ValueError, match="upsampler"):
        config.model_config(upsampler="nearest+conv")
    with pytest.raises(ValueError, match="topk_focus"):
        config.model_config(depths=(4,) * 7)
    with pytest.raises(ValueError, match="no official network"):
        config.official("iet", 8)
    with pytest.raises(ValueError, match="gather_impl must be one of .*'native'.*got 'fast'"):
        config.model_config(gather_impl="fast")
    with pytest.raises(ValueError, match="network_g.ape"):
        official.from_network_g({"type": "IET", "ape": True})


def test_official_settings_differ_where_the_option_files_do():
    train, evaluation = config.official("iet", 4, "train"), config.official("iet", 4, "eval")
    assert (train.dilation, evaluation.dilation) == (2, 3)
    assert (train.topk_prop_3[0], evaluation.topk_prop_3[0]) == (120, 100)
    assert (train.topk_focus[1][0], evaluation.topk_focus[1][0]) == (345, 325)


@pytest.mark.parametrize("kernel,shape", [(3, (2, 7, 5, 6)), (5, (1, 4, 9, 3)), (4, (1, 6, 6, 2))])
def test_depthwise_conv_shifted_equals_grouped_conv(kernel, shape):
    """The two formulations of the depthwise conv: the same values and gradients (float64),
    'SAME' padding included (an even kernel pads one more pixel after than before)."""
    from iet_jax.model.network import depthwise_conv

    rng = np.random.default_rng(kernel)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.standard_normal(shape))
        k = jnp.asarray(rng.standard_normal((kernel, kernel, 1, shape[-1])))
        b = jnp.asarray(rng.standard_normal(shape[-1]))

        def loss(impl):
            return lambda x, k, b: jnp.sum(jnp.sin(depthwise_conv(x, k, b, impl)))

        want = depthwise_conv(x, k, b, "conv")
        got = depthwise_conv(x, k, b, "shifted")
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
        grads_want = jax.grad(loss("conv"), argnums=(0, 1, 2))(x, k, b)
        grads_got = jax.grad(loss("shifted"), argnums=(0, 1, 2))(x, k, b)
        for g, w in zip(grads_got, grads_want):
            np.testing.assert_allclose(g, w, rtol=1e-11, atol=1e-11)
    xb = jnp.asarray(np.asarray(x), jnp.bfloat16)
    kb, bb = jnp.asarray(np.asarray(k), jnp.bfloat16), jnp.asarray(np.asarray(b), jnp.bfloat16)
    low = [np.asarray(depthwise_conv(xb, kb, bb, impl), np.float32) for impl in ("conv", "shifted")]
    assert all(a.dtype == np.float32 for a in low)
    np.testing.assert_allclose(low[1], low[0], rtol=2e-2, atol=5e-2)  # bfloat16 output rounding
    with pytest.raises(ValueError, match="depthwise_impl"):
        depthwise_conv(x, k, b, "fft")
    grads_low = [jax.grad(lambda x, k, impl=impl: jnp.sum(depthwise_conv(x, k, bb, impl)
                                                          .astype(jnp.float32) ** 2),
                          argnums=(0, 1))(xb, kb) for impl in ("conv", "shifted")]
    for g, w in zip(grads_low[1], grads_low[0]):
        assert g.dtype == w.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                                   rtol=5e-2, atol=0.5)


def test_depthwise_conv_shifted_backward_keeps_no_shifted_copies():
    """Differentiated by JAX, the k*k shifted products would each keep a shifted copy of the
    input for the kernel's gradient: 49 activations at k = 7, the largest cost of a CPU
    training step. The hand-written backward keeps the input only."""
    from iet_jax.model.network import depthwise_conv

    x, k, b = jnp.zeros((1, 32, 32, 16)), jnp.zeros((7, 7, 1, 16)), jnp.zeros(16)
    grad = jax.jit(jax.grad(lambda x, k: jnp.sum(jnp.sin(depthwise_conv(x, k, b, "shifted"))),
                            argnums=(0, 1)))
    temporaries = grad.lower(x, k).compile().memory_analysis().temp_size_in_bytes
    assert temporaries < 16 * x.nbytes, temporaries / x.nbytes


def test_tiled_initial_attention_equals_gather():
    """The whole network with initial_attention 'tiled' against 'gather' (the oracle): float64
    to 1e-12, float32 to rounding, on a non-square input whose block-0 layer
    keeps every initial candidate (scores and aggregation tiled). Eval mode: the modes differ
    only after the tiled part (tests/test_attention.py checks both)."""
    from tiny import random_model, tiny_model_config

    image = np.random.default_rng(7).random((1, 13, 11, 3))
    for dtype, atol in (("float64", 1e-12), ("float32", 1e-5)):
        with jax.enable_x64(dtype == "float64"):
            x = jnp.asarray(image, dtype)
            outs = {}
            for mode in ("gather", "tiled"):
                model = random_model(tiny_model_config(initial_attention=mode,
                                                       **config.dtype_fields(dtype)))
                outs[mode] = np.asarray(nnx.jit(lambda m, x: m(x))(model, x))
        np.testing.assert_allclose(outs["tiled"], outs["gather"], rtol=0, atol=atol)
