"""Time one forward pass of official IET networks (random weights) and write JSON.

    python scripts/bench_forward.py [--models iet_light_x4,iet_x4] [--size 64] [--batch 1]
        [--dtype float32] [--repeats 3] [--variants "depthwise_impl=conv;depthwise_impl=shifted"]
        [--output benchmarks/results/forward_cpu.json]

Reports compile time and the median of `repeats` steady-state runs of the jitted forward,
with the machine it ran on. `--variants` compares model-config overrides (`;` between
variants, `,` between fields of one): every (model, variant) is compiled first, then timed in
interleaved rounds, so a busy machine slows them alike. Weights are random: the cost does not
depend on their values beyond which candidates top-k keeps.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from iet_jax.model import IET, config

import benchmarking  # scripts/benchmarking.py, a sibling of this script


def parse_variants(text: str) -> list[dict]:
    """'a=x,b=y;a=z' -> [{'a': 'x', 'b': 'y'}, {'a': 'z'}]; '' -> [{}]."""
    variants = []
    for part in (text.split(";") if text else [""]):
        fields = dict(item.split("=", 1) for item in part.split(",") if item)
        variants.append(fields)
    return variants


def prepare(name: str, settings: str, size: int, batch: int, dtype: str, overrides: dict):
    """(row, run): the row's description and a function that runs the forward once."""
    variant, scale = name.rsplit("_x", 1)
    cfg = config.official(variant, int(scale), settings, **config.dtype_fields(dtype),
                          **overrides)
    model = IET(cfg, rngs=nnx.Rngs(0))
    x = jax.random.uniform(jax.random.key(0), (batch, size, size, 3), jnp.dtype(dtype))
    forward = nnx.jit(lambda m, x: m(x))
    row = dict(model=name, variant=overrides, settings=settings, input=[batch, size, size, 3],
               dtype=dtype, tokens_after_padding=max(size, model.min_size()) ** 2)
    return row, lambda: forward(model, x).block_until_ready()


def measure_all(prepared: list, repeats: int) -> list[dict]:
    """Compile each, then time them in `repeats` interleaved rounds."""
    first, runs = [], [[] for _ in prepared]
    for _, run in prepared:
        start = time.perf_counter()
        run()
        first.append(time.perf_counter() - start)
    for _ in range(repeats):
        for i, (_, run) in enumerate(prepared):
            start = time.perf_counter()
            run()
            runs[i].append(time.perf_counter() - start)
    rows = []
    for (row, _), f, r in zip(prepared, first, runs):
        steady = statistics.median(r)
        rows.append(dict(row, first_call_s=round(f, 3), compile_s_estimate=round(f - steady, 3),
                         forward_s=round(steady, 3), runs_s=[round(t, 3) for t in r]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="iet_light_x4,iet_x4")
    parser.add_argument("--settings", default="eval", choices=("eval", "train"))
    parser.add_argument("--size", type=int, default=64, help="LR input side")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=config.DTYPES)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", default="",
                        help="model-config overrides to compare: 'f=v,g=w;f=u' (default: none)")
    parser.add_argument("--output", type=Path,
                        default=Path("benchmarks/results/forward_cpu.json"))
    args = parser.parse_args()
    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    try:
        prepared = [prepare(m, args.settings, args.size, args.batch, args.dtype, v)
                    for m in args.models.split(",") for v in parse_variants(args.variants)]
    except ValueError as error:  # an unknown model or a bad override: one line, not a traceback
        parser.error(str(error))
    rows = measure_all(prepared, args.repeats)
    machine = benchmarking.machine_info()
    print(f"{'model':14s} {'variant':>26s} {'input':>12s} {'dtype':>8s} {'compile s':>10s} "
          f"{'forward s':>10s}")
    for r in rows:
        shape = "x".join(map(str, r["input"]))
        variant = ",".join(f"{k}={v}" for k, v in r["variant"].items()) or "-"
        print(f"{r['model']:14s} {variant:>26s} {shape:>12s} {r['dtype']:>8s} "
              f"{r['compile_s_estimate']:>10.2f} {r['forward_s']:>10.2f}")
    print(f"on {machine['backend']} ({machine['cpu_count']} cores), jax {machine['jax']}")
    benchmarking.write_results(args.output, rows)


if __name__ == "__main__":
    main()
