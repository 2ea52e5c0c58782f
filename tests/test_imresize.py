"""MATLAB bicubic resize against arrays computed with BasicSR's matlab_functions.imresize.

The fixture (tests/fixtures/imresize/basicsr_imresize.npz) holds inputs and BasicSR's
outputs (PyTorch float32) for odd sizes, x2/x3/x4 downscales, x2/x3 upscales, float and
uint8 inputs, grayscale and colour, random arrays and crops of scikit-image photographs.
For uint8 inputs the expected output is BasicSR's float result clipped and rounded half
away from zero, as MATLAB converts to uint8.
"""

from pathlib import Path

import numpy as np
import pytest

from iet_jax.conventions import imresize as module
from iet_jax.conventions.imresize import downscale, imresize, mod_crop, resize_weights

FIXTURE = Path(__file__).parent / "fixtures" / "imresize" / "basicsr_imresize.npz"
_Z = np.load(FIXTURE)
CASES = sorted({k.split("/")[0] for k in _Z.files})


def test_fixture_covers_the_usual_cases():
    assert any("up" in c for c in CASES)
    for s in (2, 3, 4):
        assert any(c.startswith("float") and c.endswith(f"down{s}") for c in CASES)
        assert any(c.startswith("uint8") and c.endswith(f"down{s}") for c in CASES)


@pytest.mark.parametrize("case", CASES)
def test_matches_basicsr(case):
    img = _Z[case + "/input"]
    scale = float(_Z[case + "/scale"])
    out = imresize(img, scale)
    if img.dtype == np.uint8:
        expected = _Z[case + "/expected_uint8"]
        assert out.dtype == np.uint8
        assert out.shape == expected.shape
        np.testing.assert_array_equal(out, expected)
    else:
        expected = _Z[case + "/expected_float"]
        assert out.dtype == img.dtype
        assert out.shape == expected.shape
        np.testing.assert_allclose(out, expected, atol=1e-5, rtol=0)


def test_output_shape_equals_scale_for_multiples():
    img = _Z["uint8_chelsea96_down3/input"]
    np.testing.assert_array_equal(imresize(img, 1 / 3), imresize(img, output_shape=(32, 32)))
    np.testing.assert_array_equal(downscale(img, 3), _Z["uint8_chelsea96_down3/expected_uint8"])


def test_constant_image_stays_constant():
    img = np.full((23, 17, 3), 0.37, np.float64)
    for s in (0.5, 1 / 3, 0.25, 2.0, 3.0):
        np.testing.assert_allclose(imresize(img, s), 0.37, atol=1e-12)


def test_weights_sum_to_one_and_indices_in_range():
    for n, m, s in [(10, 3, 0.25), (5, 20, 4.0), (7, 7, 1.0), (3, 1, 1 / 3)]:
        w, idx = resize_weights(n, m, s)
        np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-12)
        assert idx.min() >= 0 and idx.max() < n


def test_tiny_inputs_reflect_repeatedly():
    # Kernel wider than the image: MATLAB's symmetric index folding, no crash.
    img = np.arange(12, dtype=np.float64).reshape(2, 2, 3)
    out = imresize(img, 0.25)
    assert out.shape == (1, 1, 3)
    np.testing.assert_allclose(out[0, 0], img.reshape(-1, 3).mean(0), atol=1e-12)


def test_uint8_rounds_half_away_from_zero_and_clips():
    # 2x2 -> 1x1 at x0.5 averages the four pixels (symmetric cubic weights).
    img = np.array([[[0], [1]], [[1], [1]]], np.uint8)  # mean 0.75 -> 1
    assert imresize(img, 0.5)[0, 0, 0] == 1
    img = np.array([[[0], [1]], [[0], [1]]], np.uint8)  # mean 0.5 -> 1 (not 0, half-even)
    assert imresize(img, 0.5)[0, 0, 0] == 1
    # overshoot at an edge is clipped, not wrapped
    edge = np.zeros((8, 8), np.uint8)
    edge[:, 4:] = 255
    up = imresize(edge, 2.0)
    assert up.dtype == np.uint8 and up.min() == 0 and up.max() == 255
    assert (imresize(edge.astype(np.float32) / 255, 2.0).max()) > 1.0


def test_errors():
    with pytest.raises(TypeError):
        imresize(np.zeros((4, 4), np.int32), 0.5)
    with pytest.raises(ValueError):
        imresize(np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="multiple"):
        downscale(np.zeros((10, 9, 3), np.uint8), 2)
    assert mod_crop(np.zeros((10, 9, 3)), 4).shape == (8, 8, 3)


def test_big_uint8_image_needs_no_float64_copy():
    """A 12000x12000 photo once took 6.4 GB to build (3.5 GB of it a float64 copy)."""
    import tracemalloc

    img = np.random.default_rng(5).integers(0, 256, (2000, 2000, 3), dtype=np.uint8)
    tracemalloc.start()
    try:
        lr = downscale(img, 4)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert lr.shape == (500, 500, 3)
    assert peak < img.size * 8 / 2  # under half of one float64 copy of the image (96 MB)


@pytest.mark.parametrize("shape, out", [((23, 17, 3), (6, 5)),    # height first
                                        ((23, 17), (9, 4)),       # width first (smaller factor)
                                        ((9, 11, 2), (20, 31))])  # enlarging
def test_row_blocks_give_the_same_bits(monkeypatch, shape, out):
    rng = np.random.default_rng(6)
    for img in (rng.integers(0, 256, shape).astype(np.uint8),
                rng.standard_normal(shape).astype(np.float32)):
        whole = imresize(img, output_shape=out)
        monkeypatch.setattr(module, "_BLOCK_VALUES", 5)  # a few rows at a time
        blocks = imresize(img, output_shape=out)
        monkeypatch.undo()
        assert whole.dtype == blocks.dtype and whole.tobytes() == blocks.tobytes()
