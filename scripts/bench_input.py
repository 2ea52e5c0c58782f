"""Patches per second of the training input pipeline against its worker processes, and what
the demo recipe's train step consumes.

    python scripts/bench_input.py [--workers 1,2,4,8] [--seconds 2] [--time-limit 85]
        [--data-dir DIR] [--output benchmarks/results/input_cpu.json]

Builds, from scikit-image's bundled photographs (no download), the demo training set at x4
stored as PNG and as raw arrays, and a folder build of the same photographs cut into HR
sub-images of 288 pixels (PNG, ``--subimage 288``). For each build it times
``PairedPatchLoader`` (x4, LR patch 64, global batch 16, augmentation on, no image cache, so
every sample reads and decodes its image pair as for DIV2K-sized data) in one process with
one thread (the one-core rate) and with each worker count of ``--workers`` that the machine
has cores for. ``efficiency`` is rate / (workers x one-core rate).

Then the demo recipe (x2, LR patch 16, batch 4): its train step fed with one fixed batch,
against the same step fed by the loader with the recipe's settings: the loader starves the
step when the second is slower.

Every measurement runs for ``--seconds`` after its first batches; measurements that would
pass ``--time-limit`` seconds in all are skipped and listed. Prints a table and writes JSON
with the machine it ran on.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from iet_jax.datasets import DatasetNotBuiltError, builders, images, open_source
from iet_jax.datasets.loader import PairedPatchLoader
from iet_jax.training import sharding
from iet_jax.training.recipes import demo

import benchmarking  # scripts/benchmarking.py, a sibling of this script
from bench_train import build_step

SCALE, PATCH, BATCH = 4, 64, 16
SUBIMAGE = 288  # HR; LR 72 >= PATCH


def build_sets(data_dir: Path) -> tuple[dict, dict]:
    """({build: source}, {build: seconds it took to build})."""
    dirs = {"png": data_dir / "png", "raw": data_dir / "raw"}
    sources, build_s = {}, {}
    for storage, d in dirs.items():
        start = time.perf_counter()
        try:
            sources[storage] = open_source("demo", "train", SCALE, data_dir=d)
        except DatasetNotBuiltError:
            builders.build("demo", SCALE, data_dir=d, verbose=False, storage=storage)
            sources[storage] = open_source("demo", "train", SCALE, data_dir=d)
            build_s[storage] = round(time.perf_counter() - start, 1)
    sub_dir = data_dir / "sub"
    start = time.perf_counter()
    try:
        sources["subimage"] = open_source("demo_sub", "train", SCALE, data_dir=sub_dir)
    except DatasetNotBuiltError:
        photos = data_dir / "photos"
        photos.mkdir(parents=True, exist_ok=True)
        for name in builders.DEMO_TRAIN:
            (photos / f"{name}.png").write_bytes(
                images.encode_png(builders._skimage_photo(name)))
        builders.build("paired", SCALE, data_dir=sub_dir, name="demo_sub", hr_dirs=[photos],
                       verbose=False, subimage=SUBIMAGE)
        sources["subimage"] = open_source("demo_sub", "train", SCALE, data_dir=sub_dir)
        build_s["subimage"] = round(time.perf_counter() - start, 1)
    return sources, build_s


def patches_per_s(loader, batch: int, seconds: float, warmup: int = 3) -> tuple[float, float]:
    """(patches/s over `seconds` after `warmup` batches, seconds to the first batch)."""
    start = time.perf_counter()
    next(loader)
    first = time.perf_counter() - start
    for _ in range(warmup - 1):
        next(loader)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        next(loader)
        n += 1
    return n * batch / (time.perf_counter() - start), first


def step_rate(step, state, feed, seconds: float, warmup: int = 3) -> tuple[float, object]:
    """(steps/s of `step` over `seconds`, the last state); `feed()` gives each batch."""
    for _ in range(warmup):
        state, metrics = step(state, feed())
    jax.block_until_ready(metrics)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        state, metrics = step(state, feed())
        n += 1
    jax.block_until_ready(metrics)
    return n / (time.perf_counter() - start), state


def demo_consumption(data_dir: Path, seconds: float) -> dict:
    cfg = demo.get_config()
    batch, patch = cfg.batch_size, cfg.data.patch_size
    mesh, step, state, fixed = build_step(cfg, batch, patch)
    src = open_source("demo", "train", cfg.data.scale, data_dir=data_dir, build_demo=True)
    loader = PairedPatchLoader(src, scale=cfg.data.scale, patch_size=patch,
                               global_batch_size=batch, seed=0, num_workers=cfg.data.num_workers)
    batch_sharding = sharding.batch_sharding(mesh)
    with jax.set_mesh(mesh):
        alone, state = step_rate(step, state, lambda: fixed, seconds)
        fed, _ = step_rate(step, state,
                           lambda: sharding.global_batch(next(loader), batch_sharding), seconds)
    loader.close()
    loader_rate, _ = patches_per_s(
        PairedPatchLoader(src, scale=cfg.data.scale, patch_size=patch, global_batch_size=batch,
                          seed=0, num_workers=cfg.data.num_workers), batch, seconds)
    return dict(recipe="demo", scale=cfg.data.scale, lr_patch=patch, batch=batch,
                num_workers=cfg.data.num_workers, steps_per_s_fixed_batch=round(alone, 1),
                steps_per_s_fed_by_loader=round(fed, 1),
                patches_per_s_consumed=round(alone * batch, 1),
                loader_patches_per_s=round(loader_rate, 1),
                starved=bool(fed < 0.9 * alone))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", default="1,2,4,8",
                   help="worker process counts to time (those above the core count are left out)")
    p.add_argument("--seconds", type=float, default=2.0, help="time per measurement")
    p.add_argument("--time-limit", type=float, default=85.0,
                   help="skip measurements that would end after this many seconds in all")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="where the builds live (default: a temporary folder)")
    p.add_argument("--output", type=Path, default=Path("benchmarks/results/input_cpu.json"))
    a = p.parse_args()
    begin = time.perf_counter()
    cores = os.cpu_count() or 1
    counts = [int(w) for w in a.workers.split(",")]
    if any(w < 1 for w in counts):
        raise SystemExit(f"--workers takes positive counts, got {a.workers!r}")
    counts = sorted({w for w in counts if w <= cores})
    data_dir = a.data_dir or Path(tempfile.mkdtemp(prefix="iet_bench_"))
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()
    sources, build_s = build_sets(data_dir)
    print(f"builds ready in {time.perf_counter() - begin:.1f} s: {build_s or 'all there'}")
    demo_row = demo_consumption(data_dir / "demo", a.seconds)
    print(f"demo step: {demo_row}")

    rows, skipped, last_cost, one_core = [], [], 0.0, {}
    for workers in [0, *counts]:  # every build at a worker count before the next count
        for build, src in sources.items():
            elapsed = time.perf_counter() - begin
            if elapsed + last_cost > a.time_limit:
                skipped.append(f"{build} workers={workers}")
                continue
            start = time.perf_counter()
            loader = PairedPatchLoader(src, scale=SCALE, patch_size=PATCH,
                                       global_batch_size=BATCH, seed=0, num_workers=workers,
                                       num_threads=1, cache=False)
            rate, first = patches_per_s(loader, BATCH, a.seconds)
            loader.close()
            last_cost = time.perf_counter() - start
            if workers == 0:
                one_core[build] = rate
            rows.append(dict(
                build=build, scale=SCALE, lr_patch=PATCH, hr_patch=PATCH * SCALE,
                global_batch=BATCH, cache=False, num_workers=workers,
                patches_per_s=round(rate, 1), first_batch_s=round(first, 2),
                efficiency=(round(rate / (workers * one_core[build]), 2)
                            if workers and build in one_core else None)))
            print(f"{build:8} workers={workers}: {rate:8.1f} patches/s "
                  f"(first batch after {first:.1f} s)")
    print()
    benchmarking.print_table(rows, [
        ("build", "build"), ("num_workers", "workers"), ("patches_per_s", "patches/s"),
        ("efficiency", "rate/(workers x one core)"), ("first_batch_s", "first batch s")])
    if skipped:
        print(f"skipped (time limit {a.time_limit:.0f} s): {', '.join(skipped)}")
    benchmarking.write_results(
        a.output, rows, dataset="demo training photos (9, scikit-image), x4",
        builds={"png": "demo, PNG", "raw": "demo, raw arrays",
                "subimage": f"the same photos as HR sub-images of {SUBIMAGE} px, PNG"},
        one_core="num_workers=0 with one thread", build_s=build_s, demo_step=demo_row,
        skipped=skipped, total_s=round(time.perf_counter() - begin, 1))


if __name__ == "__main__":
    main()
