"""Parameters and FLOPs of an IET config, in the convention of the paper's tables.

    python -m iet_jax.flops --config configs/iet_x4.py [--output_size 1280x720]

FLOPs here are multiply-adds counted the way the official `IET.flops()` counts them, for
the LR input that upscales to the given output size (1280x720 in the paper). The convention
is kept as published, quirks included: the q/k/v projection counts embed_dim (not the
attention width), the score cost of every layer except the network's very last one uses its
budget (the last layer of a propagating block adds k_add), the network's very last layer is
charged for the full initial lists, conv_after_body is charged 3 (not 9) taps, and the
classical upsampler counts only its PixelShuffle convs, all at LR resolution.
"""

from __future__ import annotations

import math

from absl import app, flags
from ml_collections import config_flags

from iet_jax import checkpoint

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file (configs/*.py[:eval])")
_OUTPUT_SIZE = flags.DEFINE_string("output_size", "1280x720", "output WIDTHxHEIGHT")


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
    if block > 5:  # SF-FFN fusion
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
        total += n * dim * dim * 9 // 2 + n * dim * dim // 16 if b in (1, 3, 5) else n * dim * dim * 9
    total += n * 3 * dim * dim  # conv_after_body
    s = config.scale
    if config.upsampler == "pixelshuffledirect":
        total += n * dim * 3 * 9
    elif s == 3:
        total += 64 * 9 * 64 * 9 * n
    else:
        total += 64 * 4 * 64 * 9 * n * int(math.log2(s))
    return float(total)


def main(argv) -> None:
    del argv
    config = _CONFIG.value
    model_config = config.model if "model" in config else config
    width, height = (int(v) for v in _OUTPUT_SIZE.value.lower().split("x"))
    s = model_config.scale
    if width % s or height % s:
        raise app.UsageError(f"output size {width}x{height} is not a multiple of the scale {s}")
    params = sum(math.prod(v.shape) for v in _param_leaves(model_config))
    total = flops(model_config, height // s, width // s)
    print(f"parameters: {params:,}")
    print(f"FLOPs (multiply-adds) for a {width}x{height} output: {total / 1e12:.2f}T")


def _param_leaves(model_config):
    import jax
    from flax import nnx

    model = checkpoint.abstract_model(model_config)
    return jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))


if __name__ == "__main__":
    app.run(main)
