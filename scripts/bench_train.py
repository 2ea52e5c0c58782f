"""Training-step throughput and memory of the official recipes' networks (random data).

    python scripts/bench_train.py                     # GPU: the issue #7 matrix
    python scripts/bench_train.py --quick             # CPU: a tiny smoke run (~1 min)
        [--cases iet_light_x4:64:16,iet_x4:64:8] [--dtypes float32,bfloat16]
        [--remat both] [--max-batch] [--gather-impl auto] [--output FILE]

Each case is NAME:LR_PATCH:BATCH. For every (case, dtype, remat) it builds the same train
step `python -m iet_jax.train` runs (L1 loss, Muon/Adam, EMA, donated state, one jit over
all devices with the batch on the data axis), times `--repeats` steady-state steps and
reports images/s and the device's peak memory. `--max-batch` doubles the batch until the
step no longer fits and reports the largest that did. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import numpy as np

from iet_jax.model import config as config_lib
from iet_jax.training import optim, sharding
from iet_jax.training import state as ts
from iet_jax.training.config import model_config_for_training, recipe
from iet_jax.training.step import compile_train_step

import benchmarking  # scripts/benchmarking.py, a sibling of this script


def build_step(cfg, batch: int, patch: int):
    """(mesh, jitted step, initial state, batch arrays) for a training config: the loop's
    own state creator and step (`create_train_state`, `compile_train_step`)."""
    model_cfg = model_config_for_training(cfg)
    tx, schedule = optim.make_optimizer(cfg.optim)
    mesh = sharding.make_mesh(cfg.mesh)
    with jax.set_mesh(mesh):
        create = ts.create_train_state(model_cfg, cfg, tx)
        shardings = sharding.state_shardings(jax.eval_shape(create), mesh, cfg.param_sharding)
        state = jax.jit(create, out_shardings=shardings)()
        step = compile_train_step(cfg, model_cfg, tx, schedule, shardings, mesh)
        rng = np.random.default_rng(0)
        s = model_cfg.scale
        data = {"lr": rng.random((batch, patch, patch, 3), np.float32),
                "hr": rng.random((batch, patch * s, patch * s, 3), np.float32)}
        data = jax.device_put(data, sharding.batch_sharding(mesh))
    return mesh, step, state, data


def measure(name: str, patch: int, batch: int, dtype: str, remat: bool, impl: str,
            repeats: int, quick: bool) -> dict:
    variant, scale = name.rsplit("_x", 1)
    cfg = recipe(variant, int(scale))
    if quick:  # a tiny network with the same structure, so CPUs finish in seconds
        cfg.model = config_lib.model_config(**{**cfg.model.to_dict(), **_QUICK_MODEL})
    cfg.batch_size, cfg.data.patch_size = batch, patch
    cfg.model.update(config_lib.dtype_fields(dtype))
    cfg.model.remat, cfg.model.gather_impl = remat, impl
    row = dict(model=name, patch=patch, batch=batch, dtype=dtype, remat=remat,
               gather_impl=impl)
    try:
        mesh, step, state, data = build_step(cfg, batch, patch)
        holder = {"state": state}

        def run():
            holder["state"], metrics = step(holder["state"], data)
            jax.block_until_ready(metrics["loss"])

        with jax.set_mesh(mesh):
            first, runs = benchmarking.time_call(run, repeats)
    except Exception as error:  # noqa: BLE001 - out of memory shows up as various errors
        if "RESOURCE_EXHAUSTED" in str(error) or "out of memory" in str(error).lower():
            return dict(row, error="out of memory")
        raise
    seconds = benchmarking.median(runs)
    return dict(row, compile_s=round(first - seconds, 2), step_s=round(seconds, 4),
                images_per_s=round(batch / seconds, 2),
                peak_memory_gib=_gib(benchmarking.peak_memory_bytes()))


def largest_batch(name, patch, start, dtype, remat, impl, limit=1024) -> int | None:
    """Double the batch until the step fails to fit; the last one that fitted."""
    fitted, batch = None, start
    while batch <= limit:
        row = measure(name, patch, batch, dtype, remat, impl, repeats=1, quick=False)
        if row.get("error"):
            break
        fitted, batch = batch, batch * 2
    return fitted


_QUICK_MODEL = dict(embed_dim=24, nattn_dim=24, num_heads=3, depths=(1,) * 8, local_range=5,
                    sparse_range=7, dilation=1, img_size=16,
                    topk_focus=((74,), (36,), (24,), (24,), (16,), (16,), (12,), (12,)),
                    topk_prop_1=(6, 5, 4, 3, 0, 0, 0, 0), topk_prop_2=(4, 3, 3, 2, 0, 0, 0, 0),
                    topk_prop_3=(12, 10, 8, 6, 0, 0, 0, 0))


def _gib(n):
    return None if n is None else round(n / 2 ** 30, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="iet_light_x4:64:16,iet_x4:64:8")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--remat", default="both", choices=("both", "on", "off"))
    parser.add_argument("--gather-impl", default="auto")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-batch", action="store_true")
    parser.add_argument("--quick", action="store_true",
                        help="tiny same-structure network, LR patch 16, batch 2 (CPU smoke run)")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.cases = ",".join(f"{c.split(':')[0]}:16:2" for c in args.cases.split(","))
        args.repeats = min(args.repeats, 2)
    remats = {"both": (False, True), "on": (True,), "off": (False,)}[args.remat]
    output = args.output or benchmarking.default_output("train_step", args.quick)
    rows = []
    for case in args.cases.split(","):
        name, patch, batch = case.split(":")
        for dtype in args.dtypes.split(","):
            for remat in remats:
                row = measure(name, int(patch), int(batch), dtype, remat, args.gather_impl,
                              args.repeats, args.quick)
                if args.max_batch and not row.get("error"):
                    row["largest_batch"] = largest_batch(name, int(patch), int(batch), dtype,
                                                         remat, args.gather_impl)
                rows.append(row)
                print(row, flush=True)
                benchmarking.write_results(output, rows)  # after each row: a timeout keeps them
    benchmarking.print_table(rows, [
        ("model", "model"), ("patch", "LR patch"), ("batch", "batch"), ("dtype", "dtype"),
        ("remat", "remat"), ("images_per_s", "images/s"), ("step_s", "step s"),
        ("peak_memory_gib", "peak GiB"), ("largest_batch", "max batch"), ("error", "error")])


if __name__ == "__main__":
    main()
