"""Shared pieces of the benchmark scripts in scripts/: the machine record, timing, memory.

Every benchmark prints a table and writes JSON whose `machine` entry says where the numbers
were measured (backend, device kind, JAX version, date), so results from different machines
are never mixed up.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import jax


def machine_info() -> dict:
    device = jax.devices()[0]
    return dict(backend=jax.default_backend(), device=device.device_kind,
                device_count=jax.device_count(), cpu_count=os.cpu_count(),
                processor=platform.processor() or platform.machine(),
                load_average=os.getloadavg(), jax=jax.__version__,
                date=time.strftime("%Y-%m-%d"))


def peak_memory_bytes() -> int | None:
    """Peak device memory in use so far (GPU/TPU); None where the backend does not report it."""
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def time_call(fn: Callable[[], object], repeats: int) -> tuple[float, list[float]]:
    """(first call incl. compilation, steady-state runs) in seconds; `fn` must block."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return first, runs


def median(values: list[float]) -> float:
    return statistics.median(values)


def default_output(stem: str, quick: bool = False) -> Path:
    """benchmarks/results/<stem>_<platform>[_quick].json"""
    suffix = "_quick" if quick else ""
    return Path(f"benchmarks/results/{stem}_{jax.default_backend()}{suffix}.json")


def write_results(path: Path, rows: list[dict], **extra) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    record = dict(machine=machine_info(), **extra, results=rows)
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")


def print_table(rows: list[dict], columns: list[tuple[str, str]]) -> None:
    """columns: (key, header). Values are printed with str(); floats with 4 significant digits."""
    def cell(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "n/a" if v is None else str(v)

    table = [[h for _, h in columns]] + [[cell(r.get(k)) for k, _ in columns] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    for n, row in enumerate(table):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
        if n == 0:
            print("  ".join("-" * w for w in widths))
