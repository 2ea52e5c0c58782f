"""Parameters and FLOPs of an IET config, in the convention of the paper's tables.

    iet-flops --config iet_x4:eval [--output_size 1280x720]
    python -m iet_jax.flops --config configs/iet_x4.py:eval   (the same, from a checkout)

`--config` names a packaged recipe (`iet_x4`, `iet_light_x2`, ..., `demo`; `:eval` for the
network the released checkpoints were evaluated with) or gives a config file's path.

FLOPs here are multiply-adds counted the way the official `IET.flops()` counts them, for
the LR input that upscales to the given output size (1280x720 in the paper). The convention
is kept as published, quirks included: the q/k/v projection counts embed_dim (not the
attention width), the score cost of every layer except the network's very last one uses its
budget (the last layer of a propagating block adds k_add), the network's very last layer is
charged for the full initial lists, conv_after_body is charged 3 (not 9) taps, and the
classical upsampler counts only its PixelShuffle convs, all at LR resolution.

1280x720 is not a multiple of 3: for it, as in the official code, the LR size is rounded
down (426x240 at x3, a 1278x720 output). Any other output size must be a multiple of the
scale.
"""

from __future__ import annotations

import math
import sys

from iet_jax.conventions.text import command
from iet_jax.model.flops import flops, lr_size
from iet_jax.model.network import abstract_model
from iet_jax.training import recipes

def usage() -> str:
    return (f"usage: {command('iet-flops', 'iet_jax.flops')} --config RECIPE|FILE[:eval] "
            f"[--output_size WxH]")


def main(argv=None) -> int:
    from absl import flags
    from ml_collections import config_flags

    argv = list(sys.argv if argv is None else argv)
    if any(a in ("-h", "--help", "-help", "--helpfull") for a in argv[1:]):
        print(f"{usage()}\n\n{__doc__.strip()}\n\nflags:\n"
              "  --config RECIPE|FILE[:eval]  a named recipe (below) or a config file's path\n"
              "  --config.FIELD=VALUE         set a config field (--config.model.dilation=2)\n"
              "  --output_size WxH            the output size (default 1280x720)\n"
              f"\nnamed recipes:\n{recipes.describe()}")
        return 0
    try:
        argv = recipes.resolve_argv(argv)
    except recipes.UnknownRecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    flags_ = flags.FlagValues()
    config_flag = config_flags.DEFINE_config_file(
        "config", None, "a recipe's name or a config file ([:eval])", flag_values=flags_,
        sys_argv=argv)
    flags.DEFINE_string("output_size", "1280x720", "output WIDTHxHEIGHT", flag_values=flags_)
    try:
        flags_(argv)
    except flags.Error as e:
        # A config file that raises comes with its traceback: keep the first and last lines.
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        problem = lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1]}"
        print(f"error: {problem} ({usage()})", file=sys.stderr)
        return 2
    if config_flag.value is None:
        print(f"error: --config is required ({usage()})", file=sys.stderr)
        return 2
    try:
        config = config_flag.value
        model_config = config.model if "model" in config else config
    except (OSError, ValueError) as e:  # the config file is loaded lazily, here
        name = config_flags.get_config_filename(flags_["config"])
        print(f"error: cannot load --config {name} ({str(e).splitlines()[-1].strip()}): give a "
              "recipe's name such as iet_x4:eval or a config file such as "
              "configs/iet_x4.py:eval", file=sys.stderr)
        return 2
    s = model_config.scale
    try:
        width, height = (int(v) for v in flags_.output_size.lower().split("x"))
        if width < 1 or height < 1:
            raise ValueError
    except ValueError:
        print(f"error: --output_size {flags_.output_size!r} is not WIDTHxHEIGHT: give e.g. "
              "--output_size 1280x720", file=sys.stderr)
        return 2
    try:
        lr_width, lr_height = lr_size(width, height, s)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    params = sum(math.prod(v.shape) for v in _param_leaves(model_config))
    total = flops(model_config, lr_height, lr_width)
    print(f"parameters: {params:,}")
    rounded = ("" if (lr_width * s, lr_height * s) == (width, height)
               else ", rounded down as in the paper")
    print(f"FLOPs (multiply-adds) for a {width}x{height} output (LR {lr_width}x{lr_height} at "
          f"x{s}{rounded}): {total / 1e12:.2f}T")
    return 0


def _param_leaves(model_config):
    import jax
    from flax import nnx

    model = abstract_model(model_config)
    return jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))


if __name__ == "__main__":
    sys.exit(main())
