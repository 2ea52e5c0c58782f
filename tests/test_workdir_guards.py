"""The training workdir's guards (issue #12): a rerun with a config that does not fit the
workdir is refused before anything is written, `metrics.jsonl` survives a partial last line,
one trainer per workdir (the lock), a full disk leaves nothing half-written, and the training
command's mistakes are one line each, with a non-zero exit status.

Nothing here compiles a train step: the runs stop before it, or call `prepare_run` only.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from iet_jax import train
from iet_jax.datasets import loader as loader_lib
from iet_jax.io import files, stored
from iet_jax.io.lock import LOCK_FILE, WorkdirBusyError, WorkdirLock
from iet_jax.training.config import ConfigError, model_config_for_training
from iet_jax.training.loop import open_loader, prepare_run, train_and_evaluate
from iet_jax.training.metrics_log import Logger
from tiny import synthetic_source, tiny_training_config

ROOT = Path(__file__).parent.parent
DEMO = str(ROOT / "configs" / "demo.py")


def snapshot(workdir: Path) -> dict:
    """Every file under `workdir` with its bytes."""
    return {str(p.relative_to(workdir)): p.read_bytes() for p in sorted(workdir.rglob("*"))
            if p.is_file()}


def prepared(cfg, workdir, **kw):
    """prepare_run, its lock left at once (it writes the workdir's config files)."""
    run = prepare_run(cfg, workdir, train_source=kw.pop("source", synthetic_source(4, 0)), **kw)
    run.lock.release()
    return run


def cli(capsys, *args):
    """(exit status, stderr lines) of `python -m iet_jax.train ARGS`."""
    rc = train.main(["train", *map(str, args)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return rc, err


def one_line(err: list[str], *words: str) -> str:
    assert len(err) == 1, err
    for word in words:
        assert word in err[0], (word, err[0])
    return err[0]


def demo_config():
    """configs/demo.py's config."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("demo_recipe", DEMO)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    return demo.get_config()


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    """The demo dataset built at x2 (seconds), for the command-line runs."""
    from iet_jax.datasets import builders

    data_dir = tmp_path_factory.mktemp("data")
    builders.build("demo", 2, data_dir=data_dir, verbose=False)
    return data_dir


# ----------------------------------------------------------------------------- item 3


def test_rerun_with_another_config_is_refused_before_writing(tmp_path):
    workdir = tmp_path / "wd"
    cfg = tiny_training_config()
    prepared(cfg, workdir)
    (workdir / "checkpoints" / "6").mkdir(parents=True)  # the workdir now holds a checkpoint
    prepared(cfg, workdir)  # the same config fits the files it wrote

    # what a rerun may change: it resumes, and the training config says the new values
    later = tiny_training_config()
    later.num_steps, later.eval_every, later.log_every = 20, 5, 2
    later.checkpoint_every, later.keep_checkpoints, later.nonfinite = 4, 2, "skip"
    later.model.remat, later.optim.grad_accum_steps, later.data.small_images = True, 2, "skip"
    prepared(later, workdir)
    assert json.loads((workdir / "train_config.json").read_text())["num_steps"] == 20

    before = snapshot(workdir)
    other = tiny_training_config(batch=2)
    other.model.embed_dim = 16
    other.optim.learning_rate = 1e-3
    with pytest.raises(ConfigError) as e:
        prepared(other, workdir)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"workdir {workdir} was trained with another config: "
                              f"model.embed_dim 12 -> 16, batch_size 4 -> 2, "
                              f"optim.learning_rate 0.002 -> 0.001; use a new --workdir")
    assert str(workdir / "train_config.json") in message
    assert snapshot(workdir) == before  # nothing rewritten, no lock left


def test_rerun_with_another_config_on_the_command_line(tmp_path, capsys):
    """Refused before the data is opened (the demo dataset is not even built here)."""
    workdir = tmp_path / "wd"
    (workdir / "checkpoints" / "250").mkdir(parents=True)
    cfg = demo_config()
    (workdir / "config.json").write_text(stored.config_to_json(model_config_for_training(cfg)))
    (workdir / "train_config.json").write_text(cfg.to_json_best_effort(indent=2))
    before = snapshot(workdir)
    rc, err = cli(capsys, f"--config={DEMO}", f"--workdir={workdir}", "--config.batch_size=8",
                  "--config.model.embed_dim=48", "--config.model.nattn_dim=48",
                  f"--config.data.data_dir={tmp_path / 'no_data'}")
    assert rc == 2
    one_line(err, "another config", "model.embed_dim 24 -> 48", "model.nattn_dim 24 -> 48",
             "batch_size 4 -> 8", "new --workdir", "train_config.json")
    assert snapshot(workdir) == before


def test_malformed_workdir_config_is_named(tmp_path, capsys):
    workdir = tmp_path / "wd"
    (workdir / "checkpoints" / "250").mkdir(parents=True)
    (workdir / "config.json").write_text('{"embed_dim": 24,')
    rc, err = cli(capsys, f"--config={DEMO}", f"--workdir={workdir}")
    assert rc == 2
    one_line(err, f"{workdir / 'config.json'} is not valid JSON", "restore it")
    (workdir / "config.json").write_text("")  # what a full disk left before (0 bytes)
    rc, err = cli(capsys, f"--config={DEMO}", f"--workdir={workdir}")
    assert rc == 2
    one_line(err, f"{workdir / 'config.json'} is empty")


# ----------------------------------------------------------------------------- item 11


def test_partial_metrics_line_is_dropped_on_resume(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    records = [{"step": s, "train/loss": 1.0 / s} for s in (1, 2, 3, 4)]
    text = "".join(json.dumps(r) + "\n" for r in records)
    path.write_text(text + '{"step": 5, "train/lo')  # killed mid-append
    logger = Logger(tmp_path, 3, 10, True)
    kept = [json.loads(line) for line in path.read_text().splitlines()]
    assert kept == records[:3]
    err = capsys.readouterr().err
    assert err.count("metrics.jsonl: dropped a partial last line") == 1
    logger.scalars(4, {"loss": 0.25})
    logger.close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]

    # damage in the middle (not UTF-8, not JSON, not a record) is dropped too
    path.write_bytes(text.encode() + b"\xff\xfe garbage\n[1, 2]\n" + text.encode())
    Logger(tmp_path, 2, 10, True).close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 1, 2]
    assert "lines 5, 6 (not JSON records)" in capsys.readouterr().err


# ----------------------------------------------------------------------------- item 12


def test_second_trainer_is_refused_and_stale_locks_are_taken_over(tmp_path, capsys, demo_data):
    workdir = tmp_path / "wd"
    workdir.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom iet_jax.io.lock import WorkdirLock\n"
         "lock = WorkdirLock(sys.argv[1])\nlock.acquire()\nprint('held', flush=True)\ntime.sleep(120)",
         str(workdir)], stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "held"
        lock_file = workdir / LOCK_FILE
        info = json.loads(lock_file.read_text())
        assert (info["host"], info["pid"]) == (socket.gethostname(), holder.pid)
        with pytest.raises(WorkdirBusyError) as e:
            WorkdirLock(workdir).acquire()
        message = str(e.value)
        assert "\n" not in message
        for word in (f"host {socket.gethostname()}", f"pid {holder.pid}", str(lock_file),
                     "in use by another trainer"):
            assert word in message
        # a second trainer writes nothing (here a fresh workdir: its config files)
        with pytest.raises(WorkdirBusyError):
            prepare_run(tiny_training_config(), workdir, train_source=synthetic_source(4, 0))
        assert sorted(p.name for p in workdir.iterdir()) == [LOCK_FILE]
        rc, err = cli(capsys, f"--config={DEMO}", f"--workdir={workdir}",
                      f"--config.data.data_dir={demo_data}")
        assert rc == 2
        one_line(err, "in use by another trainer", f"pid {holder.pid}", str(lock_file))
        assert sorted(p.name for p in workdir.iterdir()) == [LOCK_FILE]
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: its lock is stale, taken over with a message
    lock = WorkdirLock(workdir)
    message = lock.acquire()
    assert message is not None and "stale" in message and f"pid {holder.pid}" in message
    assert json.loads((workdir / LOCK_FILE).read_text())["pid"] == os.getpid()
    with pytest.raises(WorkdirBusyError):  # another lock in this same process
        WorkdirLock(workdir).acquire()
    lock.release()
    assert not (workdir / LOCK_FILE).exists()


def test_lock_holders_judged(tmp_path):
    lock_file = tmp_path / LOCK_FILE

    def plant(**info):
        lock_file.write_text(json.dumps({"started": "2024-01-01T00:00:00", **info}))

    plant(host="another-host.example", pid=os.getpid())  # never taken over from here
    with pytest.raises(WorkdirBusyError, match="another-host.example"):
        WorkdirLock(tmp_path).acquire()
    plant(host=socket.gethostname(), pid=os.getpid())  # this process, holding no lock
    with WorkdirLock(tmp_path) as lock:
        assert lock.held and json.loads(lock_file.read_text())["started"] != "2024-01-01T00:00:00"
    assert not lock_file.exists()
    lock_file.write_text("")  # a holder that died between creating and writing it
    old = time.time() - 60
    os.utime(lock_file, (old, old))
    assert "names no holder" in WorkdirLock(tmp_path).acquire()


def test_lock_is_released_when_the_run_fails(tmp_path):
    def broken_loader(*args, **kwargs):
        raise RuntimeError("no input")

    with pytest.raises(RuntimeError, match="no input"):
        train_and_evaluate(tiny_training_config(), tmp_path / "wd", train_source=synthetic_source(4, 0),
                           make_loader=broken_loader)
    assert not (tmp_path / "wd" / LOCK_FILE).exists()
    assert (tmp_path / "wd" / "config.json").is_file()


# ----------------------------------------------------------------------------- item 13


def full_disk(monkeypatch, after: int = 10):
    """Writes through iet_jax.io.files put `after` bytes on disk, then fail with ENOSPC."""
    def write(fd, data):
        os.write(fd, bytes(data[:after]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(files, "_write_all", write)


def test_full_disk_leaves_no_half_written_file(tmp_path, monkeypatch):
    workdir = tmp_path / "wd"
    full_disk(monkeypatch)
    with pytest.raises(files.WriteError) as e:
        prepared(tiny_training_config(), workdir)
    assert str(e.value) == (f"cannot write {workdir / 'config.json'}: No space left on "
                            f"device; free space on that disk or use another --workdir")
    assert e.value.errno == errno.ENOSPC and isinstance(e.value, OSError)
    assert os.listdir(workdir) == []  # no 0-byte config.json, no temporary file, no lock

    monkeypatch.undo()
    prepared(tiny_training_config(), workdir)
    before = snapshot(workdir)
    full_disk(monkeypatch)
    with pytest.raises(files.WriteError):
        prepared(tiny_training_config(steps=9), workdir)
    assert snapshot(workdir) == before  # the old files, whole

    # an append to metrics.jsonl that fails is cut back
    metrics = workdir / "metrics.jsonl"
    metrics.write_text('{"step": 1}\n')
    with pytest.raises(files.WriteError, match="cannot write .*metrics.jsonl: No space left"):
        files.append_line(metrics, json.dumps({"step": 2, "train/loss": 0.5}))
    assert metrics.read_text() == '{"step": 1}\n'


def test_full_disk_on_the_command_line(tmp_path, capsys, monkeypatch, demo_data):
    full_disk(monkeypatch)
    rc, err = cli(capsys, f"--config={DEMO}", f"--workdir={tmp_path / 'wd'}",
                  f"--config.data.data_dir={demo_data}")
    assert rc == 1
    one_line(err, f"cannot write {tmp_path / 'wd' / 'config.json'}: No space left on device")
    assert os.listdir(tmp_path / "wd") == []


# ----------------------------------------------------------------------------- item 18


def test_command_line_mistakes_are_one_line(tmp_path, capsys):
    wd = f"--workdir={tmp_path / 'wd'}"
    rc, err = cli(capsys, f"--config={DEMO}", wd, "--config.batchsize=4")
    assert rc == 2
    one_line(err, "--config.batchsize", "no field 'batchsize'", "--config.batch_size")
    rc, err = cli(capsys, f"--config={DEMO}", wd, "--config.optim.lr=1e-3")
    assert rc == 2
    one_line(err, "no field 'optim.lr'", "--config.optim.learning_rate")
    rc, err = cli(capsys, f"--config={tmp_path / 'nope.py'}", wd)
    assert rc == 2
    one_line(err, f"config file {tmp_path / 'nope.py'} does not exist", "configs/demo.py")
    (tmp_path / "file").write_text("x")
    rc, err = cli(capsys, f"--config={DEMO}", f"--workdir={tmp_path / 'file'}")
    assert rc == 2
    one_line(err, f"workdir {tmp_path / 'file'} is a file, not a directory")
    rc, err = cli(capsys, f"--config={DEMO}", wd, "--config.data.small_images=sometimes")
    assert rc == 2
    one_line(err, "data.small_images must be 'error' or 'skip'")
    # a multi-line refusal (the build command on its own line) is printed on one line
    rc, err = cli(capsys, f"--config={DEMO}", wd, f"--config.data.data_dir={tmp_path / 'no'}")
    assert rc == 2
    one_line(err, "is not built; build it with: python -m iet_jax.datasets.build")
    # --verbose: the traceback, then the same line
    rc = train.main(["train", f"--config={DEMO}", wd, "--config.batchsize=4", "--verbose"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" in err
    assert err.strip().splitlines()[-1].startswith("error: --config.batchsize")
    assert not (tmp_path / "wd").exists()


def test_init_from_without_a_complete_checkpoint(tmp_path, capsys):
    source = tmp_path / "stage1"
    (source / "checkpoints" / "1000.orbax-checkpoint-tmp-5").mkdir(parents=True)  # unfinished
    model = stored.config_to_json(model_config_for_training(demo_config()))
    (source / "config.json").write_text(model)  # the same architecture, but no weights
    wd = f"--workdir={tmp_path / 'wd'}"
    rc, err = cli(capsys, f"--config={DEMO}", wd, f"--config.init_from={source}")
    assert rc == 2
    one_line(err, f"init_from: the training workdir {source} has no complete checkpoint",
             "init_from ('' trains from scratch)")
    (source / "checkpoints" / "1000.orbax-checkpoint-tmp-5").rmdir()
    (source / "checkpoints").rmdir()
    (source / "train_config.json").write_text("{}")
    rc, err = cli(capsys, f"--config={DEMO}", wd, f"--config.init_from={source}")
    assert rc == 2
    one_line(err, f"{source} has no checkpoint yet")
    (source / "config.json").write_text("[1, 2")
    rc, err = cli(capsys, f"--config={DEMO}", wd, f"--config.init_from={source}")
    assert rc == 2
    one_line(err, f"init_from: {source / 'config.json'} is not valid JSON")


def test_small_images_on_the_command_line(tmp_path, capsys, demo_data):
    rc, err = cli(capsys, f"--config={DEMO}", f"--workdir={tmp_path / 'wd'}",
                  f"--config.data.data_dir={demo_data}", "--config.data.patch_size=240",
                  "--config.model.img_size=240")
    assert rc == 2
    one_line(err, "1 of 9 training images are smaller than the patch (LR 240x240, HR 480x480)",
             "rocket (LR 213x320, HR 426x640)", "data.patch_size",
             "--config.data.small_images=skip")
    assert not (tmp_path / "wd").exists()


def with_small_images() -> list[dict]:
    """Three 12x12 LR images, then two 6x6 ones (small0, small1)."""
    small = [{**x, "name": f"small{i}"} for i, x in enumerate(synthetic_source(2, 1, size=12))]
    return synthetic_source(3, 0, size=24) + small


class Source(list):
    """A list of images that records their LR sizes, as built datasets do."""

    def lr_sizes(self):
        return [tuple(x["lr"].shape[:2]) for x in self]

    def names(self):
        return [x["name"] for x in self]


def test_small_images_skip(tmp_path, capsys):
    images = Source(with_small_images())
    cfg = tiny_training_config()  # LR patch 8: the 6x6 LR images are too small
    with pytest.raises(ConfigError, match=r"2 of 5 training images .*: small0 \(LR 6x6, HR "
                                          r"12x12\), small1 \(LR 6x6, HR 12x12\); .*allows 6"):
        prepared(cfg, tmp_path / "wd", source=images)
    cfg.data.small_images = "skip"
    run = prepared(cfg, tmp_path / "wd", source=images)
    loader = open_loader(cfg, run.train_source)
    assert loader.num_examples == 3 and loader.num_skipped == 2
    assert capsys.readouterr().out.strip() == ("data.small_images=skip: left out 2 of 5 "
                                               "training images smaller than the LR patch 8x8")
    assert next(loader)["lr"].shape == (4, 8, 8, 3)
    loader.close()


def test_small_images_skip_without_recorded_sizes():
    """A source that records no sizes: each small image is found when read and replaced by
    the next large enough one, the same way on every run."""
    images = with_small_images()

    def batches(**kw):
        loader = loader_lib.PairedPatchLoader(images, scale=2, patch_size=8, global_batch_size=5,
                                              seed=0, num_threads=1, **kw)
        out = [next(loader)["lr"] for _ in range(3)]
        return out, loader

    with pytest.raises(loader_lib.SmallImageError, match=r"image small[01]: LR 6x6 \(HR 12x12\)"):
        batches()
    first, loader = batches(small_images="skip")
    assert sorted(loader.skipped_names) == ["small0", "small1"] and loader.num_skipped == 2
    again, _ = batches(small_images="skip")
    for a, b in zip(first, again):
        assert (a == b).all()
    # Read by worker processes: the same batches, and the images they found are counted here.
    in_workers, loader = batches(small_images="skip", num_workers=2)
    loader.close()
    for a, b in zip(first, in_workers):
        assert (a == b).all()
    assert sorted(loader.skipped_names) == ["small0", "small1"] and loader.num_skipped == 2
