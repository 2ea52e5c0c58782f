"""Where each token's attention window lies (NATTEN's placement): the geometry that the
initial candidate lists (`attention.initial_candidates`) and the tiled window products
(`tiled`) share."""

from __future__ import annotations

import numpy as np


def window_starts(length: int, kernel: int, dilation: int) -> np.ndarray:
    """First member of each position's window along one axis (NATTEN semantics).

    With dilation the axis splits into `dilation` interleaved sub-grids; the window is taken in
    the position's own sub-grid and shifted inward at the borders so it keeps `kernel` members.
    """
    pos = np.arange(length)
    sub = pos % dilation
    sub_len = (length - sub + dilation - 1) // dilation
    if sub_len.min() < kernel:
        raise ValueError(
            f"an axis of {length} tokens is too short for a {kernel}-wide window with dilation "
            f"{dilation}: it needs at least {kernel * dilation} tokens"
        )
    start = np.clip(pos // dilation - kernel // 2, 0, sub_len - kernel)
    return sub + dilation * start


def neighbourhood(height: int, width: int, kernel: int, dilation: int = 1) -> np.ndarray:
    """(H*W, kernel*kernel) int32: each token's window, row-major over the window."""
    steps = dilation * np.arange(kernel)
    ys = window_starts(height, kernel, dilation)[:, None] + steps  # (H, k)
    xs = window_starts(width, kernel, dilation)[:, None] + steps  # (W, k)
    idx = ys[:, None, :, None] * width + xs[None, :, None, :]  # (H, W, k, k)
    return idx.reshape(height * width, kernel * kernel).astype(np.int32)
