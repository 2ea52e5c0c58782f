"""Time IET's gather-attend step (gather_qk -> softmax -> gather_av) per implementation.

    python scripts/bench_attention.py                   # IET shapes, all implementations here
    python scripts/bench_attention.py --quick           # small shapes, < 1 minute on a CPU
    python scripts/bench_attention.py --impls xla,pallas,pallas_deterministic --dtype bfloat16

For each head shape (IET: 6 heads of d = 40; IET-light: 3 heads of d = 20 in block 0, where
K = 914, and d = 18 elsewhere) and each candidate count K it times the forward and the
forward + backward (gradients of q, k, v) of one attention layer on batch 8 of 64 x 64 LR
tokens, and reports:
- the median time of `--repeats` runs after the first (compile and first-run times too);
- bandwidth: tensor bytes / time, where tensor bytes count q, k, v, idx, the scores/attention
  and the output once per pass that reads or writes them (forward: 6 tensors; forward +
  backward: the forward's, the backward's reads of the same tensors and the output
  cotangent, and the writes of dq, dk, dv): the bytes an ideal kernel that reads each
  gathered row from cache would move. `gathered_GBps` counts each gathered key/value row
  K times instead (what a kernel without any reuse would move);
- memory: the compiled program's temporary bytes (`memory_analysis()`) and, where the backend
  reports it, the process's peak bytes in use after the run (`memory_stats()`; cumulative over
  the process, so compare rows in order), else n/a.

Implementations: xla, native (the C++ CPU kernels, `iet_jax.kernels.native`), pallas (atomic
scatter in the backward), pallas_deterministic (sorted scatter), and tiled: the initial
17x17 + dilated 25x25 windows as tiled matrix products (`iet_jax.model.tiled`, what
`initial_attention="tiled"` runs in block 0), so only at K = 914 on the initial lists; gather
it against xla/pallas there. On a CPU Pallas runs interpreted, which says nothing about GPU
speed: it is skipped there unless named in --impls. Results go to
benchmarks/results/attention_<platform>[_quick].json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from iet_jax.kernels import gather  # noqa: E402
from iet_jax.model import attention  # noqa: E402

import benchmarking  # noqa: E402  (scripts/benchmarking.py, a sibling of this script)

ALL_KS = (914, 345, 225, 185, 125, 121, 81, 64, 36, 24)
HEADS = {"iet": (6, 40, 40), "iet_light": (3, 20, 18)}  # heads, d at K = 914, d elsewhere
IMPLS = {"xla": ("xla", False), "native": ("native", False), "pallas": ("pallas", False),
         "pallas_deterministic": ("pallas", True), "tiled": ("tiled", False)}
INITIAL = (17, 25, 2)  # r1, r2, dilation of the initial lists


def candidate_lists(key, batch, heads, side, k):
    """(B, h, N, K): subsets of the initial 17x17 + dilated 25x25 lists (the real pattern)
    where the grid is big enough, else uniform random tokens."""
    n = side * side
    if side >= 50:
        initial = jnp.asarray(attention.initial_candidates(side, side, *INITIAL).idx)
        if k == initial.shape[1]:
            return jnp.broadcast_to(initial, (batch, heads) + initial.shape), "initial 17x17+25x25"
        scores = jax.random.uniform(key, (batch, heads, n, initial.shape[1]))
        _, pos = jax.lax.top_k(scores, k)
        return jnp.take_along_axis(jnp.broadcast_to(initial, scores.shape), pos, -1), \
            "random subsets of the initial lists"
    return jax.random.randint(key, (batch, heads, n, k), 0, n, jnp.int32), "uniform random"


def tiled_layer(q, k, v, side):
    """The same layer on the initial lists, their windows as tiled matrix products: the
    model's own `initial_attention="tiled"` scores and aggregation (no bias or masks)."""
    initial = attention.initial_candidates(side, side, *INITIAL)
    s = attention.initial_scores(q, k, initial, "tiled", "xla", False)
    a = jax.nn.softmax(s, axis=-1)
    return attention.initial_aggregate(a, v, initial, "tiled", "xla", False)


def layer(q, k, v, idx, impl, deterministic):
    s = gather.gather_qk(q, k, idx, impl, deterministic)
    a = jax.nn.softmax(s, axis=-1)
    return gather.gather_av(a, v, idx, impl, deterministic)


def timed(fn, args, repeats):
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - start
    try:
        temp = compiled.memory_analysis().temp_size_in_bytes
    except Exception:  # noqa: BLE001 - not every backend reports it
        temp = None
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    first = time.perf_counter() - start
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        runs.append(time.perf_counter() - start)
    return compile_s, first, statistics.median(runs), temp


def measure(variant, k, impl_name, args):
    heads, d_initial, d_rest = HEADS[variant]
    d = d_initial if k == 914 else d_rest
    side, batch = args.size, args.batch
    n = side * side
    dtype = jnp.dtype(args.dtype)
    keys = jax.random.split(jax.random.key(k), 4)
    q, kk, v = (jax.random.normal(keys[i], (batch, heads, n, d), dtype) for i in range(3))
    idx, lists = candidate_lists(keys[3], batch, heads, side, k)
    impl, deterministic = IMPLS[impl_name]
    if impl == "tiled" and not lists.startswith("initial"):
        return None  # tiled products exist for the initial window lists only

    def forward(q, kk, v, idx):
        if impl == "tiled":
            return tiled_layer(q, kk, v, side)
        return layer(q, kk, v, idx, impl, deterministic)

    def forward_backward(q, kk, v, idx):
        out, pull = jax.vjp(lambda q, kk, v: forward(q, kk, v, idx), q, kk, v)
        return out, pull(jnp.ones_like(out))

    item = dtype.itemsize
    qkv = batch * heads * n * d * item  # one of q, k, v (and of dq, dk, dv, out, dout)
    lists_bytes = batch * heads * n * k * 4  # idx (int32) or scores/attention (float32)
    gathered = 2 * batch * heads * n * k * d * item  # k and v rows, K per query
    forward_bytes = 3 * qkv + 2 * lists_bytes + qkv  # q k v idx a | out
    fb_bytes = 2 * forward_bytes + qkv + 3 * qkv  # + dout read, dq dk dv written
    row = dict(variant=variant, impl=impl_name, K=k, heads=heads, d=d, batch=batch, tokens=n,
               dtype=args.dtype, lists=lists)
    for name, fn, nbytes, extra in (("fwd", forward, forward_bytes, gathered),
                                    ("fwd_bwd", forward_backward, fb_bytes, 2 * gathered)):
        compile_s, first, median, temp = timed(fn, (q, kk, v, idx), args.repeats)
        row[name] = dict(
            ms=1e3 * median, compile_s=compile_s, first_run_s=first, tensor_GB=nbytes / 1e9,
            GBps=nbytes / median / 1e9, gathered_GBps=(nbytes + extra) / median / 1e9,
            temp_bytes=temp, peak_bytes_in_use=benchmarking.peak_memory_bytes(),
        )
    return row


def fmt_bytes(b):
    return "n/a" if b is None else f"{b / 2**20:.0f}M"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="batch 2, 16x16 tokens, K in (64, 24): a quick look on a CPU")
    parser.add_argument("--impls", default=None,
                        help="comma list of xla, native, pallas, pallas_deterministic, tiled "
                             "(default: all; xla, native and tiled on CPU, where Pallas is "
                             "interpreted; all but native elsewhere)")
    parser.add_argument("--variants", default="iet,iet_light")
    parser.add_argument("--ks", default=None, help="comma list of K (default: IET's budgets)")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--size", type=int, default=None, help="LR side in tokens (64)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)

    backend = jax.default_backend()
    args.batch = args.batch or (2 if args.quick else 8)
    args.size = args.size or (16 if args.quick else 64)
    args.repeats = args.repeats or (3 if args.quick else 10)
    ks = [int(k) for k in args.ks.split(",")] if args.ks else ([64, 24] if args.quick else ALL_KS)
    impls = args.impls.split(",") if args.impls else (
        ["xla", "native", "tiled"] if backend == "cpu"
        else [name for name in IMPLS if name != "native"])
    unknown = set(impls) - set(IMPLS)
    if unknown:
        parser.error(f"unknown implementations {sorted(unknown)}; choose from {list(IMPLS)}")
    output = Path(args.output or Path(__file__).resolve().parents[1] / "benchmarks" / "results" /
                  f"attention_{backend}{'_quick' if args.quick else ''}.json")

    rows = []
    print(f"{'variant':10} {'impl':21} {'K':>4} {'d':>3} {'fwd ms':>9} {'GB/s':>7} "
          f"{'f+b ms':>9} {'GB/s':>7} {'temp f+b':>9} {'peak':>7}")
    for variant in args.variants.split(","):
        for k in ks:
            for impl_name in impls:
                row = measure(variant, k, impl_name, args)
                if row is None:
                    continue
                rows.append(row)
                f, fb = row["fwd"], row["fwd_bwd"]
                print(f"{variant:10} {impl_name:21} {k:4d} {row['d']:3d} {f['ms']:9.2f} "
                      f"{f['GBps']:7.1f} {fb['ms']:9.2f} {fb['GBps']:7.1f} "
                      f"{fmt_bytes(fb['temp_bytes']):>9} {fmt_bytes(fb['peak_bytes_in_use']):>7}",
                      flush=True)
                # after each row, so a run stopped by a time limit keeps what it measured
                benchmarking.write_results(
                    output, rows,
                    benchmark="attention gather-attend (gather_qk, softmax, gather_av)",
                    quick=args.quick, repeats=args.repeats,
                    notes=("median of repeats after a first run; GBps = tensor bytes / time "
                           "(q, k, v, idx, scores/attention, output and cotangents once per "
                           "pass); gathered_GBps adds K reads of each gathered key/value row; "
                           "temp_bytes from the compiled program's memory_analysis; "
                           "peak_bytes_in_use is process-wide and cumulative"))

if __name__ == "__main__":
    main()
