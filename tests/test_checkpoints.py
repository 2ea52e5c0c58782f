"""Training workdir checkpoints: checksums that catch damaged arrays, and the newest intact
step as 'latest' for training, evaluation and upscaling alike (#12 items 6 and 10).

One tiny run (checkpoints at steps 2 and 4) is copied and damaged in the ways a crash, a full
disk or a bad disk leave it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from iet_jax.io import model_dir, stored
from iet_jax.io import workdir as workdir_lib
from iet_jax.training.loop import train_and_evaluate
from tiny import synthetic_source, tiny_training_config

pytestmark = pytest.mark.xdist_group("tiny_workdir")


def run_config(steps: int = 4):
    """The trained run's config; `steps` changes only num_steps (a rerun may change it)."""
    cfg = tiny_training_config(steps=4)
    cfg.checkpoint_every = 2
    cfg.num_steps = steps
    return cfg


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Path:
    """A finished 4-step run with checkpoints at steps 2 and 4."""
    workdir = tmp_path_factory.mktemp("trained") / "wd"
    train_and_evaluate(run_config(), workdir, train_source=synthetic_source(6, 0))
    return workdir


def copy_of(trained: Path, tmp_path: Path) -> Path:
    workdir = tmp_path / "wd"
    shutil.copytree(trained, workdir)
    return workdir


def arrays(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


# ----------------------------------------------------------------------------- checksums


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int32", "uint8", "bool"])
def test_digest_sees_every_single_word_change(dtype):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.integers(0, 2, (3, 5)) if dtype == "bool" else rng.random((3, 5)) * 7,
                    dtype=dtype)
    tree = {"a": x, "b": {"c": jnp.arange(4, dtype=jnp.int32)}}
    digest = workdir_lib.item_digest(tree)
    assert workdir_lib.item_digest(jax.tree.map(jnp.copy, tree)) == digest
    words = np.asarray(x).copy()
    flat = words.reshape(-1).view(np.uint8)
    seen = set()
    for i in range(flat.size):  # every byte, its lowest and highest bit
        for bit in (0, 7):
            changed = flat.copy()
            changed[i] ^= 1 << bit
            value = changed.view(words.dtype).reshape(words.shape)
            if dtype == "bool" and changed[i] > 1:
                continue  # not a valid bool
            seen.add(workdir_lib.item_digest({"a": jnp.asarray(value), "b": tree["b"]}))
    assert digest not in seen
    # a swap of two different entries changes it too (positions are weighted)
    swapped = np.asarray(x).copy().reshape(-1)
    j = int(np.flatnonzero(swapped != swapped[0])[0])
    swapped[[0, j]] = swapped[[j, 0]]
    assert workdir_lib.item_digest({"a": jnp.asarray(swapped.reshape(3, 5)),
                                    "b": tree["b"]}) != digest
    # names and shapes count
    assert workdir_lib.item_digest({"a2": x, "b": tree["b"]}) != digest
    assert workdir_lib.item_digest({"a": x.reshape(5, 3), "b": tree["b"]}) != digest


def test_digest_of_float64_and_of_a_namedtuple_as_orbax_stores_it():
    from collections import namedtuple

    with jax.enable_x64(True):
        x = jnp.linspace(0.0, 1.0, 6, dtype=jnp.float64)
        y = x.at[3].set(np.nextafter(np.float64(x[3]), 2.0))  # one ulp
        assert workdir_lib.item_digest({"x": x}) != workdir_lib.item_digest({"x": y})
    State = namedtuple("State", "count mu")
    state = (State(jnp.int32(3), {"w": jnp.ones(2)}),)
    as_stored = [{"count": jnp.int32(3), "mu": {"w": jnp.ones(2)}}]
    assert workdir_lib.item_digest(state) == workdir_lib.item_digest(as_stored)


# ----------------------------------------------------------------------------- damage


def largest_data_file(item_dir: Path) -> Path:
    return max((p for p in item_dir.rglob("*") if p.is_file() and p.parent.name == "d"),
               key=lambda p: p.stat().st_size)


def flip_bytes(workdir: Path) -> str:
    f = largest_data_file(workdir / "checkpoints" / "4" / "params")
    data = bytearray(f.read_bytes())
    data[len(data) // 3] ^= 0x40
    f.write_bytes(bytes(data))
    return "params does not match its checksum"


def truncate(workdir: Path) -> str:
    f = largest_data_file(workdir / "checkpoints" / "4" / "ema")
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return ""


def empty_step(workdir: Path) -> str:
    step = workdir / "checkpoints" / "4"
    shutil.rmtree(step)
    step.mkdir()
    return ""


def no_item_metadata(workdir: Path) -> str:
    (workdir / "checkpoints" / "4" / "opt_state" / "_METADATA").unlink()
    return ""


def meta_without_checksums(workdir: Path) -> str:
    meta = workdir / "checkpoints" / "4" / "meta" / "metadata"
    fields = json.loads(meta.read_text())
    del fields["checksums"]["opt_state"]
    meta.write_text(json.dumps(fields))
    return "its meta has no checksum of opt_state"


def meta_not_json(workdir: Path) -> str:
    (workdir / "checkpoints" / "4" / "meta" / "metadata").write_text('{"step": 4, "che')
    return ""


DAMAGE = {f.__name__: f for f in (flip_bytes, truncate, empty_step, no_item_metadata,
                                  meta_without_checksums, meta_not_json)}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_readers_fall_back_to_the_newest_intact_step(trained, tmp_path, damage):
    workdir = copy_of(trained, tmp_path)
    says = DAMAGE[damage](workdir)
    messages = []
    step = workdir_lib.read_step(workdir, report=messages.append)
    assert step.step == 2, damage
    assert len(messages) == 1 and f"checkpoint 4 in {workdir / 'checkpoints'} is damaged" in \
        messages[0] and "using step 2" in messages[0] and says in messages[0], messages
    # load_model (evaluate, upscale, init_from) takes the same step: its EMA weights
    model = model_dir.load_model(workdir)
    loaded = stored.with_str_keys(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    for a, b in zip(arrays(loaded), arrays(step.items["ema"])):
        np.testing.assert_array_equal(a, b)
    # a step asked for by number is not replaced: its damage is the error
    with pytest.raises(stored.CheckpointError, match="checkpoint 4 in .* is damaged"):
        workdir_lib.read_step(workdir, 4)


def test_a_step_without_orbax_step_metadata_is_intact(trained, tmp_path):
    """Its items restore and match their checksums: it is used, and training goes on."""
    workdir = copy_of(trained, tmp_path)
    (workdir / "checkpoints" / "4" / "_CHECKPOINT_METADATA").unlink()
    messages = []
    assert workdir_lib.read_step(workdir, report=messages.append).step == 4 and not messages
    summary = train_and_evaluate(run_config(steps=6), workdir,
                                 train_source=synthetic_source(6, 0))
    assert summary["start_step"] == 4 and workdir_lib.workdir_steps(workdir) == [2, 4, 6]


def test_every_step_damaged_is_one_error_naming_each(trained, tmp_path):
    workdir = copy_of(trained, tmp_path)
    for step in ("2", "4"):
        (workdir / "checkpoints" / step / "meta" / "metadata").write_text("[")
    with pytest.raises(stored.CheckpointError,
                       match=r"no intact checkpoint in .*every step is damaged \(4: .*; 2: "):
        workdir_lib.read_step(workdir)
    with pytest.raises(stored.CheckpointError, match="no intact checkpoint"):
        model_dir.load_model(workdir)


def test_best_skips_a_damaged_best(tmp_path):
    workdir = tmp_path / "wd"
    cfg = run_config()
    cfg.eval_every, cfg.data.val_crop = 2, 12
    train_and_evaluate(cfg, workdir, train_source=synthetic_source(6, 0),
                       val_source=synthetic_source(2, 1))
    metas = {s: workdir_lib.read_step(workdir, s).meta for s in (2, 4)}
    best, other = sorted((2, 4), key=lambda s: -metas[s]["val_psnr"])
    assert workdir_lib.read_step(workdir, "best").step == best
    shutil.rmtree(workdir / "checkpoints" / str(best) / "train")
    messages = []
    assert workdir_lib.read_step(workdir, "best", report=messages.append).step == other
    assert len(messages) == 1 and f"checkpoint {best} " in messages[0]


def test_training_resumes_from_the_newest_intact_step(trained, tmp_path, capsys):
    """A flipped byte in step 4: the run moves step 4 aside, resumes at 2 and computes the
    same step 4 again, bit for bit."""
    workdir = copy_of(trained, tmp_path)
    flip_bytes(workdir)
    summary = train_and_evaluate(run_config(), workdir, train_source=synthetic_source(6, 0))
    out = capsys.readouterr().out
    assert summary["start_step"] == 2 and summary["step"] == 4
    assert "checkpoint 4" in out and "params does not match its checksum" in out
    assert f"moved to {workdir / 'damaged_checkpoints'}" in out
    assert (workdir / "damaged_checkpoints" / "4" / "params").is_dir()  # kept, not deleted
    again, before = workdir_lib.read_step(workdir, 4), workdir_lib.read_step(trained, 4)
    for name in workdir_lib.ARRAY_ITEMS:
        for a, b in zip(arrays(again.items[name]), arrays(before.items[name])):
            np.testing.assert_array_equal(a, b)


def test_a_checkpoint_of_the_first_format_still_resumes(trained, tmp_path):
    """Workdirs written before checksums stored optax's state as a flat list of leaves and no
    checksums: their steps restore (unverified) and resume exactly."""
    step2 = workdir_lib.read_step(trained, 2)
    old = tmp_path / "old"
    (old / "checkpoints").mkdir(parents=True)
    for name in (stored.CONFIG_FILE, workdir_lib.TRAIN_CONFIG_FILE):
        shutil.copy(trained / name, old / name)
    items = dict(step2.items)
    items["opt_state"] = {f"{i:05d}": leaf
                          for i, leaf in enumerate(jax.tree.leaves(items["opt_state"]))}
    args = {k: ocp.args.StandardSave(v) for k, v in items.items()}
    args["loader"] = ocp.args.JsonSave(step2.loader)
    args["meta"] = ocp.args.JsonSave({"step": 2, "best_psnr": None})
    with ocp.CheckpointManager(old / "checkpoints", item_names=tuple(args)) as manager:
        manager.save(2, args=ocp.args.Composite(**args))
    summary = train_and_evaluate(run_config(), old, train_source=synthetic_source(6, 0))
    assert summary["start_step"] == 2
    again, before = workdir_lib.read_step(old, 4), workdir_lib.read_step(trained, 4)
    for name in workdir_lib.ARRAY_ITEMS:
        for a, b in zip(arrays(again.items[name]), arrays(before.items[name])):
            np.testing.assert_array_equal(a, b)
    assert json.dumps(again.meta["checksums"]) == json.dumps(before.meta["checksums"])


def test_a_save_the_disk_cannot_hold_is_refused_before_writing(trained, tmp_path, monkeypatch):
    """A full disk stops the run with one line naming the step, the folder and the space;
    nothing half-written is left, the earlier steps stay intact and the run resumes."""
    import collections

    workdir = copy_of(trained, tmp_path)
    real = shutil.disk_usage
    Usage = collections.namedtuple("Usage", "total used free")
    monkeypatch.setattr(workdir_lib.shutil, "disk_usage",
                        lambda path: Usage(real(path).total, real(path).used, 2**20))
    with pytest.raises(workdir_lib.CheckpointWriteError,
                       match=r"cannot write checkpoint 6 in .*checkpoints: it needs about "
                             r"[\d.]+ MiB and the disk has 1.0 MiB free.*rerun to resume"):
        train_and_evaluate(run_config(steps=6), workdir, train_source=synthetic_source(6, 0))
    assert workdir_lib.workdir_steps(workdir) == [2, 4]
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4"]
    monkeypatch.setattr(workdir_lib.shutil, "disk_usage", real)
    summary = train_and_evaluate(run_config(steps=6), workdir,
                                 train_source=synthetic_source(6, 0))
    assert summary["start_step"] == 4 and workdir_lib.workdir_steps(workdir) == [2, 4, 6]
