"""Training on simulated devices and across a SIGKILL, each in a subprocess (JAX in the pytest
worker is already initialised with one CPU device).

- 8 CPU devices, a 4x2 (data x fsdp) mesh with FSDP-sharded state and 2 gradient
  accumulation micro-batches, against one device without accumulation: the same losses and
  parameters. Run in float64 (x64): in float32 the different summation order of the sharded
  reductions moves scores by ~1e-7, enough to flip a top-k choice between near-equal
  candidates and send the runs apart; in float64 the differences stay ~1e-15 and no
  selection flips, so the tolerance is rtol 1e-9.
- Resume: 6 steps straight with the input read in the training process, against 3 steps,
  SIGKILL (while the step-3 checkpoint is still being written asynchronously), rerun of the
  same command, both with 2 input worker processes: final parameters, EMA, optimiser state
  and step counters bitwise equal.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent


def _worker(args, tmp_path, devices: int = 1, timeout: int = 600):
    env = dict(os.environ)
    # Backend optimisation off: compiles ~2-4x faster, and these runs are a few steps long.
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count={devices}"
                        " --xla_backend_optimization_level=0").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["IET_TEST_CACHE"] = str(tmp_path / "jax_cache")
    return subprocess.run([sys.executable, str(Path(__file__).absolute()), *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_mesh_4x2_fsdp_matches_one_device(tmp_path):
    out = tmp_path / "mesh.json"
    proc = _worker(["mesh", str(tmp_path), str(out)], tmp_path, devices=8)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["devices"] == 8 and result["mesh"] == {"data": 4, "fsdp": 2}
    assert result["sharded_leaves"] > 0  # FSDP really split some parameters
    np.testing.assert_allclose(result["loss_mesh"], result["loss_one"], rtol=1e-9)
    assert result["max_rel_param_diff"] < 1e-9, result
    assert result["max_rel_ema_diff"] < 1e-9, result
    assert "batch_size 12 is not divisible" in result["refusal"]
    assert "data 4 x fsdp 2 = 8 devices" in result["refusal"]


def test_resume_after_sigkill_is_exact(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    proc = _worker(["resume", str(straight), "0", "0"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    proc = _worker(["resume", str(killed), "3", "2"], tmp_path)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-4000:])
    proc = _worker(["resume", str(killed), "0", "2"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    resumed_from = json.loads((killed / "summary.json").read_text())["start_step"]
    assert resumed_from in (2, 3)  # 3 if its save had completed before the kill
    from tiny import read_item

    for item in ("params", "ema", "opt_state", "train"):
        a, b = read_item(straight, 6, item), read_item(killed, 6, item)
        import jax
        assert jax.tree.structure(a) == jax.tree.structure(b)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_array_equal(x, y, err_msg=item)
    la = json.loads((straight / "summary.json").read_text())["history"]
    lb = json.loads((killed / "summary.json").read_text())["history"]
    assert la[resumed_from:] == lb  # the same losses after the restart


# ----------------------------------------------------------------------------- subprocess side


def _setup_jax(x64: bool = False):
    import jax

    jax.config.update("jax_compilation_cache_dir", os.environ["IET_TEST_CACHE"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    if x64:
        jax.config.update("jax_enable_x64", True)
    return jax


def _mesh(tmp: Path, out: Path):
    jax = _setup_jax(x64=True)
    sys.path.insert(0, str(HERE))
    from tiny import synthetic_source, tiny_training_config
    from iet_jax.training.config import ConfigError
    from iet_jax.training.loop import train_and_evaluate

    source = synthetic_source(8, 0)
    results = {}
    one = tiny_training_config(batch=16, steps=3, dtype="float64")
    one.checkpoint_every = 3
    s1 = train_and_evaluate(one, tmp / "one", train_source=source,
                                  devices=jax.devices()[:1])
    mesh = tiny_training_config(batch=16, steps=3, dtype="float64")
    mesh.checkpoint_every = 3
    mesh.mesh.data, mesh.mesh.fsdp = 4, 2
    mesh.param_sharding = "fsdp"
    mesh.optim.grad_accum_steps = 2
    s8 = train_and_evaluate(mesh, tmp / "mesh", train_source=source)
    sharded = [x for x in jax.tree.leaves(s8["state"].params)
               if "fsdp" in str(x.sharding.spec)]

    def rel(a, b):
        return max(float(np.abs(np.asarray(x) - np.asarray(y)).max()
                         / (np.abs(np.asarray(y)).max() + 1e-30))
                   for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

    bad = tiny_training_config(batch=12, steps=1)
    bad.mesh.data, bad.mesh.fsdp = 4, 2
    try:
        train_and_evaluate(bad, tmp / "bad", train_source=source)
        refusal = ""
    except ConfigError as e:
        refusal = str(e)
    results.update(
        devices=len(jax.devices()), mesh={"data": 4, "fsdp": 2},
        sharded_leaves=len(sharded),
        loss_one=[l for _, l in s1["history"]], loss_mesh=[l for _, l in s8["history"]],
        max_rel_param_diff=rel(s8["state"].params, s1["state"].params),
        max_rel_ema_diff=rel(s8["state"].ema, s1["state"].ema), refusal=refusal)
    out.write_text(json.dumps(results))


def _resume(workdir: Path, kill_at: int, num_workers: int):
    _setup_jax()
    sys.path.insert(0, str(HERE))
    from tiny import synthetic_source, tiny_training_config
    from iet_jax.io import workdir as workdir_lib
    from iet_jax.training.loop import train_and_evaluate

    if kill_at:
        save = workdir_lib.Checkpoints.save

        def save_then_die(self, items, loader_state, meta, metrics=None):
            save(self, items, loader_state, meta, metrics)  # async: returns mid-write
            if meta["step"] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

        workdir_lib.Checkpoints.save = save_then_die
    cfg = tiny_training_config(steps=6)
    cfg.data.num_workers = num_workers
    summary = train_and_evaluate(cfg, workdir, train_source=synthetic_source(6, 0))
    (workdir / "summary.json").write_text(json.dumps(
        {"start_step": summary["start_step"], "history": summary["history"]}))


if __name__ == "__main__":
    mode, *rest = sys.argv[1:]
    if mode == "mesh":
        _mesh(Path(rest[0]), Path(rest[1]))
    elif mode == "resume":
        _resume(Path(rest[0]), int(rest[1]), int(rest[2]))
