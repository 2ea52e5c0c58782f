"""Whole-image, tiled and self-ensembled inference (iet_jax.evaluation.inference)."""

import jax.numpy as jnp
import numpy as np
import pytest

from iet_jax.conventions import metrics
from iet_jax.evaluation import inference
from iet_jax.model.network import IET, abstract_model
from tiny import nearest, neighbourly, photo, pointwise_x3, random_model, tiny_model_config


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
    model = abstract_model(tiny_model_config())  # shapes only: nothing compiled
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


def test_tiny_iet_tiled_close_to_whole_and_compiles_once(monkeypatch):
    model = random_model(tiny_model_config())
    x = photo(40, 52)
    up = inference.Upscaler(model, tile=12, overlap=6)
    whole = inference.Upscaler(model)(x)
    tiled = up(x)
    assert tiled.shape == whole.shape == (80, 104, 3)
    assert np.isfinite(tiled).all()
    value = metrics.psnr(tiled, whole, crop_border=2)
    assert value > TINY_TILED_PSNR_BOUND, value
    # A new image size reuses the tile compilation (the jitted function sees only tiles):
    # the network's Python code runs only when JAX traces it.
    traced = []
    forward = IET.__call__

    def recorded(self, x, *args, **kwargs):
        traced.append(x.shape)
        return forward(self, x, *args, **kwargs)

    monkeypatch.setattr(IET, "__call__", recorded)
    assert up(photo(23, 31)).shape == (46, 62, 3)
    assert traced == []
    inference.Upscaler(model)(photo(23, 31))  # whole: a new shape, traced (the probe works)
    assert len(traced) == 1


# ---------------------------------------------------------------- the official split test
def split_oracle(forward, img: np.ndarray, split: int, scale: int) -> np.ndarray:
    """The official split test restated from its rule, output pixel by output pixel.

    Below split**2 LR pixels the image goes through whole. Otherwise a side of length L gets
    n = L // split + 1 parts; it is padded at the end by mirroring (edge pixel not repeated)
    to a multiple of n; part k owns the pixels [k p, (k + 1) p) of the padded side, p = padded
    / n, and its patch reaches p // 10 pixels further on the sides where it has a neighbour.
    An output pixel is taken from the patch of the part that owns its LR pixel.
    """
    h, w = img.shape[:2]
    if h * w < split * split:
        return np.asarray(forward(img[None]))[0]

    def side(length):
        n = length // split + 1
        padded = length + (-length) % n
        p = padded // n
        reach = p // 10
        owner = np.arange(padded * scale) // scale // p  # the part of each output pixel
        first = owner * p - np.where(owner > 0, reach, 0)  # where that part's patch starts
        local = np.arange(padded * scale) - first * scale  # the pixel within the patch output
        patches = [(max(k * p - reach, 0), min((k + 1) * p + reach, padded)) for k in range(n)]
        return padded, owner, local, patches

    ph, owner_y, local_y, rows = side(h)
    pw, owner_x, local_x, cols = side(w)
    padded = np.pad(img, ((0, ph - h), (0, pw - w), (0, 0)), mode="reflect")
    out = np.full((ph * scale, pw * scale, 3), np.nan, np.float32)
    for i, (y0, y1) in enumerate(rows):
        for j, (x0, x1) in enumerate(cols):
            y = np.asarray(forward(padded[None, y0:y1, x0:x1]))[0]
            sel_y, sel_x = np.nonzero(owner_y == i)[0], np.nonzero(owner_x == j)[0]
            out[np.ix_(sel_y, sel_x)] = y[np.ix_(local_y[sel_y], local_x[sel_x])]
    assert not np.isnan(out).any()
    return out[:h * scale, :w * scale]


def shapes_seen(forward):
    """`forward` that records the shapes it is called with (in the jit trace: once per shape)."""
    seen = []

    def spy(x):
        seen.append(tuple(x.shape[1:3]))
        return forward(x)

    spy.scale = forward.scale
    return spy, seen


def test_split_layout_by_hand():
    # 384 x 384 (exactly the threshold): two parts of 192 a side, reaching 19 pixels further.
    assert inference.split_spans(384, 384) == (0, [(0, 211, 0, 192), (173, 384, 192, 384)])
    # 1000: three parts; padded by 2 to 1002, parts of 334 reaching 33 further.
    assert inference.split_spans(1000, 384) == (
        2, [(0, 367, 0, 334), (301, 701, 334, 668), (635, 1002, 668, 1002)])
    # A side shorter than the patch size is one part, the whole side.
    assert inference.split_spans(200, 384) == (0, [(0, 200, 0, 200)])
    # The threshold is on the area: 383 x 385 is whole, 200 x 738 is split along the width.
    assert inference.split_grid(383, 385, 384) == (1, 1)
    assert inference.split_grid(384, 384, 384) == (2, 2)
    assert inference.split_grid(200, 738, 384) == (1, 2)
    assert inference.split_grid(585, 827, 384) == (2, 3)


# The oracle calls the stand-in through a whole-image Upscaler: the same compiled function per
# patch shape as the split, so the two agree to the bit when they cut and stitch alike.
@pytest.mark.parametrize("size", [(12, 30), (20, 20), (23, 41), (41, 23), (45, 61), (9, 50)])
def test_split_matches_the_rule_with_a_stand_in(size):
    x = np.random.default_rng(4).random(size + (3,)).astype(np.float32)
    whole = inference.Upscaler(neighbourly)
    got = inference.Upscaler(neighbourly, split=20)(x)
    assert got.shape == (2 * size[0], 2 * size[1], 3)
    np.testing.assert_array_equal(got, split_oracle(whole, x, 20, 2))
    if size[0] * size[1] >= 400:  # split: the seams show with this stand-in
        assert not np.allclose(got, whole(x), atol=1e-3)
    else:
        np.testing.assert_array_equal(got, whole(x))


def test_split_of_a_pointwise_model_is_the_whole_output():
    x = np.random.default_rng(5).random((2, 27, 44, 3)).astype(np.float32)
    got = inference.Upscaler(pointwise_x3, split=16)(x)
    np.testing.assert_allclose(got, np.asarray(pointwise_x3(x)), rtol=0, atol=1e-6)


def test_split_below_threshold_is_whole_image():
    # 19 x 21 = 399 < 20 ** 2: one call on the whole image even though 21 > 20.
    spy, seen = shapes_seen(neighbourly)
    x = np.random.default_rng(6).random((19, 21, 3)).astype(np.float32)
    got = inference.Upscaler(spy, split=20)(x)
    assert seen == [(19, 21)]
    np.testing.assert_array_equal(got, inference.Upscaler(neighbourly)(x))
    # 20 x 20 = 400: split, two parts a side (10 + 1 overlap, then 1 + 10).
    spy, seen = shapes_seen(neighbourly)
    inference.Upscaler(spy, split=20)(np.zeros((20, 20, 3), np.float32))
    assert sorted(seen) == [(11, 11)]  # all four patches share one shape: one trace


def test_split_at_the_official_size_with_a_stand_in():
    assert inference.OFFICIAL_SPLIT == 384
    rng = np.random.default_rng(7)
    whole = inference.Upscaler(neighbourly)
    for size in [(384, 384), (401, 517)]:
        x = rng.random(size + (3,)).astype(np.float32)
        got = inference.Upscaler(neighbourly, split=inference.OFFICIAL_SPLIT)(x)
        np.testing.assert_array_equal(got, split_oracle(whole, x, 384, 2))
    spy, seen = shapes_seen(neighbourly)
    inference.Upscaler(spy, split=inference.OFFICIAL_SPLIT)(np.zeros((383, 385, 3), np.float32))
    assert seen == [(383, 385)]


def test_split_with_self_ensemble_runs_per_patch():
    x = np.random.default_rng(8).random((23, 30, 3)).astype(np.float32)
    got = inference.Upscaler(neighbourly, split=20, self_ensemble=True)(x)
    per_patch = inference.Upscaler(neighbourly, self_ensemble=True)
    np.testing.assert_array_equal(got, split_oracle(per_patch, x, 20, 2))


def test_split_option_errors():
    with pytest.raises(ValueError, match=r"either tile \(--tile\) or split \(--official-split\)"):
        inference.Upscaler(nearest, split=384, tile=64)
    with pytest.raises(ValueError, match=r"positive number of LR pixels .*official value is 384"):
        inference.Upscaler(nearest, split=0)
    assert inference.Upscaler(nearest).protocol == "whole"
    assert inference.Upscaler(nearest, tile=8, overlap=2).protocol == "tiled"
    assert inference.Upscaler(nearest, split=384).protocol == "official-split"


def test_tiny_iet_split_is_the_stitched_patches():
    model = random_model(tiny_model_config())
    x = photo(31, 37)  # split 20: padded to 32 x 38, 2 x 2 parts of 16 x 19 reaching 1 further
    whole = inference.Upscaler(model)
    got = inference.Upscaler(model, split=20)(x)
    np.testing.assert_array_equal(got, split_oracle(whole, x, 20, 2))
    assert not np.allclose(got, whole(x), atol=1e-3)  # the split changes the output


# ---------------------------------------------------------------- tiles clamped to the image
def test_tile_is_clamped_to_the_image():
    """A tile larger than the image is not padded: where it covers the image, the result is
    the whole-image one (the model pads a short side itself, as for the whole image)."""
    model = random_model(tiny_model_config())  # min_size 10
    whole = inference.Upscaler(model)
    for size, tile in [((14, 17), 24), ((14, 17), 17), ((8, 9), 12)]:
        x = photo(*size)
        np.testing.assert_array_equal(inference.Upscaler(model, tile=tile, overlap=4)(x),
                                      whole(x), err_msg=f"{size} tile {tile}")
    # One side shorter than the tile: that side is whole in every tile, nothing padded.
    spy, seen = shapes_seen(neighbourly)
    up = inference.Upscaler(spy, tile=24, overlap=4, tile_batch=2)
    assert up.tile_for(14, 40) == (14, 24) and up.tile_for(40, 5) == (24, 5)
    assert up.tile_for(24, 24) is None and up.tile_for(10, 20) is None
    x = np.random.default_rng(9).random((14, 40, 3)).astype(np.float32)
    assert up(x).shape == (28, 80, 3)
    assert seen == [(14, 24)]
    # ... and each tile of that row is cut from the image as it is: the stand-in's output
    # for the last tile (columns 16..40) is the blended result's last 8 columns.
    last = np.asarray(neighbourly(x[None, :, 16:40]))[0]
    np.testing.assert_allclose(up(x)[:, -8 * 2:], last[:, -8 * 2:], rtol=0, atol=1e-6)


def test_auto_tile_above():
    spy, seen = shapes_seen(pointwise_x3)
    up = inference.Upscaler(spy, auto_tile_above=400, overlap=2, tile_batch=4)
    assert up.auto_tile == 10 and up.protocol == "whole"  # isqrt(400 / 4)
    small, large = (np.random.default_rng(10).random(s + (3,)).astype(np.float32)
                    for s in [(20, 20), (20, 21)])
    up(small)
    assert seen == [(20, 20)]  # 400 pixels: whole
    got = up(large)
    assert seen == [(20, 20), (10, 10)]  # 420 > 400: tiles of 10, a batch of 4 per call
    np.testing.assert_allclose(got, inference.Upscaler(pointwise_x3, tile=10, overlap=2)(large),
                               rtol=0, atol=0)
    # The automatic tile is never below what the model accepts.
    model = abstract_model(tiny_model_config())  # min_size 10
    assert inference.Upscaler(model, auto_tile_above=64).auto_tile == 17  # > overlap 16
    assert inference.Upscaler(model, auto_tile_above=64, overlap=3).auto_tile == 10
    assert inference.Upscaler(model, auto_tile_above=0).auto_tile is None  # 0: never
    assert inference.DEFAULT_AUTO_TILE_ABOVE == 192 * 192
    assert inference.auto_tile_size(model, inference.DEFAULT_AUTO_TILE_ABOVE, 16, 4) == 96


def _advised(message: str) -> list[dict]:
    """The settings an error message advises, each as Upscaler keyword arguments."""
    import re

    out = []
    for option in re.split(r", or ", message.split("; use ", 1)[1]):
        kwargs = {}
        for flag, value in re.findall(r"--(tile-overlap|tile-batch|tile) (\d+)", option):
            kwargs[{"tile": "tile", "tile-overlap": "overlap", "tile-batch": "tile_batch"}[flag]] = \
                int(value)
        assert kwargs, message
        out.append(kwargs)
    return out


def test_every_tile_advice_is_accepted():
    model = abstract_model(tiny_model_config())  # min_size 10; nothing compiled
    for tile, overlap, batch in [(8, 16, 4), (7, 4, 1), (12, 12, 4), (12, 30, 4), (12, -1, 4),
                                 (5, -3, 4), (0, 16, 4), (20, 4, 0), (10, 10, 2)]:
        settings = dict(tile=tile, overlap=overlap, tile_batch=batch)
        with pytest.raises(ValueError) as refused:
            inference.Upscaler(model, **settings)
        for advice in _advised(str(refused.value)):
            inference.Upscaler(model, **{**settings, **advice})  # accepted
    # The demo model's case (min 7, default overlap 16): the advice is a tile above 16.
    with pytest.raises(ValueError, match="use --tile 17 or more"):
        inference.Upscaler(model, tile=7)
    # What to change when a model call runs out of memory is accepted too, and changes how
    # that image is cut.
    for settings, size in [({}, None), ({}, (50, 60)), ({}, (500, 600)),
                           (dict(auto_tile_above=400), (500, 600)),
                           (dict(auto_tile_above=400, tile_batch=1), (500, 600)),
                           (dict(tile=40, tile_batch=4), None), (dict(tile=40, tile_batch=1), None),
                           (dict(tile=40, tile_batch=1), (30, 200)),
                           (dict(tile=17, tile_batch=1), None), (dict(split=384), None),
                           (dict(tile=11, overlap=10, tile_batch=1), (50, 60))]:
        up = inference.Upscaler(model, **settings)
        advice = inference.memory_advice(up, *(size or (None, None)))
        assert "--tile" in advice, (settings, size, advice)
        new = {**settings, **_advised("; use " + advice.split("use ", 1)[1])[0]}
        new.pop("split", None)
        again = inference.Upscaler(model, **new)
        if size is not None:
            before = (up.tile_for(*size), up.tile_batch)
            assert (again.tile_for(*size), again.tile_batch) != before, (settings, size, advice)
    assert "does not fit" in inference.memory_advice(
        inference.Upscaler(model, tile=10, overlap=0, tile_batch=1), 50, 60)
    assert "does not fit" in inference.memory_advice(inference.Upscaler(model), 12, 12)
    assert inference.is_out_of_memory(MemoryError())
    assert inference.is_out_of_memory(RuntimeError("RESOURCE_EXHAUSTED: Out of memory"))
    assert not inference.is_out_of_memory(ValueError("no"))
