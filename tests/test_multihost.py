"""Multi-process training (issue #13): how a process joins a run (`config.distributed`, the
JAX_* variables, the launchers JAX detects), and two `python -m iet_jax.train` processes on
loopback, started as the README's "Multi-host" section says.

The two-process test runs the command line in subprocesses with simulated CPU devices (2 per
process; JAX_PLATFORMS=cpu, XLA_FLAGS=--xla_force_host_platform_device_count) on the tiny
float64 recipe tests/multihost_recipe.py, 6 steps, a checkpoint every 2:

- a one-process run on 4 devices, the reference (side by side with the next run);
- two processes of 2 devices: both finish; each read only its own rows of each global batch
  (the recipe's recorder: the samples its loader read, and a digest of each row against the
  one-process loader's global batch); the checkpoints equal the one-process run's (float64:
  the cross-process reductions add in another order, ~1e-13);
- two processes again, process 0 (the coordinator, holding the workdir lock) killed once the
  step-2 checkpoint exists: process 1 stops by itself; both rerun with the same command resume
  from the newest checkpoint and end bitwise equal to the uninterrupted two-process run.

Every subprocess runs under a deadline and is killed when the test fails, so a hang fails the
test. The other tests here call no JAX collective (`jax.distributed.initialize` is replaced).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from iet_jax.io import workdir as workdir_lib
from iet_jax.training import sharding
from iet_jax.training.config import ConfigError
from iet_jax.training.loop import prepare_run
from tiny import synthetic_source, tiny_training_config

ROOT = Path(__file__).absolute().parent.parent
RECIPE = ROOT / "tests" / "multihost_recipe.py"
DEADLINE = 240  # seconds for each run of the command (a hang fails the test)
MULTI_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
             "JAX_LOCAL_DEVICE_IDS", "SLURM_JOB_ID", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE",
             "PMI_SIZE", "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES",
             "KUBERNETES_SERVICE_HOST", "JOB_COMPLETION_INDEX")


def group(**fields):
    """A `config.distributed` group: the defaults with `fields` set."""
    cfg = tiny_training_config().distributed
    cfg.update(fields)
    return cfg


# ----------------------------------------------------------------------------- joining a run


def test_single_process_unless_something_says_otherwise():
    assert sharding.distributed_plan(group(), {}) is None
    assert sharding.distributed_plan("auto", {"SLURM_NTASKS": "1", "PMI_SIZE": "1"}) is None
    # 'off' wins over the variables; the old string form still means the mode
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "2",
           "JAX_PROCESS_ID": "1"}
    assert sharding.distributed_plan(group(mode="off"), env) is None
    assert sharding.distributed_plan("off", env) is None


def test_the_variables_and_the_config_fields():
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "2",
           "JAX_PROCESS_ID": "1"}
    plan = sharding.distributed_plan(group(), env)
    assert plan.initialize_kwargs() == dict(coordinator_address="10.0.0.1:1234",
                                            num_processes=2, process_id=1, local_device_ids=None)
    assert plan.launcher is None
    assert "process id 1 (from $JAX_PROCESS_ID)" in plan.describe()
    # a config field wins over its variable
    plan = sharding.distributed_plan(group(process_id=0, local_device_ids="2,3"),
                                     {**env, "JAX_LOCAL_DEVICE_IDS": "0,1"})
    assert (plan.process_id, plan.local_device_ids) == (0, (2, 3))
    assert plan.sources["process_id"] == "--config.distributed.process_id"
    plan = sharding.distributed_plan(group(coordinator_address="h:9", num_processes=4,
                                           process_id=3), {"JAX_LOCAL_DEVICE_IDS": "0,1"})
    assert plan.initialize_kwargs() == dict(coordinator_address="h:9", num_processes=4,
                                            process_id=3, local_device_ids=[0, 1])


def test_launchers_fill_what_is_not_given():
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_NTASKS": "2",
             "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}
    cases = {"SLURM": slurm, "Open MPI": {"OMPI_COMM_WORLD_SIZE": "4"},
             "Cloud TPU": {"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}}
    for launcher, env in cases.items():
        assert sharding.detect_launcher(env) == launcher
        plan = sharding.distributed_plan(group(), env)
        assert plan.launcher == launcher
        assert plan.initialize_kwargs() == dict(coordinator_address=None, num_processes=None,
                                                process_id=None, local_device_ids=None)
    # a given address goes with the launcher's count and id
    plan = sharding.distributed_plan(group(), {**slurm, "JAX_COORDINATOR_ADDRESS": "n1:5"})
    assert plan.coordinator_address == "n1:5" and plan.launcher == "SLURM"
    assert sharding.detect_launcher({**slurm, "SLURM_NTASKS": "1"}) is None  # one task


def test_missing_or_malformed_pieces_are_one_line_naming_them():
    def refused(distributed, env, *words):
        with pytest.raises(ConfigError) as e:
            sharding.distributed_plan(distributed, env)
        message = str(e.value)
        assert "\n" not in message
        for word in words:
            assert word in message, (word, message)

    address = {"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234"}
    refused(group(), address, "127.0.0.1:1234 (from $JAX_COORDINATOR_ADDRESS) is set",
            "distributed.num_processes ($JAX_NUM_PROCESSES)",
            "distributed.process_id ($JAX_PROCESS_ID) are not")
    refused(group(num_processes=2), {"JAX_PROCESS_ID": "0"},
            "distributed.num_processes 2 (from --config.distributed.num_processes)",
            "but distributed.coordinator_address ($JAX_COORDINATOR_ADDRESS) is not")
    refused(group(mode="on"), {}, "distributed.mode is on", "$JAX_COORDINATOR_ADDRESS",
            "$JAX_NUM_PROCESSES", "$JAX_PROCESS_ID", "SLURM")
    refused(group(mode="sometimes"), {}, "distributed.mode must be 'auto', 'on' or 'off'")
    full = {**address, "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"}
    refused(group(), full, "distributed.process_id 2 (from $JAX_PROCESS_ID) must be in 0..1")
    refused(group(), {**full, "JAX_NUM_PROCESSES": "two"},
            "distributed.num_processes 'two' (from $JAX_NUM_PROCESSES) is not an integer")
    refused(group(coordinator_address="localhost"), full, "is not HOST:PORT")
    refused(group(local_device_ids="0,x"), {**full, "JAX_PROCESS_ID": "0"},
            "distributed.local_device_ids '0,x'")
    if not _importable("kubernetes"):
        refused(group(), {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "JOB_COMPLETION_INDEX": "0"},
                "a Kubernetes Job", "jax[k8s]")
    if not _importable("mpi4py"):
        refused(group(), {"PMI_SIZE": "2"}, "PMI_SIZE=2", "mpi4py")


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def test_initialize_gets_the_plan_and_its_failure_is_one_line(monkeypatch):
    calls = []

    def initialize(**kwargs):
        calls.append(kwargs)
        if kwargs["process_id"] == 1:
            raise RuntimeError("DEADLINE_EXCEEDED: Barrier timed out.\nTask 0 never came")

    monkeypatch.setattr(jax.distributed, "initialize", initialize)
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    for name in MULTI_ENV:
        monkeypatch.delenv(name, raising=False)
    assert sharding.maybe_initialize_distributed(group()) is False and calls == []
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    assert sharding.maybe_initialize_distributed(group(process_id=0)) is True
    assert calls[-1] == dict(coordinator_address="127.0.0.1:1234", num_processes=2,
                             process_id=0, local_device_ids=None)
    with pytest.raises(sharding.DistributedInitError) as e:
        sharding.maybe_initialize_distributed(group(process_id=1))
    assert "\n" not in str(e.value)
    assert str(e.value).startswith("jax.distributed.initialize failed (coordinator "
                                   "127.0.0.1:1234 (from $JAX_COORDINATOR_ADDRESS)")
    assert "Barrier timed out. Task 0 never came" in str(e.value)


def test_the_command_line_names_the_missing_piece(tmp_path, monkeypatch, capsys):
    from iet_jax import train

    for name in MULTI_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1234")
    monkeypatch.setenv("JAX_PROCESS_ID", "0")
    rc = train.main(["train", f"--config={ROOT / 'configs' / 'demo.py'}",
                     f"--workdir={tmp_path / 'wd'}"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(err) == 1, err
    assert "distributed.num_processes ($JAX_NUM_PROCESSES) is not" in err[0]
    assert not (tmp_path / "wd").exists()
    # the string form of before the group: --config.distributed=on means the mode
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS")
    monkeypatch.delenv("JAX_PROCESS_ID")
    rc = train.main(["train", f"--config={ROOT / 'configs' / 'demo.py'}",
                     f"--workdir={tmp_path / 'wd'}", "--config.distributed=on"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(err) == 1 and "distributed.mode is on" in err[0], err


def test_workdirs_of_the_string_form_resume(tmp_path):
    """A workdir written when `distributed` was a string ("auto") resumes; the group's fields
    may change on a rerun."""
    workdir = tmp_path / "wd"
    cfg = tiny_training_config()
    prepare_run(cfg, workdir, train_source=synthetic_source(4, 0)).lock.release()
    fields = json.loads((workdir / "train_config.json").read_text())
    assert fields["distributed"]["mode"] == "auto"
    fields["distributed"] = "auto"
    (workdir / "train_config.json").write_text(json.dumps(fields))
    (workdir / "checkpoints" / "6").mkdir(parents=True)
    prepare_run(cfg, workdir, train_source=synthetic_source(4, 0)).lock.release()
    later = tiny_training_config()
    later.distributed.update(mode="off", coordinator_address="h:1", num_processes=2,
                             process_id=1, local_device_ids="0")
    prepare_run(later, workdir, train_source=synthetic_source(4, 0)).lock.release()


# ----------------------------------------------------------------------------- two processes


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Runs:
    """`python -m iet_jax.train` processes of this test, each with its log files, all killed
    by `kill_all` (the test's `finally`)."""

    def __init__(self, tmp: Path, data_dir: Path):
        self.tmp, self.data_dir, self.procs = tmp, data_dir, []

    def start(self, workdir: Path, processes: int, rows: Path | None = None) -> list:
        port = free_port()
        env = {k: v for k, v in os.environ.items() if k not in MULTI_ENV}
        env.update(
            PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p]),
            JAX_PLATFORMS="cpu", JAX_ENABLE_X64="1",
            # 4 devices in all; backend optimisation off: compiles ~2-4x faster
            XLA_FLAGS=(env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count="
                       f"{4 // processes} --xla_backend_optimization_level=0").strip(),
            JAX_COMPILATION_CACHE_DIR=str(self.tmp / "jax_cache"),
            JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
        if rows is not None:
            env["IET_TEST_ROWS"] = str(rows)
        if processes > 1:
            env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                       JAX_NUM_PROCESSES=str(processes))
        started = []
        for i in range(processes):
            if processes > 1:
                env["JAX_PROCESS_ID"] = str(i)
            log = self.tmp / f"{workdir.name}.{len(self.procs)}.p{i}"
            out, err = open(f"{log}.out", "w"), open(f"{log}.err", "w")
            proc = subprocess.Popen(
                [sys.executable, "-m", "iet_jax.train", "--config", str(RECIPE),
                 "--workdir", str(workdir), f"--config.data.data_dir={self.data_dir}"],
                cwd=ROOT, env=dict(env), stdout=out, stderr=err)
            out.close()
            err.close()
            proc.log = log
            self.procs.append(proc)
            started.append(proc)
        return started

    def wait(self, procs, timeout: float = DEADLINE, what: str = "run") -> list[int]:
        deadline = time.monotonic() + timeout
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill_all()
                pytest.fail(f"{what}: still running after {timeout} s\n" + self.logs(procs))
        return [proc.returncode for proc in procs]

    def finish(self, procs, what: str) -> None:
        codes = self.wait(procs, what=what)
        assert codes == [0] * len(procs), f"{what}: exit codes {codes}\n" + self.logs(procs)

    @staticmethod
    def logs(procs) -> str:
        return "\n".join(f"--- {p.log}.err (pid {p.pid}):\n" +
                         Path(f"{p.log}.err").read_text(errors="replace")[-3000:]
                         for p in procs)

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def read_items(workdir: Path, step: int) -> dict:
    """Every item of a checkpoint as NumPy (float64 arrays restored as float64)."""
    with jax.enable_x64(True):
        restored = workdir_lib.read_step(workdir, step)
        items = jax.tree.map(np.asarray, restored.items)
    return {**items, "loader": restored.loader}


def check_rows(rows_file: Path, source, steps: range) -> None:
    """Each process's loader read only the samples of its own rows, and handed the train step
    exactly its rows of the one-process global batch, at every step of `steps`."""
    from iet_jax.datasets.loader import PairedPatchLoader
    from multihost_recipe import get_config, row_digest

    cfg = get_config()
    whole = PairedPatchLoader(source, scale=cfg.data.scale, patch_size=cfg.data.patch_size,
                              global_batch_size=cfg.batch_size, seed=cfg.seed,
                              augment=cfg.data.augment)
    b = cfg.batch_size // 2
    for p in (0, 1):
        records = [json.loads(line)
                   for line in Path(f"{rows_file}.{p}").read_text().splitlines()]
        assert [r["step"] for r in records] == list(steps), (p, records)
        # the samples it read (some for later steps: the loader prefetches) are its own rows
        read = sorted(k for r in records for k in r["read"])
        assert all((k % cfg.batch_size) // b == p for k in read), (p, read)
        assert set(read) >= {t * cfg.batch_size + p * b + i for t in steps for i in range(b)}
        for r in records:
            assert (r["process"], r["count"]) == (p, 2)
            batch = whole.batch(r["step"])
            assert r["rows"] == [row_digest(batch["lr"][i], batch["hr"][i])
                                 for i in range(p * b, (p + 1) * b)], r
    whole.close()


def test_two_processes_on_loopback(tmp_path):
    from iet_jax.datasets import builders, open_source

    data_dir = tmp_path / "data"
    builders.build("demo", 2, data_dir=data_dir, verbose=False)
    source = open_source("demo", "train", 2, data_dir=data_dir)
    runs = Runs(tmp_path, data_dir)
    one, two, killed = tmp_path / "one", tmp_path / "two", tmp_path / "killed"
    try:
        # side by side: the machine's cores are idle while a process waits for the others
        reference = runs.start(one, 1)
        procs = runs.start(two, 2, rows=tmp_path / "rows_two")
        runs.finish(reference, "one process on 4 devices")
        runs.finish(procs, "two processes")
        for i, proc in enumerate(procs):
            said = Path(f"{proc.log}.out").read_text()
            assert (f"process {i} of 2: rows {2 * i}-{2 * i + 1} of each global batch of 4, "
                    f"on 2 of 4 devices") in said, said
        check_rows(tmp_path / "rows_two", source, range(6))

        # process 0 (coordinator, lock holder) killed once checkpoint 2 exists
        p0, p1 = runs.start(killed, 2)
        deadline = time.monotonic() + DEADLINE
        while not (killed / "checkpoints" / "2").is_dir():  # orbax renames it when complete
            assert p0.poll() is None and p1.poll() is None, runs.logs([p0, p1])
            assert time.monotonic() < deadline, "no checkpoint 2\n" + runs.logs([p0, p1])
            time.sleep(0.05)
        p0.send_signal(signal.SIGKILL)
        steps_at_kill = workdir_lib.workdir_steps(killed)
        codes = runs.wait([p0, p1], timeout=60, what="process 1 after process 0 was killed")
        assert codes[0] == -signal.SIGKILL and codes[1] != 0, (codes, runs.logs([p1]))
        assert 6 not in steps_at_kill, steps_at_kill  # it was killed mid-run
        resume_from = max(workdir_lib.workdir_steps(killed))

        procs = runs.start(killed, 2, rows=tmp_path / "rows_resumed")
        runs.finish(procs, "two processes rerun after the kill")
        assert "taking over the stale lock" in Path(f"{procs[0].log}.err").read_text()
        check_rows(tmp_path / "rows_resumed", source, range(resume_from, 6))
    finally:
        runs.kill_all()

    assert workdir_lib.workdir_steps(two) == workdir_lib.workdir_steps(one) == [2, 4, 6]
    for step in (2, 4, 6):
        ref, got = read_items(one, step), read_items(two, step)
        assert got["loader"] == ref["loader"]
        for item in ("params", "ema", "opt_state", "train"):
            assert jax.tree.structure(got[item]) == jax.tree.structure(ref[item])
            for x, y in zip(jax.tree.leaves(got[item]), jax.tree.leaves(ref[item])):
                assert x.dtype == y.dtype, item
                if not np.issubdtype(x.dtype, np.floating):
                    np.testing.assert_array_equal(x, y, err_msg=item)
                    continue
                assert x.dtype == np.float64, item
                rel = np.abs(x - y).max() / (np.abs(y).max() + 1e-300)
                assert rel < 1e-9, (item, step, rel)
    final, resumed = read_items(two, 6), read_items(killed, 6)
    assert resumed["loader"] == final["loader"]
    for item in ("params", "ema", "opt_state", "train"):
        for x, y in zip(jax.tree.leaves(resumed[item]), jax.tree.leaves(final[item])):
            np.testing.assert_array_equal(x, y, err_msg=item)
