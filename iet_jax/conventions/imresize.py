"""MATLAB-compatible bicubic resizing in NumPy.

Super-resolution datasets make their low-resolution inputs with MATLAB's
``imresize(img, 1/s, 'bicubic')``: a cubic kernel (a = -0.5) that is widened by the
scale factor when downscaling (antialiasing), evaluated at MATLAB's pixel-centre
mapping, with symmetric (edge-repeating) boundary handling. BasicSR's
``matlab_functions.imresize`` is the field's Python reference of the same computation;
``imresize`` here agrees with it to float32 precision on float input and exactly on
uint8 output.

Conventions:

* ``scale`` is the factor applied to the size (0.25 shrinks by 4); the output size is
  ``ceil(scale * size)`` as in MATLAB. ``output_shape=(h, w)`` gives the size instead,
  with a separate factor per axis.
* uint8 input gives uint8 output: the resize runs in float64 on the 0..255 values and
  the result is clipped and rounded half away from zero (MATLAB's uint8 conversion).
  MATLAB's own mex function additionally rounds to uint8 between the vertical and the
  horizontal pass; BasicSR (and this module) does not, which can move a pixel by one
  level in rare cases.
* float input gives output of the same float dtype, not clipped (bicubic overshoots).
* The work goes by blocks of output rows, so memory beyond the input and the output stays
  small (a 12000x12000 uint8 photo no longer needs a 3.5 GB float64 copy); the result is the
  same, bit for bit, as computing each pass on the whole image.

``bicubic_upscale`` is the reference row of every SR table: a uint8 LR image upscaled with
this bicubic (training validation and evaluation both report it).
"""

from __future__ import annotations

import functools
import math

import numpy as np

__all__ = ["imresize", "resize_weights", "downscale", "mod_crop"]


def _cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with a = -0.5 (MATLAB's 'bicubic')."""
    ax = np.abs(x)
    ax2 = ax * ax
    ax3 = ax2 * ax
    inner = 1.5 * ax3 - 2.5 * ax2 + 1.0
    outer = -0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0
    return np.where(ax <= 1.0, inner, np.where(ax <= 2.0, outer, 0.0))


@functools.lru_cache(maxsize=256)
def resize_weights(in_length: int, out_length: int, scale: float,
                   antialiasing: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Taps of a 1-D MATLAB bicubic resize.

    Returns ``(weights, indices)``, both of shape (out_length, taps): output pixel ``i``
    is ``sum_t weights[i, t] * input[indices[i, t]]``. Indices are already folded back
    into ``[0, in_length)`` by symmetric reflection.
    """
    if in_length < 1 or out_length < 1:
        raise ValueError(f"lengths must be positive, got {in_length} -> {out_length}")
    kernel_width = 4.0
    shrink = scale < 1 and antialiasing
    if shrink:
        kernel_width = kernel_width / scale
    # Output pixel centres (1-based, MATLAB) mapped into input coordinates.
    x = np.arange(1, out_length + 1, dtype=np.float64)
    u = x / scale + 0.5 * (1.0 - 1.0 / scale)
    left = np.floor(u - kernel_width / 2.0)
    taps = int(math.ceil(kernel_width)) + 2
    idx = left[:, None] + np.arange(taps, dtype=np.float64)[None, :]
    dist = u[:, None] - idx
    if shrink:
        w = scale * _cubic(dist * scale)
    else:
        w = _cubic(dist)
    w = w / w.sum(axis=1, keepdims=True)
    # Drop tap columns that are zero for every output pixel (MATLAB does the same).
    keep = np.any(w != 0, axis=0)
    w = w[:, keep]
    idx = idx[:, keep].astype(np.int64) - 1  # to 0-based
    # Symmetric boundary: ..., 1, 0 | 0, 1, ..., n-1 | n-1, n-2, ...
    period = 2 * in_length
    idx = np.mod(idx, period)
    idx = np.where(idx >= in_length, period - 1 - idx, idx)
    return w, idx


# Rows of the output computed together: about this many float64 values in flight at once.
_BLOCK_VALUES = 1 << 20


def _apply(x: np.ndarray, w: np.ndarray, idx: np.ndarray, axis: int) -> np.ndarray:
    """The taps along ``axis`` (0 or 1) in float64: ``sum_t w[:, t] * x[idx[:, t]]``.

    ``x`` keeps its own dtype (uint8 is not copied to float64 first): each product promotes
    its values exactly, so the sums are the same, bit for bit, as on a float64 copy.
    """
    if axis == 0:
        out = np.zeros((w.shape[0],) + x.shape[1:], dtype=np.float64)
        extra = (slice(None),) + (None,) * (x.ndim - 1)
        for t in range(w.shape[1]):
            out += w[:, t][extra] * x[idx[:, t]]
    else:
        out = np.zeros((x.shape[0], w.shape[0]) + x.shape[2:], dtype=np.float64)
        extra = (None, slice(None)) + (None,) * (x.ndim - 2)
        for t in range(w.shape[1]):
            out += w[:, t][extra] * x[:, idx[:, t]]
    return out


def _to(x: np.ndarray, dtype) -> np.ndarray:
    if dtype == np.uint8:
        return np.floor(np.clip(x, 0.0, 255.0) + 0.5).astype(np.uint8)
    return x.astype(dtype)


def _rows(shape: tuple) -> int:
    """How many rows of an array of ``shape`` make a block of about _BLOCK_VALUES values."""
    per_row = int(np.prod(shape[1:], dtype=np.int64)) or 1
    return max(1, _BLOCK_VALUES // per_row)


def imresize(img: np.ndarray, scale: float | None = None, *,
             output_shape: tuple[int, int] | None = None,
             antialiasing: bool = True) -> np.ndarray:
    """Resize an (H, W) or (H, W, C) image like MATLAB's ``imresize(..., 'bicubic')``.

    Args:
      img: uint8 (values 0..255) or float (any range) image.
      scale: size factor, the same for both axes (e.g. 1/4 to shrink by 4, 2 to enlarge).
      output_shape: ``(out_h, out_w)`` instead of ``scale``.
      antialiasing: widen the kernel when shrinking (MATLAB's default, True).

    Returns:
      The resized image: uint8 for uint8 input (clipped, rounded half away from zero),
      otherwise the input's float dtype (float64 compute, no clipping).
    """
    img = np.asarray(img)
    if img.ndim not in (2, 3):
        raise ValueError(f"expected an (H, W) or (H, W, C) image, got shape {img.shape}")
    if (scale is None) == (output_shape is None):
        raise ValueError("give exactly one of scale and output_shape")
    in_h, in_w = img.shape[:2]
    if output_shape is not None:
        out_h, out_w = (int(v) for v in output_shape)
        scale_h, scale_w = out_h / in_h, out_w / in_w
    else:
        if scale <= 0:
            raise ValueError(f"scale must be positive, got {scale}")
        scale_h = scale_w = float(scale)
        out_h, out_w = math.ceil(in_h * scale), math.ceil(in_w * scale)
    if img.dtype == np.uint8:
        out_dtype = np.uint8
    elif np.issubdtype(img.dtype, np.floating):
        out_dtype = img.dtype
    else:
        raise TypeError(f"imresize supports uint8 and float images, got {img.dtype}")
    w_h, idx_h = resize_weights(in_h, out_h, float(scale_h), antialiasing)
    w_w, idx_w = resize_weights(in_w, out_w, float(scale_w), antialiasing)
    out = np.empty((out_h, out_w) + img.shape[2:], dtype=out_dtype)
    # MATLAB resizes along the axis with the smaller factor first (height on ties).
    # In float64 the order only matters at rounding level. The work goes by blocks of rows,
    # so that no float64 copy of the whole image is made (a 12000x12000 photo: 3.5 GB).
    if scale_h <= scale_w:  # height first: a block of output rows needs only its input rows
        step = _rows(img.shape)
        for r in range(0, out_h, step):
            rows = _apply(img, w_h[r:r + step], idx_h[r:r + step], 0)
            out[r:r + step] = _to(_apply(rows, w_w, idx_w, 1), out_dtype)
    else:  # width first, row block by row block, then height
        mid = np.empty((in_h, out_w) + img.shape[2:], dtype=np.float64)
        step = _rows(img.shape)
        for r in range(0, in_h, step):
            mid[r:r + step] = _apply(img[r:r + step], w_w, idx_w, 1)
        step = _rows(mid.shape)
        for r in range(0, out_h, step):
            out[r:r + step] = _to(_apply(mid, w_h[r:r + step], idx_h[r:r + step], 0), out_dtype)
    return out


def downscale(hr: np.ndarray, scale: int) -> np.ndarray:
    """The standard SR degradation: bicubic downscale of ``hr`` by an integer ``scale``.

    ``hr`` must already be cropped to a multiple of ``scale`` (see ``mod_crop``).
    """
    h, w = hr.shape[:2]
    if h % scale or w % scale:
        raise ValueError(f"image size {h}x{w} is not a multiple of the scale {scale}; "
                         "crop it first (mod_crop)")
    return imresize(hr, output_shape=(h // scale, w // scale))


def mod_crop(img: np.ndarray, scale: int) -> np.ndarray:
    """Crop the bottom/right so that height and width are multiples of ``scale``."""
    h, w = img.shape[:2]
    return img[: h - h % scale, : w - w % scale]


def bicubic_upscale(lr: np.ndarray, scale: int) -> np.ndarray:
    """MATLAB-style bicubic upscaling of a uint8 image (the reference row)."""
    out = imresize(lr, scale)
    if out.dtype != np.uint8:
        out = np.clip(np.round(out), 0, 255).astype(np.uint8)
    return out
