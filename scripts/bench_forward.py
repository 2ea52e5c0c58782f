"""Time one forward pass of official IET networks (random weights) and write JSON.

    python scripts/bench_forward.py [--models iet_light_x4,iet_x4] [--size 64] [--batch 1]
        [--dtype float32] [--repeats 3] [--output benchmarks/results/forward_cpu.json]

Reports compile time and the median of `repeats` steady-state runs of the jitted forward,
with the machine it ran on. Weights are random: the cost does not depend on their values
beyond which candidates top-k keeps.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from iet_jax.model import IET, config

import benchmarking  # scripts/benchmarking.py, a sibling of this script


def measure(name: str, settings: str, size: int, batch: int, dtype: str, repeats: int) -> dict:
    variant, scale = name.rsplit("_x", 1)
    cfg = config.official(variant, int(scale), settings, **config.dtype_fields(dtype))
    model = IET(cfg, rngs=nnx.Rngs(0))
    x = jax.random.uniform(jax.random.key(0), (batch, size, size, 3), jnp.dtype(dtype))
    forward = nnx.jit(lambda m, x: m(x))
    first, runs = benchmarking.time_call(lambda: forward(model, x).block_until_ready(), repeats)
    steady = statistics.median(runs)
    return dict(model=name, settings=settings, input=[batch, size, size, 3], dtype=dtype,
                tokens_after_padding=max(size, model.min_size()) ** 2,
                first_call_s=round(first, 3), compile_s_estimate=round(first - steady, 3),
                forward_s=round(steady, 3), runs_s=[round(r, 3) for r in runs])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="iet_light_x4,iet_x4")
    parser.add_argument("--settings", default="eval", choices=("eval", "train"))
    parser.add_argument("--size", type=int, default=64, help="LR input side")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=config.DTYPES)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path,
                        default=Path("benchmarks/results/forward_cpu.json"))
    args = parser.parse_args()
    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    rows = [measure(m, args.settings, args.size, args.batch, args.dtype, args.repeats)
            for m in args.models.split(",")]
    machine = benchmarking.machine_info()
    print(f"{'model':14s} {'input':>16s} {'dtype':>8s} {'compile s':>10s} {'forward s':>10s}")
    for r in rows:
        shape = "x".join(map(str, r["input"]))
        print(f"{r['model']:14s} {shape:>16s} {r['dtype']:>8s} {r['compile_s_estimate']:>10.2f} "
              f"{r['forward_s']:>10.2f}")
    print(f"on {machine['backend']} ({machine['cpu_count']} cores), jax {machine['jax']}")
    benchmarking.write_results(args.output, rows)


if __name__ == "__main__":
    main()
