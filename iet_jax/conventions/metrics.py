"""PSNR and SSIM in the convention of super-resolution papers.

This is the convention of BasicSR's `calculate_psnr` / `calculate_ssim` with
`crop_border=scale, test_y_channel=True`, which every table of the field uses:

- images are compared as 8-bit values: a float image (values in [0, 1]) is clipped to
  [0, 1], scaled by 255 and rounded first, as SR outputs are before they are saved;
- `crop_border` pixels are dropped on each side (the scale factor, by convention);
- on the Y channel of ITU-R BT.601 YCbCr computed from the 8-bit RGB values,
  Y = 16 + 65.481 R + 128.553 G + 24.966 B with R, G, B in [0, 1], not rounded (by default
  with BasicSR's float32 storage of Y, so results equal BasicSR's to the last bit of PSNR;
  `exact_y=True` computes Y in float64 throughout, see `rgb_to_y`);
- in float64; PSNR with peak 255; SSIM with an 11x11 Gaussian window (sigma 1.5) in valid
  mode, C1 = (0.01 * 255)^2, C2 = (0.03 * 255)^2, averaged over the SSIM map.

With `y_channel=False` the RGB values themselves are compared: PSNR from the MSE over all
channels, SSIM averaged over the per-channel SSIMs. A 2-D (grayscale) image is its own Y.
NumPy only.
"""

from __future__ import annotations

import math

import numpy as np

Y_WEIGHTS = (65.481, 128.553, 24.966)  # BT.601, for R, G, B in [0, 1]
Y_OFFSET = 16.0
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_C1 = (0.01 * 255) ** 2
SSIM_C2 = (0.03 * 255) ** 2


def to_uint8(img) -> np.ndarray:
    """uint8 as is; a float image in [0, 1] clipped, scaled by 255 and rounded (half to even)."""
    img = np.asarray(img)
    if img.dtype == np.uint8:
        return img
    if np.issubdtype(img.dtype, np.floating) or img.dtype.name == "bfloat16":
        return np.round(np.clip(img.astype(np.float64), 0.0, 1.0) * 255.0).astype(np.uint8)
    raise TypeError(f"expected a uint8 image or a float image in [0, 1], got dtype {img.dtype}")


def rgb_to_y(img, exact: bool = False) -> np.ndarray:
    """BT.601 luma of an RGB image (..., 3) in [16, 235] as float64, not rounded.

    By default Y is computed as BasicSR computes it: R, G, B / 255 in float32, the weighted
    sum in float64, and Y / 255 stored in float32 before it is scaled back (so Y carries
    float32 rounding, about 1e-5). `exact=True` keeps everything in float64 (MATLAB's
    `rgb2ycbcr` on doubles). The two differ by about 1e-7 dB at the PSNRs of SR tables and by
    up to 2e-5 dB on nearly identical images; SSIM by under 1e-8.
    """
    img = to_uint8(img)
    if img.shape[-1] != 3:
        raise ValueError(f"expected RGB images (..., 3), got shape {img.shape}")
    wr, wg, wb = Y_WEIGHTS
    if exact:
        rgb = img.astype(np.float64) / 255.0
        return rgb @ np.asarray(Y_WEIGHTS, np.float64) + Y_OFFSET
    rgb = (img.astype(np.float32) / np.float32(255.0)).astype(np.float64)
    y = rgb[..., 2] * wb + rgb[..., 1] * wg + rgb[..., 0] * wr + Y_OFFSET  # BasicSR sums B, G, R
    return ((y / 255.0).astype(np.float32) * np.float32(255.0)).astype(np.float64)


def _prepare(img, ref, crop_border: int, y_channel: bool,
             exact_y: bool) -> tuple[np.ndarray, np.ndarray]:
    """Both images as float64 (H, W, C) after the uint8 rounding, the crop and the Y transform."""
    img, ref = to_uint8(img), to_uint8(ref)
    if img.shape != ref.shape:
        raise ValueError(f"image shapes differ: {img.shape} vs {ref.shape}")
    if img.ndim not in (2, 3):
        raise ValueError(f"expected one image (H, W) or (H, W, C), got shape {img.shape}")
    if crop_border < 0:
        raise ValueError(f"crop_border must be >= 0, got {crop_border}")
    if crop_border:
        img = img[crop_border:-crop_border, crop_border:-crop_border]
        ref = ref[crop_border:-crop_border, crop_border:-crop_border]
    if img.size == 0:
        raise ValueError(f"nothing left to compare after cropping {crop_border} pixels per border")
    out = []
    for a in (img, ref):
        if a.ndim == 2:
            a = a[..., None].astype(np.float64)
        elif y_channel and a.shape[-1] == 3:
            a = rgb_to_y(a, exact_y)[..., None]
        else:
            a = a.astype(np.float64)
        out.append(a)
    return out[0], out[1]


def psnr(img, ref, crop_border: int = 0, y_channel: bool = True, exact_y: bool = False) -> float:
    """PSNR in dB (peak 255) of `img` against `ref`; inf when they are equal."""
    a, b = _prepare(img, ref, crop_border, y_channel, exact_y)
    mse = np.mean((a - b) ** 2)
    if mse == 0:
        return math.inf
    return float(10.0 * np.log10(255.0 * 255.0 / mse))


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """The normalised 1-D Gaussian; the 2-D window is its outer product."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-(x * x) / (2.0 * sigma * sigma))
    return g / g.sum()


def _filter_valid(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Correlate a 2-D array with outer(g, g), keeping only fully covered positions."""
    n = g.size
    x = np.lib.stride_tricks.sliding_window_view(x, n, axis=0) @ g  # (H-n+1, W)
    return np.lib.stride_tricks.sliding_window_view(x, n, axis=1) @ g  # (H-n+1, W-n+1)


def ssim_map(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """SSIM map of two 2-D float64 arrays with values in [0, 255] (valid positions only)."""
    g = gaussian_window()
    if min(a.shape) < g.size:
        raise ValueError(f"SSIM needs at least {g.size}x{g.size} pixels, got {a.shape}")
    mu_a, mu_b = _filter_valid(a, g), _filter_valid(b, g)
    mu_aa, mu_bb, mu_ab = mu_a * mu_a, mu_b * mu_b, mu_a * mu_b
    var_a = _filter_valid(a * a, g) - mu_aa
    var_b = _filter_valid(b * b, g) - mu_bb
    cov = _filter_valid(a * b, g) - mu_ab
    return ((2 * mu_ab + SSIM_C1) * (2 * cov + SSIM_C2)) / (
        (mu_aa + mu_bb + SSIM_C1) * (var_a + var_b + SSIM_C2))


def ssim(img, ref, crop_border: int = 0, y_channel: bool = True, exact_y: bool = False) -> float:
    """Mean SSIM of `img` against `ref` (per channel, then averaged, when not on Y)."""
    a, b = _prepare(img, ref, crop_border, y_channel, exact_y)
    return float(np.mean([ssim_map(a[..., c], b[..., c]).mean() for c in range(a.shape[-1])]))


def psnr_ssim(img, ref, crop_border: int = 0, y_channel: bool = True,
              exact_y: bool = False) -> tuple[float, float]:
    return (psnr(img, ref, crop_border, y_channel, exact_y),
            ssim(img, ref, crop_border, y_channel, exact_y))
