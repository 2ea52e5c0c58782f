"""Time this tree against an earlier commit in one interleaved run: forward passes and
training steps of the official networks (random weights), the same work on both sides.

    python scripts/bench_compare.py --baseline 2f4c697
        [--forward iet_x4:64,iet_x4:96,iet_light_x4:64,iet_light_x4:96]
        [--train iet_light_x2:64:2] [--repeats 3] [--output benchmarks/results/compare_cpu.json]

The baseline commit is unpacked (`git archive`) into a temporary folder. Each side runs in a
worker process of its own, with its own tree on `sys.path`, that builds and compiles every
case first; then the driver times the cases in rounds, baseline and current back to back for
each case (which goes first alternates from round to round), so a machine that gets busier
slows both alike. The table gives each side's median and fastest run (on a shared machine
the fastest is the least disturbed). A worker only reports seconds; the driver keeps the
table. The current side is the working tree, labelled `+changes` when it differs from HEAD.
Forward cases are MODEL:LR_SIDE (batch 1, float32, eval settings); training cases
MODEL:LR_PATCH:BATCH (float32, the recipe's optimizer, remat off).

The worker adapts to the two package layouts this project has had: before the restructuring
(`iet_jax.config`, `iet_jax.checkpoint.dtype_fields`) and after it (`iet_jax.model.config`,
`iet_jax.training.config.recipe`); both trees' `scripts/bench_train.py` provide `build_step`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- worker (one per tree)

def _layout():
    """(official, recipe, dtype_fields) of whichever package layout is on sys.path."""
    try:
        from iet_jax.model import config as model_config
        from iet_jax.training.config import recipe
        return model_config.official, recipe, model_config.dtype_fields
    except ImportError:  # the layout before the restructuring
        from iet_jax import checkpoint, config
        return config.official, config.recipe, checkpoint.dtype_fields


def _prepare_forward(model: str, side: int):
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from iet_jax.model import IET

    official, _, dtype_fields = _layout()
    variant, scale = model.rsplit("_x", 1)
    net = IET(official(variant, int(scale), "eval", **dtype_fields("float32")),
              rngs=nnx.Rngs(0))
    x = jax.random.uniform(jax.random.key(0), (1, side, side, 3), jnp.float32)
    forward = nnx.jit(lambda m, x: m(x))
    return lambda: forward(net, x).block_until_ready()


def _prepare_train(model: str, patch: int, batch: int):
    import jax
    from bench_train import build_step  # this tree's own scripts/bench_train.py

    _, recipe, dtype_fields = _layout()
    variant, scale = model.rsplit("_x", 1)
    cfg = recipe(variant, int(scale))
    cfg.batch_size, cfg.data.patch_size = batch, patch
    cfg.model.update(dtype_fields("float32"))
    cfg.model.remat = False
    mesh, step, state, data = build_step(cfg, batch, patch)
    holder = {"state": state}

    def run():
        with jax.set_mesh(mesh):
            holder["state"], metrics = step(holder["state"], data)
            jax.block_until_ready(metrics["loss"])

    return run


def worker() -> None:
    """Read one JSON command per line from stdin, answer one JSON line on stdout."""
    if Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
        del sys.path[0]  # this script's folder must not shadow the side's own scripts/
    cases = []
    for line in sys.stdin:
        command = json.loads(line)
        if command["do"] == "prepare":
            kind, spec = command["kind"], command["spec"]
            parts = spec.split(":")
            run = (_prepare_forward(parts[0], int(parts[1])) if kind == "forward" else
                   _prepare_train(parts[0], int(parts[1]), int(parts[2])))
            start = time.perf_counter()
            run()  # compiles
            cases.append(run)
            answer = {"first_s": time.perf_counter() - start}
        else:  # "run"
            start = time.perf_counter()
            cases[command["case"]]()
            answer = {"s": time.perf_counter() - start}
        print(json.dumps(answer), flush=True)


# ---------------------------------------------------------------- driver

class Side:
    """A worker process running one tree."""

    def __init__(self, name: str, tree: Path):
        self.name = name
        env = dict(os.environ, PYTHONPATH=f"{tree}{os.pathsep}{tree / 'scripts'}")
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker"], cwd=tree, env=env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def ask(self, **command) -> dict:
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise SystemExit(f"the {self.name} worker stopped (its error is printed above)")
        return json.loads(line)

    def close(self):
        self.process.stdin.close()
        self.process.wait()


def unpack(commit: str, into: Path) -> Path:
    """The tree of `commit` in `into` (no worktree registered, nothing left in the repo)."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default="2f4c697", help="commit to compare against")
    parser.add_argument("--forward", default="iet_x4:64,iet_x4:96,iet_light_x4:64,"
                                             "iet_light_x4:96")
    parser.add_argument("--train", default="iet_light_x2:64:2")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path,
                        default=ROOT / "benchmarks" / "results" / "compare_cpu.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker()

    sys.path.insert(0, str(ROOT / "scripts"))
    import benchmarking

    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", args.baseline],
                            check=True, capture_output=True, text=True).stdout.strip()
    current = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                             check=True, capture_output=True, text=True).stdout.strip()
    if subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                      check=True, capture_output=True, text=True).stdout.strip():
        current += "+changes"  # the working tree is what runs, not HEAD
    cases = [("forward", s) for s in args.forward.split(",") if s] + \
            [("train", s) for s in args.train.split(",") if s]
    with tempfile.TemporaryDirectory(prefix="iet-baseline-") as tmp:
        sides = [Side(f"baseline {commit}", unpack(args.baseline, Path(tmp))),
                 Side(f"current {current}", ROOT)]
        first = {(s.name, c): s.ask(do="prepare", kind=c[0], spec=c[1])["first_s"]
                 for c in cases for s in sides}
        runs = {key: [] for key in first}
        for r in range(args.repeats):
            for i, case in enumerate(cases):
                # The side that runs second alternates, so neither always follows the other.
                for side in (sides if r % 2 == 0 else sides[::-1]):
                    runs[(side.name, case)].append(side.ask(do="run", case=i)["s"])
        for side in sides:
            side.close()

    rows = []
    for kind, spec in cases:
        base_runs, now_runs = (runs[(s.name, (kind, spec))] for s in sides)
        base_first, now_first = (first[(s.name, (kind, spec))] for s in sides)
        base, now = statistics.median(base_runs), statistics.median(now_runs)
        # The fastest run of each side: on a shared machine whose speed drifts, the least
        # disturbed estimate, reported next to the medians.
        base_best, now_best = min(base_runs), min(now_runs)
        rows.append(dict(kind=kind, case=spec, baseline_s=round(base, 3),
                         current_s=round(now, 3), speedup=round(base / now, 2),
                         baseline_best_s=round(base_best, 3), current_best_s=round(now_best, 3),
                         best_speedup=round(base_best / now_best, 2),
                         baseline_runs=[round(t, 3) for t in base_runs],
                         current_runs=[round(t, 3) for t in now_runs],
                         baseline_first_s=round(base_first, 2),
                         current_first_s=round(now_first, 2)))
    benchmarking.print_table(rows, [("kind", "kind"), ("case", "case"),
                                    ("baseline_s", f"{commit} s"), ("current_s", f"{current} s"),
                                    ("speedup", "speed-up"), ("baseline_best_s", f"{commit} best"),
                                    ("current_best_s", f"{current} best"),
                                    ("best_speedup", "speed-up (best)")])
    benchmarking.write_results(args.output, rows, baseline=commit, current=current,
                               repeats=args.repeats,
                               notes="median (and fastest) seconds of interleaved runs after a "
                                     "compiling one; forward: batch 1, float32, eval; train: "
                                     "float32, remat off")


if __name__ == "__main__":
    main()
