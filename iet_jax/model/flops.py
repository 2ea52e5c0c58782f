"""Multiply-adds of an IET config in the convention of the paper's tables.

`flops(config, lr_height, lr_width)` counts the way the official `IET.flops()` counts, for
one LR input (the paper's column is for the LR input of a 1280x720 output; `lr_size` gives
it). The convention is kept as published, quirks included: the q/k/v projection counts
embed_dim (not the attention width), the score cost of every layer except the network's very
last one uses its budget (the last layer of a propagating block adds k_add), the network's
very last layer is charged for the full initial lists, conv_after_body is charged 3 (not 9)
taps, and the classical upsampler counts only its PixelShuffle convs, all at LR resolution.
"""

from __future__ import annotations

import math

from iet_jax.model.network import BOTTLENECK_BLOCKS, SIMILARITY_BLOCKS, UPSAMPLE_FEATURES

# The output size of the paper's FLOPs column (WIDTH, HEIGHT).
PAPER_OUTPUT_SIZE = (1280, 720)


def _layer(config, block: int, layer: int, n: int) -> int:
    dim, heads, k = config.embed_dim, config.num_heads, config.convffn_kernel_size
    attn_dim = config.nattn_dim if block == 0 else dim
    budget = config.topk_focus[block][layer]
    last_layer = layer == len(config.topk_focus[block]) - 1
    last_block = block == len(config.topk_focus) - 1
    flops = dim * 3 * dim * n  # qkv
    if not last_layer:
        flops += n * attn_dim * budget
    elif not last_block:
        flops += n * attn_dim * (budget + config.topk_prop_3[block])
    else:
        flops += n * attn_dim * (config.local_range ** 2 + config.sparse_range ** 2)
    flops += n * budget * attn_dim  # aggregation
    flops += n * attn_dim * dim  # proj
    mlp = config.mlp_ratio
    if block in SIMILARITY_BLOCKS:  # SF-FFN fusion
        d = dim // heads
        flops += n * d * d * 2 + n * d * k * k
    flops += 2 * n * dim * dim * mlp + n * dim * k * k * mlp  # ConvFFN
    flops += n * dim * k * k  # LePE
    return flops


def flops(config, lr_height: int, lr_width: int) -> float:
    """Multiply-adds of one forward pass on an LR image of the given size (official count)."""
    n, dim = lr_height * lr_width, config.embed_dim
    total = n * 3 * dim * 9 + n * dim  # conv_first, patch norm
    for b, budgets in enumerate(config.topk_focus):
        total += sum(_layer(config, b, l, n) for l in range(len(budgets)))
        total += (n * dim * dim * 9 // 2 + n * dim * dim // 16 if b in BOTTLENECK_BLOCKS
                  else n * dim * dim * 9)
    total += n * 3 * dim * dim  # conv_after_body
    s, f = config.scale, UPSAMPLE_FEATURES
    if config.upsampler == "pixelshuffledirect":
        total += n * dim * 3 * 9
    elif s == 3:
        total += f * 9 * f * 9 * n
    else:
        total += f * 4 * f * 9 * n * int(math.log2(s))
    return float(total)


def lr_size(width: int, height: int, scale: int) -> tuple[int, int]:
    """The LR (width, height) for an output size; ValueError naming the fix if there is none.

    The paper's 1280x720 is rounded down at x3 (426x240), as the official code counts it.
    """
    if (width, height) == PAPER_OUTPUT_SIZE:
        return width // scale, height // scale
    if width % scale or height % scale:
        w, h = width - width % scale, height - height % scale
        raise ValueError(f"output size {width}x{height} is not a multiple of the scale {scale}: "
                         f"give one that is (e.g. --output_size {w}x{h}), or leave "
                         "--output_size out for the paper's 1280x720")
    return width // scale, height // scale
