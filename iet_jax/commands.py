"""The console scripts (pyproject's `[project.scripts]`): each runs a front door's `main` and
exits with its status. `iet-train ARGS` is `python -m iet_jax.train ARGS`, and so on:

    iet-train     iet_jax.train            train a recipe (`--config demo`) in a workdir
    iet-evaluate  iet_jax.evaluate         PSNR/SSIM of a checkpoint on the SR benchmarks
    iet-upscale   iet_jax.upscale          upscale image files or folders
    iet-convert   iet_jax.convert          official PyTorch weights -> a model directory
    iet-build     iet_jax.datasets.build   build a dataset (demo, benchmarks, DIV2K, ...)
    iet-flops     iet_jax.flops            parameters and FLOPs of a config

Each module is imported only when its command runs (JAX is slow to import).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

SCRIPTS = {
    "iet-train": "iet_jax.train",
    "iet-evaluate": "iet_jax.evaluate",
    "iet-upscale": "iet_jax.upscale",
    "iet-convert": "iet_jax.convert",
    "iet-build": "iet_jax.datasets.build",
    "iet-flops": "iet_jax.flops",
}


def prog(script: str) -> str:
    """The command's name in its usage line: `script` when it runs as that console script,
    else `python -m MODULE`."""
    called = Path(sys.argv[0]).name.removesuffix(".exe") if sys.argv and sys.argv[0] else ""
    return script if called == script else f"python -m {SCRIPTS[script]}"


def _run(script: str) -> None:
    status = importlib.import_module(SCRIPTS[script]).main()
    sys.exit(0 if status is None else status)


def train() -> None:
    _run("iet-train")


def evaluate() -> None:
    _run("iet-evaluate")


def upscale() -> None:
    _run("iet-upscale")


def convert() -> None:
    _run("iet-convert")


def build() -> None:
    _run("iet-build")


def flops() -> None:
    _run("iet-flops")
