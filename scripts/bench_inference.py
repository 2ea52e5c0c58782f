"""Inference latency and memory of IET x4 and IET-light x4 (random weights), whole and tiled.

    python scripts/bench_inference.py                  # GPU: 320x180 LR -> 1280x720
    python scripts/bench_inference.py --quick          # CPU: light x4 on 48x40, ~1 min
        [--models iet_x4,iet_light_x4] [--size 320x180] [--dtypes float32,bfloat16]
        [--tile 96 --tile-overlap 16] [--output FILE]

Whole-image inference is one jitted forward on the full LR image; tiled inference goes
through `iet_jax.evaluation.inference.Upscaler` (fixed-size tiles, blended). Reports the median
latency of `--repeats` runs after the first (compiling) one and the device's peak memory.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from flax import nnx

from iet_jax.evaluation.inference import DEFAULT_OVERLAP, Upscaler
from iet_jax.model import IET
from iet_jax.model import config as config_lib

import benchmarking  # scripts/benchmarking.py, a sibling of this script


def measure(name: str, width: int, height: int, dtype: str, tile: int | None, overlap: int,
            repeats: int) -> dict:
    variant, scale = name.rsplit("_x", 1)
    cfg = config_lib.official(variant, int(scale), "eval", **config_lib.dtype_fields(dtype))
    upscaler = Upscaler(IET(cfg, rngs=nnx.Rngs(0)), tile=tile, overlap=overlap)
    image = np.random.default_rng(0).random((height, width, 3), np.float32)
    row = dict(model=name, input=f"{width}x{height}", dtype=dtype,
               mode="whole" if tile is None else f"tile {tile}/{overlap}")
    try:
        first, runs = benchmarking.time_call(lambda: upscaler(image), repeats)
    except Exception as error:  # noqa: BLE001
        if "RESOURCE_EXHAUSTED" in str(error) or "out of memory" in str(error).lower():
            return dict(row, error="out of memory")
        raise
    seconds = benchmarking.median(runs)
    peak = benchmarking.peak_memory_bytes()
    return dict(row, first_call_s=round(first, 2), latency_s=round(seconds, 4),
                peak_memory_gib=None if peak is None else round(peak / 2 ** 30, 3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="iet_x4,iet_light_x4")
    parser.add_argument("--size", default="320x180", help="LR WIDTHxHEIGHT")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--tile", type=int, default=96)
    parser.add_argument("--tile-overlap", type=int, default=DEFAULT_OVERLAP)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="light x4 on 48x40, float32")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.models, args.size, args.dtypes, args.repeats = "iet_light_x4", "48x40", "float32", 1
        args.tile = 80
    width, height = (int(v) for v in args.size.lower().split("x"))
    output = args.output or benchmarking.default_output("inference", args.quick)
    rows = []
    for name in args.models.split(","):
        for dtype in args.dtypes.split(","):
            for tile in (None, args.tile):
                row = measure(name, width, height, dtype, tile, args.tile_overlap, args.repeats)
                rows.append(row)
                print(row, flush=True)
                benchmarking.write_results(output, rows)  # after each row: a timeout keeps them
    benchmarking.print_table(rows, [
        ("model", "model"), ("input", "LR input"), ("dtype", "dtype"), ("mode", "mode"),
        ("latency_s", "latency s"), ("first_call_s", "first call s"),
        ("peak_memory_gib", "peak GiB"), ("error", "error")])


if __name__ == "__main__":
    main()
