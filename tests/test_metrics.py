"""PSNR / SSIM against numbers computed by BasicSR's own metric code.

tests/fixtures/metrics/ holds crops of scikit-image's photographs with synthetic degradations
(PIL bicubic down/up, Gaussian noise, JPEG q30, blur, a few values off by one, a grayscale and
a non-square crop) and what BasicSR's numpy `calculate_psnr` / `calculate_ssim` returned for
them (commit 8d56e3a, with crop_border=scale and crop_border=0, test_y_channel True and
False). The images were handed to BasicSR in BGR order, as cv2 reads files, so its Y is the
Y of our RGB arrays. Only the arrays and numbers are committed.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from iet_jax.conventions import metrics

FIXTURES = Path(__file__).parent / "fixtures" / "metrics"
CASES = json.loads((FIXTURES / "basicsr_metrics.json").read_text())["cases"]


@pytest.fixture(scope="module")
def images():
    with np.load(FIXTURES / "images.npz") as f:
        return {k: f[k] for k in f.files}


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
@pytest.mark.parametrize("y_channel", [True, False], ids=["y", "rgb"])
@pytest.mark.parametrize("crop", ["scale", "none"])
def test_equals_basicsr(images, case, y_channel, crop):
    hr, sr = images[case["name"] + "_hr"], images[case["name"] + "_sr"]
    border = case["scale"] if crop == "scale" else 0
    key = ("y" if y_channel else "rgb") + ("" if crop == "scale" else "_crop0")
    assert abs(metrics.psnr(sr, hr, border, y_channel) - case["psnr_" + key]) < 1e-6
    assert abs(metrics.ssim(sr, hr, border, y_channel) - case["ssim_" + key]) < 1e-8


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_float64_y_is_within_rounding_of_basicsr(images, case):
    hr, sr = images[case["name"] + "_hr"], images[case["name"] + "_sr"]
    s = case["scale"]
    assert abs(metrics.psnr(sr, hr, s, exact_y=True) - case["psnr_y"]) < 1e-4
    assert abs(metrics.ssim(sr, hr, s, exact_y=True) - case["ssim_y"]) < 1e-8


def test_float_input_is_rounded_to_uint8_first(images):
    hr, sr = images["astronaut_hr"], images["astronaut_sr"]
    # Float outputs a little off the 8-bit grid, and out of range, score as their rounding.
    noise = np.random.default_rng(0).uniform(-0.49, 0.49, sr.shape)
    sr_float = (sr + noise) / 255.0
    sr_float[0, 0] = [1.7, -0.3, 0.5]
    sr_ref = sr.copy()
    sr_ref[0, 0] = [255, 0, 128]
    assert metrics.psnr(sr_float, hr, 4) == metrics.psnr(sr_ref, hr, 4)
    assert metrics.ssim(sr_float, hr, 4) == metrics.ssim(sr_ref, hr, 4)
    assert metrics.psnr(sr_float.astype(np.float32), hr, 4) == metrics.psnr(sr_ref, hr, 4)


def test_y_formula_and_identity():
    px = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255], [0, 0, 0]]],
                  np.uint8)
    y = metrics.rgb_to_y(px, exact=True)[0]
    np.testing.assert_allclose(y, [16 + 65.481, 16 + 128.553, 16 + 24.966, 235.0, 16.0],
                               rtol=0, atol=1e-12)
    np.testing.assert_allclose(metrics.rgb_to_y(px)[0], y, atol=2e-5)
    img = np.random.default_rng(1).integers(0, 256, (20, 20, 3), dtype=np.uint8)
    assert metrics.psnr(img, img, 2) == math.inf
    assert metrics.ssim(img, img, 2) == pytest.approx(1.0, abs=1e-12)


def test_errors():
    a = np.zeros((20, 20, 3), np.uint8)
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.psnr(a, a[:10])
    with pytest.raises(ValueError, match="after cropping"):
        metrics.psnr(a, a, crop_border=10)
    with pytest.raises(ValueError, match="11x11"):
        metrics.ssim(a, a, crop_border=5)
    with pytest.raises(TypeError, match="uint8"):
        metrics.psnr(a.astype(np.int32), a)
