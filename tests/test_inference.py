"""Whole-image, tiled and self-ensembled inference (iet_jax.inference)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
from flax import nnx

from iet_jax import checkpoint, config, inference, metrics
from iet_jax.model import pixel_shuffle


# ---------------------------------------------------------------- tiny models shared by tests
def tiny_config(scale: int = 2):
    """A 2-block IET with 3x3 / 5x5 windows: min_size() = 5 * 2 = 10 LR pixels."""
    return config.model_config(
        embed_dim=8, nattn_dim=8, depths=(1, 1), num_heads=2, scale=scale,
        upsampler="pixelshuffledirect", mlp_ratio=1.0, local_range=3, sparse_range=5,
        dilation=2, img_size=10, convffn_kernel_size=3, topk_focus=((34,), (16,)),
        topk_prop_1=(4, 0), topk_prop_2=(2, 0), topk_prop_3=(8, 0))


def random_model(cfg, seed: int = 0):
    """An IET with random weights, filled in from NumPy (no per-shape init compilations)."""
    graphdef, state = nnx.split(checkpoint.abstract_model(cfg))
    rng = np.random.default_rng(seed)
    state = jax.tree_util.tree_map(
        lambda a: jnp.asarray(rng.normal(0.0, 0.2, a.shape), a.dtype), state)
    return nnx.merge(graphdef, state)


def photo(h: int, w: int, y0: int = 150, x0: int = 180) -> np.ndarray:
    return skimage.data.astronaut()[y0:y0 + h, x0:x0 + w].astype(np.float32) / 255.0


def nearest(x):
    """Nearest-neighbour x2: commutes with flips and transposes."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


nearest.scale = 2

_W = np.random.default_rng(3).normal(0, 0.5, (3, 3 * 9)).astype(np.float32)


def pointwise_x3(x):
    """A 1x1 conv + PixelShuffle(3) + sigmoid: every output pixel sees one input pixel."""
    return jax.nn.sigmoid(pixel_shuffle(x @ jnp.asarray(_W), 3))


pointwise_x3.scale = 3


# ---------------------------------------------------------------- self-ensemble
def asymmetric(h=5, w=7, n=1):
    return np.random.default_rng(0).random((n, h, w, 3)).astype(np.float32)


def test_eight_distinct_transforms_each_inverted():
    x = asymmetric()
    seen = set()
    for k in range(8):
        t = inference.transform(x, k)
        seen.add(t.tobytes() + bytes(t.shape))
        np.testing.assert_array_equal(inference.inverse_transform(t, k), x)
        # The model output of a transformed input, transformed back, is the plain output.
        y = np.asarray(nearest(jnp.asarray(t)))
        np.testing.assert_array_equal(inference.inverse_transform(y, k), np.asarray(nearest(x)))
        # JAX arrays take the same path as NumPy ones.
        np.testing.assert_array_equal(np.asarray(inference.transform(jnp.asarray(x), k)), t)
    assert len(seen) == 8


@pytest.mark.parametrize("shape", [(6, 6), (5, 7)], ids=["square", "non-square"])
def test_self_ensemble_of_equivariant_model_is_plain_output(shape):
    x = asymmetric(*shape, n=2)
    up = inference.Upscaler(nearest, self_ensemble=True)
    np.testing.assert_allclose(up(x), np.asarray(nearest(x)), rtol=0, atol=1e-6)


def test_self_ensemble_averages_the_dihedral_group():
    # A model that is not equivariant: its output depends on the position.
    def biased(x):
        h, w = x.shape[1:3]
        ramp = jnp.linspace(0, 1, 2 * h)[:, None] * jnp.linspace(1, 2, 2 * w)[None, :]
        return nearest(x) * 0.5 + ramp[None, :, :, None]

    biased.scale = 2
    x = asymmetric(6, 6)[0]
    # Reference: the 8 elements as rotations r in 0..3, with or without a left-right flip.
    outs = []
    for r in range(4):
        for flip in (False, True):
            t = np.rot90(x, r)
            t = t[:, ::-1] if flip else t
            y = np.asarray(biased(jnp.asarray(t[None].copy())))[0]
            y = y[:, ::-1] if flip else y
            outs.append(np.rot90(y, -r))
    ref = np.mean(outs, axis=0)
    got = inference.Upscaler(biased, self_ensemble=True)(x)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)
    assert not np.allclose(got, np.asarray(biased(x[None]))[0], atol=1e-3)


def test_ensemble_batches_all_eight_in_one_call_for_square_inputs():
    shapes = []

    def spy(x):
        shapes.append(x.shape)
        return nearest(x)

    inference.x8_ensemble(spy, jnp.zeros((2, 6, 6, 3)))
    assert shapes == [(16, 6, 6, 3)]
    shapes.clear()
    inference.x8_ensemble(spy, jnp.zeros((1, 5, 7, 3)))
    assert shapes == [(4, 5, 7, 3), (4, 7, 5, 3)]


# ---------------------------------------------------------------- tiling
@pytest.mark.parametrize("size", [(5, 7), (16, 16), (23, 41), (37, 17)])
@pytest.mark.parametrize("tile,overlap,batch", [(8, 0, 1), (8, 3, 3), (12, 5, 4)])
def test_tiled_equals_whole_for_pointwise_model(size, tile, overlap, batch):
    x = np.random.default_rng(1).random(size + (3,)).astype(np.float32)
    whole = inference.Upscaler(pointwise_x3)(x)
    tiled = inference.Upscaler(pointwise_x3, tile=tile, overlap=overlap, tile_batch=batch)(x)
    assert tiled.shape == whole.shape == (size[0] * 3, size[1] * 3, 3)
    np.testing.assert_allclose(tiled, whole, rtol=0, atol=1e-6)


def test_tiled_with_ensemble_and_batch_of_images():
    x = np.random.default_rng(2).random((2, 19, 26, 3)).astype(np.float32)
    whole = inference.Upscaler(pointwise_x3, self_ensemble=True)(x)
    tiled = inference.Upscaler(pointwise_x3, tile=9, overlap=4, self_ensemble=True)(x)
    assert tiled.shape == (2, 57, 78, 3)
    np.testing.assert_allclose(tiled, whole, rtol=0, atol=1e-6)


def test_tile_layout_and_blend_weights_partition_unity():
    for length, tile, overlap in [(50, 16, 4), (17, 16, 4), (100, 30, 10), (16, 16, 2)]:
        starts = inference.tile_starts(length, tile, overlap)
        assert starts[0] == 0 and starts[-1] + tile == length
        assert all(a + tile - b >= overlap for a, b in zip(starts, starts[1:]))
        weights = inference.blend_weights(starts, tile, 2)
        total = np.zeros(length * 2)
        for s, w in zip(starts, weights):
            assert w.min() > 0 and w.max() == 1
            total[s * 2:(s + tile) * 2] += w
        if all(a + tile - b <= tile // 2 for a, b in zip(starts, starts[1:])):
            np.testing.assert_allclose(total, 1.0, atol=1e-12)
    assert inference.tile_starts(10, 16, 4) == [0]


def test_tile_too_small_is_refused_with_the_minimum():
    model = checkpoint.abstract_model(tiny_config())  # shapes only: nothing compiled
    assert model.min_size() == 10
    with pytest.raises(ValueError, match=r"minimum tile is 10 LR pixels.*sparse_range 5 x dilation 2"):
        inference.Upscaler(model, tile=8)
    with pytest.raises(ValueError, match="overlap"):
        inference.Upscaler(model, tile=12, overlap=12)


def test_input_checks():
    with pytest.raises(ValueError, match="RGB"):
        inference.Upscaler(nearest)(np.zeros((4, 4, 4)))
    with pytest.raises(ValueError, match="scale"):
        inference.Upscaler(lambda x: x)


# ---------------------------------------------------------------- the real network, tiny
# Bound for the tiny random-weight IET below (tile 12, overlap 6, on a 40x52 photo crop; 34.2
# measured): tiled and whole-image outputs agree to at least this PSNR (dB, Y, uint8-rounded).
# Tile 12 is the tiles' compiled shape in the CLI tests too, so a worker compiles it once.
TINY_TILED_PSNR_BOUND = 32.0


def test_tiny_iet_tiled_close_to_whole_and_compiles_once():
    model = random_model(tiny_config())
    x = photo(40, 52)
    up = inference.Upscaler(model, tile=12, overlap=6)
    whole = inference.Upscaler(model)(x)
    tiled = up(x)
    assert tiled.shape == whole.shape == (80, 104, 3)
    assert np.isfinite(tiled).all()
    value = metrics.psnr(tiled, whole, crop_border=2)
    assert value > TINY_TILED_PSNR_BOUND, value
    # A new image size reuses the tile compilation (the jitted function sees only tiles).
    before = inference._run._cache_size()
    assert up(photo(23, 31)).shape == (46, 62, 3)
    assert inference._run._cache_size() == before
