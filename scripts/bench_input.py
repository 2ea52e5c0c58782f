"""Patches per second of the training input pipeline, on the demo data.

    python scripts/bench_input.py [--data-dir DIR] [--batches 40]
        [--output benchmarks/results/input_cpu.json]

Builds the demo dataset (x2 and x4) if needed, then times ``PairedPatchLoader`` for
LR patch 64 at x4 and LR patch 48 at x2 (global batch 16, augmentation on), with decoded
images cached in memory (the default for small datasets) and without the cache (every
sample reads its image pair again, as for DIV2K-sized data), for PNG storage (every
sample decodes two PNGs) and raw storage (``--storage raw``). Prints a table and writes
JSON with the machine it ran on.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from iet_jax.datasets import DatasetNotBuiltError, open_source
from iet_jax.datasets import builders
from iet_jax.datasets.loader import PairedPatchLoader

CASES = [  # (scale, LR patch, global batch)
    (4, 64, 16),
    (2, 48, 16),
]


def measure(src, scale, patch, batch, *, cache, workers, batches, warmup=3) -> dict:
    loader = PairedPatchLoader(src, scale=scale, patch_size=patch, global_batch_size=batch,
                               seed=0, num_workers=workers, cache=cache)
    for _ in range(warmup):
        next(loader)
    rates = []
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(batches):
            next(loader)
        rates.append(batches * batch / (time.perf_counter() - start))
    loader.close()
    return dict(scale=scale, lr_patch=patch, hr_patch=patch * scale, global_batch=batch,
                cache=cache, num_workers=workers,
                patches_per_s=round(statistics.median(rates), 1),
                runs_patches_per_s=[round(r, 1) for r in rates])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=None,
                   help="where the demo builds live (default: a temporary folder)")
    p.add_argument("--batches", type=int, default=40, help="batches per timed run")
    p.add_argument("--workers", default="1,2", help="thread counts to try")
    p.add_argument("--output", type=Path, default=Path("benchmarks/results/input_cpu.json"))
    a = p.parse_args()
    data_dir = a.data_dir or tempfile.mkdtemp(prefix="iet_bench_")
    build_s = {}
    dirs = {"png": Path(data_dir), "raw": Path(data_dir) / "raw"}
    for storage, d in dirs.items():
        for scale in sorted({c[0] for c in CASES}):
            try:
                open_source("demo", "train", scale, data_dir=d)
            except DatasetNotBuiltError:
                start = time.perf_counter()
                builders.build("demo", scale, data_dir=d, verbose=False, storage=storage)
                build_s[f"{storage} x{scale}"] = round(time.perf_counter() - start, 1)
    results = []
    for scale, patch, batch in CASES:
        for storage, cache in (("png", True), ("png", False), ("raw", False)):
            src = open_source("demo", "train", scale, data_dir=dirs[storage])
            for workers in (int(w) for w in a.workers.split(",")):
                r = measure(src, scale, patch, batch, cache=cache, workers=workers,
                            batches=a.batches if cache else max(5, a.batches // 4))
                r["storage"] = storage
                results.append(r)
                print(f"x{scale} LR {patch} batch {batch} {storage} cache={cache!s:5} "
                      f"workers={workers}: {r['patches_per_s']:8.1f} patches/s")
    machine = dict(processor=platform.processor() or platform.machine(),
                   cpu_count=os.cpu_count(), python=platform.python_version(),
                   platform=platform.platform(), date=str(datetime.date.today()),
                   load_average_1m=round(os.getloadavg()[0], 2))
    out = dict(machine=machine, dataset="demo (train split)", demo_build_s=build_s,
               results=results)
    print()
    print("| scale | LR patch | HR patch | batch | storage | cache | workers | patches/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| x{r['scale']} | {r['lr_patch']} | {r['hr_patch']} | {r['global_batch']} | "
              f"{r['storage']} | {'yes' if r['cache'] else 'no'} | {r['num_workers']} | "
              f"{r['patches_per_s']} |")
    a.output.parent.mkdir(parents=True, exist_ok=True)
    a.output.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {a.output}")


if __name__ == "__main__":
    main()
