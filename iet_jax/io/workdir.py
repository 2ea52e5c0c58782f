"""The training workdir on disk, its one owner: checkpoints written, listed, verified and read.

A workdir written by `python -m iet_jax.train`:

    WORKDIR/config.json           the model config (same format as a model directory's)
    WORKDIR/train_config.json     the full training config
    WORKDIR/checkpoints/<step>/   params, ema, opt_state, train (step, rng, skipped),
                                  loader (input position, JSON), meta (JSON: val PSNR,
                                  checksums, ...)
    WORKDIR/damaged_checkpoints/  damaged steps a resumed run moved out of its way
    WORKDIR/metrics.jsonl         one JSON record per log / validation event
    WORKDIR/tensorboard/          TensorBoard events (when tensorboardX is installed)

Everything goes through orbax's `CheckpointManager` (a read-only one for reading), never
through its files. Saves are asynchronous and atomic: a step directory appears under its final
name only once complete, so a run killed at any moment (even during a save) restarts from the
last complete checkpoint. The latest `keep` checkpoints are kept, plus the best by validation
PSNR.

Each save stores a checksum of every array item in its `meta` (`item_digest`: a
position-weighted sum of each array's bits, computed on the devices, so it works for arrays
sharded over a mesh). A step is *intact* when every item restores and matches its checksum.
Training, evaluation and upscaling all take the newest intact step as "latest" and say which
newer steps they skipped and why; a resumed run moves those out of `checkpoints/` (into
`damaged_checkpoints/`, nothing is deleted) so that it can save those steps again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from iet_jax.conventions.text import shown
from iet_jax.io.stored import (CONFIG_FILE, CheckpointError, CheckpointMissingError, check_tree,
                               empty_model, filled_model, with_int_keys)
from iet_jax.model.network import IET

WORKDIR_CHECKPOINTS = "checkpoints"  # orbax CheckpointManager directory inside a workdir
DAMAGED_CHECKPOINTS = "damaged_checkpoints"  # where a resumed run moves damaged steps
WORKDIR_WEIGHTS = "ema"  # the checkpoint item evaluated (EMA of the parameters)
TRAIN_CONFIG_FILE = "train_config.json"
METRICS_FILE = "metrics.jsonl"
ARRAY_ITEMS = ("params", "ema", "opt_state", "train")
JSON_ITEMS = ("loader", "meta")
# meta["format"]: 2 stores opt_state as optax's tree and the items' checksums. Format 1 (no
# "format" key; iet-jax before checksums) stored opt_state as its list of leaves, keyed
# "00000", "00001", ...: still restored, without verification.
FORMAT = 2
# What a save writes beside the arrays themselves (orbax's metadata and the JSON items), with
# room to spare: a save is refused unless the disk has the arrays' bytes and this free.
SAVE_OVERHEAD_BYTES = 4 * 2**20


class DamagedCheckpointError(CheckpointError):
    """A step that is listed but cannot be restored or does not match its checksums."""

    def __init__(self, step: int, directory: Path, reason: str):
        self.step, self.reason = step, reason
        super().__init__(f"checkpoint {step} in {directory} is damaged ({reason})")


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, a lost mount); the steps before it are
    intact."""


@dataclasses.dataclass
class Restored:
    step: int
    items: dict[str, Any]  # one tree per name of ARRAY_ITEMS
    loader: dict  # the input pipeline's position
    meta: dict


def report_to_stderr(message: str) -> None:
    print(shown(message, keep_newlines=True), file=sys.stderr)


# ----------------------------------------------------------------------------- checksums


def _words(x: jax.Array) -> jax.Array:
    """The bits of `x` as uint32 words (8-byte types: two words per element)."""
    size = jnp.dtype(x.dtype).itemsize
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    if size == 8:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)  # a trailing axis of 2
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[size]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _checksum(x: jax.Array) -> jax.Array:
    """sum(word_i * (2i + 1)) mod 2**32 over the words in row-major order. An odd weight per
    position: a change of one word always changes the sum, and so does almost any other
    change. Integer sums do not depend on the order of the reduction (nor on the sharding)."""
    words = _words(x)
    index = jnp.zeros(words.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(words.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis) * np.uint32(
            stride % 2**32)
        stride *= words.shape[axis]
    return jnp.sum(words * (index * np.uint32(2) + np.uint32(1)), dtype=jnp.uint32)


@jax.jit
def _checksums(leaves: list) -> jax.Array:
    return jnp.stack([_checksum(x) for x in leaves]) if leaves else jnp.zeros(0, jnp.uint32)


def _path_name(path) -> str:
    """'opt_state/1/0/mu/blocks/0/...': the same name for a namedtuple field and for the dict
    key orbax stores it under."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                    for k in path)


def item_digest(tree) -> str:
    """A digest of the arrays of `tree` (names, dtypes, shapes and checksums of their bits).
    The same for a tree and its restored copy, wherever their arrays live."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    sums = np.asarray(jax.device_get(_checksums([leaf for _, leaf in flat])))
    lines = sorted(f"{_path_name(path)} {jnp.dtype(leaf.dtype).name} {tuple(leaf.shape)} "
                   f"{int(s):08x}" for (path, leaf), s in zip(flat, sums))
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:32]


# ----------------------------------------------------------------------------- the manager


def _item_handlers() -> dict:
    handlers = {name: ocp.StandardCheckpointHandler() for name in ARRAY_ITEMS}
    handlers.update({name: ocp.JsonCheckpointHandler() for name in JSON_ITEMS})
    return handlers


@contextlib.contextmanager
def _quiet_orbax():
    """Orbax logs a warning for every read-only manager it opens and every step it cannot
    read; iet-jax says what matters itself."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    if not text:
        return type(error).__name__
    line = text[0].split(" See full TensorStore details")[0]  # then a multi-line spec
    return f"{type(error).__name__}: {line[:300]}"


_echoes_silenced = False


def _silence_orbax_failure_echoes() -> None:
    """After a failed restore, orbax leaves reads behind that fail again later, when Python
    collects them or their event loop is gone, each printing a traceback with a full
    TensorStore spec (a thousand lines for a small model) at any later moment, up to the
    interpreter's exit. The damage has been reported in one line already: from the first
    damaged step on, this process's `sys.unraisablehook` drops those two kinds (orbax's
    coroutines, and "Event loop is closed"); everything else reaches the previous hook."""
    global _echoes_silenced
    if _echoes_silenced:
        return
    previous = sys.unraisablehook

    def hook(unraisable):
        code = getattr(unraisable.object, "cr_code", None)
        orbax_read = code is not None and "orbax" in code.co_filename
        closed_loop = (unraisable.object is None
                       and isinstance(unraisable.exc_value, RuntimeError)
                       and str(unraisable.exc_value) == "Event loop is closed")
        if not (orbax_read or closed_loop):
            previous(unraisable)

    sys.unraisablehook = hook
    _echoes_silenced = True


def _single_device_target(metadata_tree):
    """ShapeDtypeStructs on this process's first device for a stored item's metadata."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype,
                                                       sharding=device), metadata_tree)


class Checkpoints:
    """The checkpoints of a training workdir (`WORKDIR/checkpoints`).

    Training opens it for writing (`save`, `restore_latest`); evaluation and upscaling open it
    with `read_only=True` (`restore`, `newest_intact`, `best_intact`), which never writes.
    `report` receives one line for each damaged step skipped (default: stderr).
    """

    def __init__(self, workdir: str | Path, *, keep: int = 3, async_save: bool = True,
                 keep_best: bool = True, read_only: bool = False,
                 report: Callable[[str], None] = report_to_stderr):
        self.workdir = Path(workdir).absolute()
        self.directory = self.workdir / WORKDIR_CHECKPOINTS
        self.read_only, self.report = read_only, report
        if read_only:
            with _quiet_orbax():
                self.manager = ocp.CheckpointManager(
                    self.directory, options=ocp.CheckpointManagerOptions(read_only=True),
                    item_handlers=_item_handlers())
            return
        policies = [ocp.checkpoint_managers.LatestN(max(1, keep))]
        if keep_best:
            policies.append(ocp.checkpoint_managers.BestN(
                get_metric_fn=lambda m: m["psnr"], n=1, keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_handlers=_item_handlers())

    # -- listing

    def steps(self) -> list[int]:
        """Every complete step (unfinished saves are not listed), intact or not."""
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest complete step (not verified: see `newest_intact`)."""
        steps = self.steps()
        return steps[-1] if steps else None

    # -- writing

    def save(self, items: dict[str, Any], loader_state: dict, meta: dict,
             metrics: dict | None = None) -> None:
        """Save the array `items` (one per name of ARRAY_ITEMS) with the loader state and
        meta, which gains the format and the items' checksums."""
        step = int(meta["step"])
        self._check_space(step, items)
        meta = {**meta, "format": FORMAT,
                "checksums": {k: item_digest(v) for k, v in items.items()}}
        args = {k: ocp.args.StandardSave(v) for k, v in items.items()}
        args["loader"] = ocp.args.JsonSave(loader_state)
        args["meta"] = ocp.args.JsonSave(meta)
        try:
            self.manager.save(step, args=ocp.args.Composite(**args), metrics=metrics,
                              force=True)
        except Exception as e:  # noqa: BLE001 - orbax and tensorstore raise many kinds
            raise self._write_error(step, e) from e

    def _check_space(self, step: int, items: dict[str, Any]) -> None:
        """Refuse a save the disk cannot hold, before orbax starts writing it: a write that
        fails in orbax's background threads cannot be reported in one line."""
        needed = sum(x.nbytes for x in jax.tree.leaves(items)) + SAVE_OVERHEAD_BYTES
        try:
            free = shutil.disk_usage(self.directory).free
        except OSError:
            return  # nothing to measure against: let the save say what goes wrong
        if free < needed:
            raise CheckpointWriteError(
                f"cannot write checkpoint {step} in {self.directory}: it needs about "
                f"{needed / 2**20:.1f} MiB and the disk has {free / 2**20:.1f} MiB free; the "
                f"checkpoints before it are intact: free disk space, then rerun to resume")

    def _write_error(self, step: int | None, error: BaseException) -> CheckpointWriteError:
        what = "a checkpoint" if step is None else f"checkpoint {step}"
        return CheckpointWriteError(
            f"cannot write {what} in {self.directory} ({_first_line(error)}); the checkpoints "
            f"before it are intact: free disk space (or fix the mount), then rerun to resume")

    def close(self) -> None:
        """Wait for the last save and release the manager; a failed save raises
        `CheckpointWriteError`."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise self._write_error(None, e) from e
        finally:
            self.manager.close()

    # -- reading

    def restore(self, step: int, like: dict[str, Any] | None = None) -> Restored:
        """Step `step`, its array items restored into the shapes, dtypes and shardings of
        `like` (items of arrays or abstract arrays), or as stored onto this process's first
        device when `like` is None; each checked against its checksum.
        `DamagedCheckpointError` when it cannot be restored or does not match."""
        try:
            meta = self._read_meta(step)
            targets = self._targets(step, meta, like)
            args = {k: ocp.args.StandardRestore(v) for k, v in targets.items()}
            args["loader"] = ocp.args.JsonRestore()
            with _quiet_orbax():
                out = self.manager.restore(step, args=ocp.args.Composite(**args))
        except MemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - orbax and tensorstore raise many kinds
            _silence_orbax_failure_echoes()
            raise DamagedCheckpointError(step, self.directory, _first_line(e)) from e
        items = {k: out[k] for k in ARRAY_ITEMS}
        if meta.get("format", 1) == 1 and like is not None:  # opt_state as its leaves
            leaves = [items["opt_state"][k] for k in sorted(items["opt_state"])]
            items["opt_state"] = jax.tree.unflatten(jax.tree.structure(like["opt_state"]),
                                                    leaves)
        if meta.get("format", 1) >= 2:  # every array item has its checksum
            checksums = meta.get("checksums")
            for name in ARRAY_ITEMS:
                digest = checksums.get(name) if isinstance(checksums, dict) else None
                if digest is None:
                    raise DamagedCheckpointError(step, self.directory,
                                                 f"its meta has no checksum of {name}")
                if item_digest(items[name]) != digest:
                    raise DamagedCheckpointError(step, self.directory,
                                                 f"{name} does not match its checksum")
        return Restored(step=step, items=items, loader=out["loader"], meta=meta)

    def _read_meta(self, step: int) -> dict:
        """The JSON `meta` item of `step` (small: read before its arrays)."""
        with _quiet_orbax():
            meta = self.manager.restore(step, args=ocp.args.Composite(
                meta=ocp.args.JsonRestore()))["meta"]
        if not isinstance(meta, dict) or meta.get("step") != step:
            raise ValueError(f"its meta does not describe step {step}")
        return meta

    def _targets(self, step: int, meta: dict, like: dict[str, Any] | None) -> dict[str, Any]:
        """The restore target of every array item."""
        if like is None:
            with _quiet_orbax():
                stored = self.manager.item_metadata(step)
            missing = [k for k in ARRAY_ITEMS if stored.get(k) is None]
            if missing:
                raise ValueError(f"no readable {', '.join(missing)}")
            return {k: _single_device_target(stored[k].tree) for k in ARRAY_ITEMS}
        targets = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
            {k: like[k] for k in ARRAY_ITEMS})
        if meta.get("format", 1) == 1:
            leaves = jax.tree.leaves(targets["opt_state"])
            targets["opt_state"] = {f"{i:05d}": leaf for i, leaf in enumerate(leaves)}
        return targets

    def _first_intact(self, steps: list[int], like) -> tuple[Restored, list]:
        """The first of `steps` that is intact, and the damaged ones before it;
        `CheckpointError` naming each when none is."""
        damaged = []
        for step in steps:
            try:
                return self.restore(step, like), damaged
            except DamagedCheckpointError as e:
                damaged.append(e)
        reasons = "; ".join(f"{e.step}: {e.reason}" for e in damaged)
        raise CheckpointError(
            f"no intact checkpoint in {self.directory}: every step is damaged ({reasons}); "
            f"restore the workdir from a copy, or start over in a new workdir")

    def _say_skipped(self, damaged: list, chosen: int, moved: bool = False) -> None:
        for e in damaged:
            where = f"; moved to {self.workdir / DAMAGED_CHECKPOINTS}" if moved else ""
            self.report(f"warning: checkpoint {e.step} in {self.directory} is damaged "
                        f"({e.reason}): skipped, using step {chosen}{where}")

    def newest_intact(self, like: dict[str, Any] | None = None) -> Restored | None:
        """The newest intact step (None: no step at all); newer damaged steps are reported.
        `CheckpointError` when every step is damaged."""
        steps = self.steps()
        if not steps:
            return None
        restored, damaged = self._first_intact(steps[::-1], like)
        self._say_skipped(damaged, restored.step)
        return restored

    def best_intact(self) -> Restored:
        """The intact step with the highest validation PSNR; better damaged ones reported."""
        scored = []
        for step in self.steps():
            try:
                psnr = self._read_meta(step).get("val_psnr")
            except Exception:  # noqa: BLE001 - a damaged step has no score to offer
                continue
            if isinstance(psnr, (int, float)):
                scored.append((psnr, step))
        if not scored:
            raise CheckpointMissingError(
                f"no checkpoint of {self.workdir} carries a validation PSNR (training "
                f"validates every eval_every steps); load 'latest' or a step number")
        restored, damaged = self._first_intact([s for _, s in sorted(scored)[::-1]], None)
        self._say_skipped(damaged, restored.step)
        return restored

    def restore_latest(self, like: dict[str, Any]) -> Restored | None:
        """For a resumed run: the newest intact step restored into `like`, after moving the
        newer damaged steps out of `checkpoints/` (so that they can be saved again); None
        when there is no step yet. Every process of a multi-host run calls it."""
        steps = self.steps()
        if not steps:
            return None
        restored, damaged = self._first_intact(steps[::-1], like)
        if damaged:
            self._say_skipped(damaged, restored.step, moved=True)
            _sync("iet_jax.workdir.before_moving_damaged")
            if jax.process_index() == 0:
                for e in damaged:
                    _move_aside(self.directory / str(e.step),
                                self.workdir / DAMAGED_CHECKPOINTS)
            _sync("iet_jax.workdir.after_moving_damaged")
            self.manager.reload()
        return restored


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def _move_aside(path: Path, into: Path) -> Path:
    """Move `path` into the folder `into`, under a name not yet taken there."""
    into.mkdir(parents=True, exist_ok=True)
    target, n = into / path.name, 1
    while target.exists():
        target, n = into / f"{path.name}.{n}", n + 1
    shutil.move(str(path), str(target))
    return target


# ----------------------------------------------------------------------------- for evaluation


def is_training_workdir(directory: str | Path) -> bool:
    """A directory written by `python -m iet_jax.train` (config.json + checkpoints/)."""
    directory = Path(directory)
    return (directory / CONFIG_FILE).is_file() and (directory / WORKDIR_CHECKPOINTS).is_dir()


def workdir_steps(directory: str | Path) -> list[int]:
    """The complete steps of a training workdir, intact or not (read-only)."""
    checkpoints = Checkpoints(directory, read_only=True)
    try:
        return checkpoints.steps()
    finally:
        checkpoints.manager.close()


def read_step(directory: str | Path, which: str | int = "latest",
              report: Callable[[str], None] = report_to_stderr) -> Restored:
    """The 'latest' (newest intact) or 'best' (validation PSNR, intact) step of a training
    workdir, or the step `which` itself, every item restored onto this process's first
    device and verified. `CheckpointMissingError` when there is no such step,
    `CheckpointError` when it (or, for 'latest'/'best', every candidate) is damaged."""
    checkpoints = Checkpoints(directory, read_only=True, report=report)
    try:
        steps = checkpoints.steps()
        if not steps:
            raise CheckpointMissingError(
                f"the training workdir {checkpoints.workdir} has no complete checkpoint yet "
                f"(none in {WORKDIR_CHECKPOINTS}/); training saves one every checkpoint_every "
                f"steps and at its end: wait for one, or load another checkpoint")
        if which == "latest":
            return checkpoints.newest_intact()
        if which == "best":
            return checkpoints.best_intact()
        try:
            step = int(which)
        except ValueError:
            raise CheckpointError(f"which checkpoint: 'latest', 'best' or a step number, "
                                  f"not {shown(which)}") from None
        if step not in steps:
            raise CheckpointMissingError(f"training workdir {checkpoints.workdir} has no "
                                         f"checkpoint {step}; it has {steps}")
        return checkpoints.restore(step)
    finally:
        checkpoints.manager.close()


def load_training_model(directory: str | Path, dtype: str | None = None,
                        which: str | int = "latest", item: str = WORKDIR_WEIGHTS,
                        report: Callable[[str], None] = report_to_stderr) -> IET:
    """The EMA weights (`item="params"`: the trained parameters) of a training checkpoint
    (`read_step`), in the model the workdir's config.json holds."""
    if item not in ("ema", "params"):
        raise ValueError(f"item must be 'ema' or 'params', got {item!r}")
    directory = Path(directory).absolute()
    graphdef, state, target = empty_model(directory, dtype)
    stored = with_int_keys(read_step(directory, which, report).items[item])
    check_tree(directory, target, stored)
    return filled_model(graphdef, state, target, stored)
