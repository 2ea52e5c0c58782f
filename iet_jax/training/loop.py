"""The training loop: `train_and_evaluate(config, workdir)` trains or resumes a run.

Its parts, in the order it calls them:

- `prepare_run`: checks the config (and that it fits the workdir's checkpoints), opens the
  data, builds the mesh, the optimiser and the state's shardings, takes the workdir's lock and
  writes the config files into the workdir (a `Run`; `with run.lock:` releases the lock).
- `open_loader`: the training patches (`make_loader` replaces `PairedPatchLoader`).
- `restore_or_initialise`: the workdir's latest checkpoint, or a fresh state (`init_from`).
- `compile_train_step` (in `step`): the jitted, donating train step.
- `StepMonitor`: fetches each step's metrics one step late, logs them, and stops on
  non-finite values (`config.nonfinite`).
- `validate` and `save_checkpoint`: every `eval_every` / `checkpoint_every` steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from iet_jax import datasets
from iet_jax.conventions.text import printable
from iet_jax.datasets import loader as loader_lib
from iet_jax.io import files, stored
from iet_jax.io import workdir as workdir_lib
from iet_jax.io.lock import WorkdirLock
from iet_jax.model.network import abstract_model
from iet_jax.training import optim as optim_lib
from iet_jax.training import sharding as sharding_lib
from iet_jax.training import state as ts
from iet_jax.training.config import ConfigError, check_resume, validate_config
from iet_jax.training.init import load_init_params
from iet_jax.training.metrics_log import Logger
from iet_jax.training.step import all_finite, compile_train_step
from iet_jax.training.validation import Validator

class NonFiniteError(FloatingPointError):
    """Loss or gradients became NaN/inf, or an update would have made the state NaN/inf
    (config.nonfinite = 'stop'); or a state to save is not finite (never saved)."""


def open_sources(config: ml_collections.ConfigDict):
    """(train, validation or None) sources; a missing build is refused with its command."""
    data = config.data
    data_dir = data.data_dir or None

    def open_one(name, split, field):
        try:
            return datasets.open_source(name, split, data.scale, data_dir)
        except datasets.DatasetNotBuiltError as e:
            raise ConfigError(f"{field} {name!r} (x{data.scale}, split {split!r}) is not built; "
                              f"build it with:\n  {e}") from e

    train = open_one(data.dataset, data.train_split, "data.dataset")
    val = (open_one(data.val_dataset, data.val_split, "data.val_dataset")
           if config.eval_every and data.val_dataset else None)
    return train, val


@dataclasses.dataclass(frozen=True)
class Run:
    """What `prepare_run` settles before any state exists."""

    config: ml_collections.ConfigDict
    workdir: Path
    model_cfg: Any  # the validated model config
    train_source: Any
    val_source: Any  # None: no validation
    mesh: jax.sharding.Mesh
    lead: bool  # process 0: writes files and logs
    tx: Any
    schedule: Any
    create: Callable  # the fresh train state (`state.create_train_state`)
    shardings: Any  # the train state's shardings (a TrainState tree)
    batch_sharding: Any
    # The workdir's lock, held from `prepare_run` on (lead process); `with run.lock:` or
    # `run.lock.release()` leaves it.
    lock: Any = dataclasses.field(default_factory=contextlib.nullcontext)


def prepare_run(config: ml_collections.ConfigDict, workdir: str | Path,
                devices: Sequence | None = None, *, train_source=None, val_source=None) -> Run:
    """Check the config, open the sources (unless given), build the mesh, the optimiser and
    the state's shardings, take the workdir's lock (`WorkdirLock`, lead process) and write
    config.json and the training config into `workdir` (atomically).

    Every refusal comes before anything is written: `ConfigError` for the config (one that
    does not fit the workdir's checkpoints: `check_resume`), for a workdir that is a file and
    for training images smaller than the patch; `WorkdirBusyError` when another trainer holds
    the workdir; `files.WriteError` when a file cannot be written. The returned `Run` holds
    the lock: leave it with `with run.lock:` (as `train_and_evaluate` does) or
    `run.lock.release()`."""
    workdir = Path(workdir).absolute()
    if workdir.exists() and not workdir.is_dir():
        raise ConfigError(f"workdir {workdir} is a file, not a directory; pass a directory "
                          f"(it is created if missing) as --workdir")
    if devices is None:
        sharding_lib.maybe_initialize_distributed(config.distributed)
    model_cfg = validate_config(config)
    check_resume(config, model_cfg, workdir)
    if train_source is None:
        train_source, opened_val = open_sources(config)
        val_source = opened_val if val_source is None else val_source
    check_small_images(config, train_source)
    mesh = sharding_lib.make_mesh(config.mesh, devices)
    sharding_lib.check_batch(config.batch_size, mesh, config.optim.grad_accum_steps,
                             jax.process_count())
    lead = jax.process_index() == 0
    lock = WorkdirLock(workdir, enabled=lead)
    if lead:
        files.make_dirs(workdir)
        message = lock.acquire()
        if message:
            print(message, file=sys.stderr)
    try:
        if lead:
            files.write_text_atomic(workdir / stored.CONFIG_FILE,
                                    stored.config_to_json(model_cfg))
            files.write_text_atomic(workdir / workdir_lib.TRAIN_CONFIG_FILE,
                                    config.to_json_best_effort(indent=2))
        tx, schedule = optim_lib.make_optimizer(config.optim)
        create = ts.create_train_state(model_cfg, config, tx)
        with jax.set_mesh(mesh):
            shardings = sharding_lib.state_shardings(jax.eval_shape(create), mesh,
                                                     config.param_sharding)
            batch_sharding = sharding_lib.batch_sharding(mesh)
    except BaseException:
        lock.release()
        raise
    return Run(config=config, workdir=workdir, model_cfg=model_cfg, train_source=train_source,
               val_source=val_source, mesh=mesh, lead=lead, tx=tx, schedule=schedule,
               create=create, shardings=shardings, batch_sharding=batch_sharding, lock=lock)


def check_small_images(config: ml_collections.ConfigDict, source) -> None:
    """With `data.small_images = 'error'`, refuse training images whose LR side is shorter
    than the patch, naming them (sources that record their image sizes; others are checked
    by the loader as it reads them)."""
    if config.data.get("small_images", "error") != "error":
        return
    p, s = config.data.patch_size, config.data.scale
    found = loader_lib.find_small_images(source, p)
    if not found or not found[0]:
        return
    small, total = found
    shown = ", ".join(f"{printable(str(name))} (LR {h}x{w}, HR {h * s}x{w * s})"
                      for name, (h, w) in small[:5]) + (" ..." if len(small) > 5 else "")
    fits = min(min(h, w) for h, w in source.lr_sizes())
    raise ConfigError(
        f"{len(small)} of {total} training images are smaller than the patch (LR {p}x{p}, HR "
        f"{p * s}x{p * s}): {shown}; lower data.patch_size (every image allows {fits}), or set "
        f"--config.data.small_images=skip to leave them out")


def open_loader(config: ml_collections.ConfigDict, source, make_loader: Callable | None = None):
    """This process's share of the training patches. `make_loader` (default
    `PairedPatchLoader`) is called with the source and `PairedPatchLoader`'s keywords."""
    make_loader = loader_lib.PairedPatchLoader if make_loader is None else make_loader
    with warnings.catch_warnings():  # said below, in one line
        warnings.simplefilter("ignore", loader_lib.SmallImagesSkipped)
        loader = make_loader(
            source, scale=config.data.scale, patch_size=config.data.patch_size,
            global_batch_size=config.batch_size, seed=config.seed,
            process_index=jax.process_index(), process_count=jax.process_count(),
            augment=config.data.augment,
            small_images=config.data.get("small_images", "error"),
            num_workers=config.data.get("num_workers", 0))
    if jax.process_count() > 1:  # every process says its share, once
        rows = config.batch_size // jax.process_count()
        first = jax.process_index() * rows
        print(f"process {jax.process_index()} of {jax.process_count()}: rows {first}-"
              f"{first + rows - 1} of each global batch of {config.batch_size}, on "
              f"{jax.local_device_count()} of {jax.device_count()} devices", flush=True)
    skipped = getattr(loader, "num_skipped", 0)
    if skipped and jax.process_index() == 0:
        print(f"data.small_images=skip: left out {skipped} of {len(source)} training images "
              f"smaller than the LR patch {config.data.patch_size}x{config.data.patch_size}")
    return loader


def open_checkpoints(run: Run) -> workdir_lib.Checkpoints:
    config = run.config
    return workdir_lib.Checkpoints(run.workdir, keep=config.keep_checkpoints,
                                   async_save=config.async_checkpointing,
                                   keep_best=bool(config.eval_every),
                                   report=print if run.lead else (lambda message: None))


def restore_or_initialise(run: Run, checkpoints: workdir_lib.Checkpoints, loader):
    """(state, start step, best validation PSNR or None): the workdir's newest intact
    checkpoint (newer damaged ones are reported and moved aside; the loader is moved to its
    input position), else a fresh state whose parameters and EMA come from
    `config.init_from` when set. Call inside the mesh."""
    like = ts.abstract_like(jax.eval_shape(run.create), run.shardings)
    restored = checkpoints.restore_latest(ts.to_items(like))
    if restored is not None:
        loader.set_state(restored.loader)
        return ts.from_items(restored.items), restored.step, restored.meta.get("best_psnr")
    state = jax.jit(run.create, out_shardings=run.shardings)()
    if run.config.init_from:
        state = _init_from(run, state)
    return state, 0, None


def _init_from(run: Run, state: ts.TrainState) -> ts.TrainState:
    """`state` with parameters and EMA from `config.init_from`, and a fresh optimiser state."""
    source, shardings = run.config.init_from, run.shardings
    params, ema, fresh, description = load_init_params(
        source, jax.device_get(state.params), run.model_cfg)
    params, ema = jax.device_get((params, ema))
    ema = jax.device_put(ema, shardings.ema)  # separate buffers: both donated
    params = jax.device_put(params, shardings.params)
    opt_state = jax.jit(run.tx.init, out_shardings=shardings.opt_state)(params)
    if run.lead:
        print(f"init_from {source}: {description}")
        if fresh:
            print(f"init_from {source}: freshly initialised {fresh}")
    return state.replace(params=params, ema=ema, opt_state=opt_state)


class StepMonitor:
    """Fetches a step's metrics one step late (so the device runs ahead), logs them, and
    stops on non-finite values when `config.nonfinite == 'stop'`.

    `record(step, metrics)` settles the step before and keeps this one pending; `settle()`
    fetches the pending one now (before validation, checkpoints and the end).

    Speed: the time between consecutive settled steps, summed over the steps since the last
    log record, gives `steps_per_s` and `images_per_s` (global batch x steps/s). The first
    step this invocation settles (it compiles) only starts the clock, and `restart_clock()`
    after a validation or checkpoint leaves their time out. `peak_memory_bytes`: the
    `peak_bytes_in_use` of this process's first device, where the backend reports it.
    """

    def __init__(self, config, logger: Logger, checkpoints: workdir_lib.Checkpoints):
        self.config, self.logger, self.checkpoints = config, logger, checkpoints
        self.history: list[tuple[int, float]] = []  # (step, loss) of every settled step
        self.skipped = 0  # non-finite steps seen by this invocation
        self._pending = None
        self._clock = None  # when the last step settled; None until the first one
        self._timed = [0, 0.0]  # steps and seconds since the last log record

    def restart_clock(self) -> None:
        """Measure the next step from now (after work that is not training)."""
        if self._clock is not None:
            self._clock = time.perf_counter()

    def speed(self) -> dict:
        """steps_per_s, images_per_s since the last call (when a step was timed) and
        peak_memory_bytes (when reported)."""
        out = {}
        steps, seconds = self._timed
        if steps and seconds > 0:
            out["steps_per_s"] = steps / seconds
            out["images_per_s"] = steps * self.config.batch_size / seconds
        self._timed = [0, 0.0]
        peak = peak_memory_bytes()
        if peak is not None:
            out["peak_memory_bytes"] = peak
        return out

    def record(self, step: int, metrics) -> None:
        self.settle()
        self._pending = (step, metrics)

    def settle(self) -> None:
        if self._pending is None:
            return
        done, metrics = self._pending
        self._pending = None
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.perf_counter()
        if self._clock is not None:
            self._timed[0] += 1
            self._timed[1] += now - self._clock
        self._clock = now
        self.history.append((done, m["loss"]))
        if not m["finite"]:
            if self.config.nonfinite == "stop":
                self.stop(done, m)
            self.skipped += 1
            self.logger.message(f"step {done}: {nonfinite_cause(m)}, update skipped "
                                f"({self.skipped} so far)")
        self.logger.progress(1, loss=m["loss"], lr=m["lr"])
        if done % self.config.log_every == 0 or done == self.config.num_steps:
            for flag in ("finite", "finite_grads", "finite_update"):
                m.pop(flag, None)
            self.logger.scalars(done, {**m, "skipped": self.skipped, **self.speed()})

    def stop(self, done: int, m: dict):
        """Close the checkpoints and the log, and raise NonFiniteError naming the step."""
        self.checkpoints.close()
        self.logger.close()
        raise NonFiniteError(
            f"{nonfinite_cause(m)} at step {done} (loss {m['loss']}, gradient norm "
            f"{m['grad_norm']}); the update was not applied. {restart_point(self.checkpoints)}. "
            f"Lower optim.learning_rate, set optim.grad_clip_norm, or use "
            f"--config.nonfinite=skip to skip such steps")


def peak_memory_bytes() -> int | None:
    """`peak_bytes_in_use` of this process's first device, or None where the backend does
    not report memory (the CPU backend)."""
    try:
        stats = jax.local_devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - a backend without memory statistics
        return None
    peak = (stats or {}).get("peak_bytes_in_use")
    return None if peak is None else int(peak)


def nonfinite_cause(m: dict) -> str:
    """Why a step's update was not applied, from its fetched metrics."""
    if m.get("finite_grads"):  # finite loss and gradients: the new state was not finite
        return "the update made the parameters, EMA or optimiser state non-finite"
    return "non-finite loss or gradients"


def restart_point(checkpoints: workdir_lib.Checkpoints) -> str:
    """Where a rerun of a stopped run starts, as a sentence."""
    last = checkpoints.latest_step()
    if last is None:
        return (f"No checkpoint was saved yet in {checkpoints.directory}: a rerun starts again "
                f"from scratch (or from config.init_from when set)")
    return f"Last good checkpoint: step {last} in {checkpoints.directory}"


def make_validator(run: Run) -> Validator | None:
    config = run.config
    if not config.eval_every or run.val_source is None:
        return None
    graphdef, _ = nnx.split(abstract_model(run.model_cfg))
    return Validator(run.val_source, config, graphdef, run.shardings.ema, run.mesh,
                     jnp.dtype(run.model_cfg.dtype))


def validate(validator: Validator, ema, step: int, logger: Logger, images: int) -> dict:
    """PSNR/SSIM of the EMA weights, logged with `images` (LR, SR, HR) triplets."""
    scores, triplets = validator(ema)
    logger.scalars(step, scores, prefix="val")
    logger.images(step, triplets[:images])
    logger.message(f"step {step}: validation PSNR {scores['psnr']:.3f} dB, "
                   f"SSIM {scores['ssim']:.4f} (bicubic {validator.bicubic['psnr']:.3f} dB)")
    return scores


_state_is_finite = jax.jit(lambda state: all_finite((state.params, state.ema, state.opt_state)))


def save_checkpoint(checkpoints: workdir_lib.Checkpoints, state, loader, step: int, best,
                    scores: dict | None) -> None:
    """Save `state` as checkpoint `step`. A state with a NaN or inf in its parameters, EMA or
    optimiser state is never saved (the train step never makes one): NonFiniteError."""
    if not bool(jax.device_get(_state_is_finite(state))):
        raise NonFiniteError(
            f"refusing to save step {step}: its parameters, EMA or optimiser state are not "
            f"finite. {restart_point(checkpoints)}")
    meta = {"step": step, "best_psnr": best}
    if scores is not None:
        meta.update(val_psnr=scores["psnr"], val_ssim=scores["ssim"])
    checkpoints.save(ts.to_items(state), loader.get_state(), meta,
                     metrics=None if scores is None else {"psnr": scores["psnr"]})


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path, *,
                       train_source=None, val_source=None, devices: Sequence | None = None,
                       make_loader: Callable | None = None) -> dict:
    """Train (or resume) in `workdir`. Sources default to `iet_jax.datasets.open_source`;
    `make_loader` to `PairedPatchLoader` (see `open_loader`).

    Returns a summary: final step, the (step, loss) history of this invocation, the last
    validation scores and the bicubic reference.
    """
    run = prepare_run(config, workdir, devices, train_source=train_source,
                      val_source=val_source)
    with run.lock, jax.set_mesh(run.mesh):
        checkpoints = open_checkpoints(run)
        loader = open_loader(config, run.train_source, make_loader)
        state, start, best = restore_or_initialise(run, checkpoints, loader)
        step_fn = compile_train_step(config, run.model_cfg, run.tx, run.schedule,
                                     run.shardings, run.mesh)
        validator = make_validator(run)
        logger = Logger(run.workdir, start, config.num_steps, run.lead)
        if validator is not None and run.lead:
            logger.message(f"bicubic on validation: PSNR {validator.bicubic['psnr']:.3f} dB, "
                           f"SSIM {validator.bicubic['ssim']:.4f}")
        monitor = StepMonitor(config, logger, checkpoints)
        summary = {"start_step": start, "history": monitor.history, "validation": None,
                   "bicubic": None if validator is None else validator.bicubic}
        try:
            for step in range(start, config.num_steps):
                batch = sharding_lib.global_batch(next(loader), run.batch_sharding)
                state, metrics = step_fn(state, batch)
                done = step + 1
                monitor.record(done, metrics)
                evaluate = validator is not None and (
                    done % config.eval_every == 0 or done == config.num_steps)
                if not (evaluate or done % config.checkpoint_every == 0
                        or done == config.num_steps):
                    continue
                monitor.settle()
                scores = None
                if evaluate:
                    scores = validate(validator, state.ema, done, logger,
                                      config.val_images_to_log)
                    best = scores["psnr"] if best is None else max(best, scores["psnr"])
                    summary["validation"] = {"step": done, **scores}
                save_checkpoint(checkpoints, state, loader, done, best, scores)
                monitor.restart_clock()
            monitor.settle()
        finally:
            checkpoints.close()
            logger.close()
            loader.close()
        summary["step"] = int(jax.device_get(state.step))
        summary["skipped"] = int(jax.device_get(state.skipped))
        summary["state"] = state
    return summary
