"""The training loop: `train_and_evaluate(config, workdir)` trains or resumes a run.

It checks the config, opens the data, builds the mesh and the train state (fresh, from
`init_from`, or restored from the workdir's latest checkpoint), compiles the step, and then
steps, logs, validates and checkpoints until `num_steps`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from iet_jax import datasets
from iet_jax.datasets import loader as loader_lib
from iet_jax.io import stored
from iet_jax.io import workdir as workdir_lib
from iet_jax.model.network import abstract_model
from iet_jax.training import optim as optim_lib
from iet_jax.training import sharding as sharding_lib
from iet_jax.training import state as ts
from iet_jax.training.config import ConfigError, validate_config
from iet_jax.training.init import load_init_params
from iet_jax.training.metrics_log import Logger
from iet_jax.training.step import make_train_step
from iet_jax.training.validation import Validator

_STEP_CACHE: dict = {}  # the last jitted train step (compiled once per config and process)


class NonFiniteError(FloatingPointError):
    """Loss or gradients became NaN/inf (config.nonfinite = 'stop')."""


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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path, *,
                       train_source=None, val_source=None, devices: Sequence | None = None,
                       ) -> dict:
    """Train (or resume) in `workdir`. Sources default to `iet_jax.datasets.open_source`.

    Returns a summary: final step, the (step, loss) history of this invocation, the last
    validation scores and the bicubic reference.
    """
    workdir = Path(workdir).absolute()
    if devices is None:
        sharding_lib.maybe_initialize_distributed(config.distributed)
    model_cfg = validate_config(config)
    if train_source is None:
        train_source, opened_val = open_sources(config)
        val_source = opened_val if val_source is None else val_source
    mesh = sharding_lib.make_mesh(config.mesh, devices)
    sharding_lib.check_batch(config.batch_size, mesh, config.optim.grad_accum_steps,
                             jax.process_count())
    lead = jax.process_index() == 0
    if lead:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / stored.CONFIG_FILE).write_text(stored.config_to_json(model_cfg))
        (workdir / workdir_lib.TRAIN_CONFIG_FILE).write_text(config.to_json_best_effort(indent=2))

    compute_dtype = jnp.dtype(model_cfg.dtype)
    graphdef, _ = nnx.split(abstract_model(model_cfg))
    tx, schedule = optim_lib.make_optimizer(config.optim)

    def create():
        seed = config.seed
        params = ts.init_params(model_cfg, seed)
        return ts.TrainState(
            step=jnp.zeros((), jnp.int32), params=params, ema=jax.tree.map(jnp.copy, params),
            opt_state=tx.init(params),
            rng=jax.random.key_data(jax.random.key(seed)), skipped=jnp.zeros((), jnp.int32))

    with jax.set_mesh(mesh):
        abstract = jax.eval_shape(create)
        shardings = sharding_lib.state_shardings(abstract, mesh, config.param_sharding)
        batch_sharding = sharding_lib.batch_sharding(mesh)
        replicated = sharding_lib.replicated(mesh)
        checkpoints = workdir_lib.Checkpoints(workdir, keep=config.keep_checkpoints,
                                     async_save=config.async_checkpointing,
                                     keep_best=bool(config.eval_every))
        loader = loader_lib.PairedPatchLoader(
            train_source, scale=config.data.scale, patch_size=config.data.patch_size,
            global_batch_size=config.batch_size, seed=config.seed,
            process_index=jax.process_index(), process_count=jax.process_count(),
            augment=config.data.augment)
        start = checkpoints.latest_step()
        if start is not None:
            like = ts.abstract_like(abstract, shardings)
            items, loader_state, meta = checkpoints.restore(start, ts.to_items(like))
            state = ts.from_items(items, like)
            loader.set_state(loader_state)
            best = meta.get("best_psnr")
        else:
            start, best = 0, None
            state = jax.jit(create, out_shardings=shardings)()
            if config.init_from:
                params, ema, fresh, description = load_init_params(
                    config.init_from, jax.device_get(state.params), model_cfg)
                params, ema = jax.device_get((params, ema))
                ema = jax.device_put(ema, shardings.ema)  # separate buffers: both donated
                params = jax.device_put(params, shardings.params)
                state = state.replace(params=params, ema=ema,
                                      opt_state=jax.jit(tx.init, out_shardings=shardings.opt_state)(params))
                if lead:
                    print(f"init_from {config.init_from}: {description}")
                    if fresh:
                        print(f"init_from {config.init_from}: freshly initialised {fresh}")
        key = (model_cfg.to_json(), config.optim.to_json(), float(config.ema_decay),
               config.param_sharding, tuple(mesh.device_ids.flat), tuple(mesh.shape.items()))
        step_fn = _STEP_CACHE.get(key)
        if step_fn is None:  # kept per config, so another run in this process reuses it
            step_fn = jax.jit(make_train_step(config, graphdef, tx, schedule, compute_dtype),
                              in_shardings=(shardings, batch_sharding),
                              out_shardings=(shardings, replicated), donate_argnums=(0,))
            _STEP_CACHE.clear()
            _STEP_CACHE[key] = step_fn
        validator = (Validator(val_source, config, graphdef, shardings.ema, mesh, compute_dtype)
                     if config.eval_every and val_source is not None else None)
        logger = Logger(workdir, start, config.num_steps, lead)
        if validator is not None and lead:
            logger.message(f"bicubic on validation: PSNR {validator.bicubic['psnr']:.3f} dB, "
                           f"SSIM {validator.bicubic['ssim']:.4f}")
        summary = {"start_step": start, "history": [], "validation": None,
                   "bicubic": None if validator is None else validator.bicubic}
        pending = None
        skipped_seen = 0

        def settle():
            """Fetch the last step's metrics: log them, and stop on non-finite values."""
            nonlocal pending, skipped_seen
            if pending is None:
                return
            done, metrics = pending
            pending = None
            m = {k: float(v) for k, v in jax.device_get(metrics).items()}
            summary["history"].append((done, m["loss"]))
            if not m["finite"]:
                if config.nonfinite == "stop":
                    checkpoints.close()
                    logger.close()
                    last = checkpoints.latest_step()
                    raise NonFiniteError(
                        f"non-finite loss or gradients at step {done} (loss {m['loss']}, "
                        f"gradient norm {m['grad_norm']}); the update was not applied. Last "
                        f"good checkpoint: step {last} in {checkpoints.directory}. Lower "
                        f"optim.learning_rate, set optim.grad_clip_norm, or use "
                        f"--config.nonfinite=skip to skip such steps")
                skipped_seen += 1
                logger.message(f"step {done}: non-finite loss or gradients, update skipped "
                               f"({skipped_seen} so far)")
            logger.progress(1, loss=m["loss"], lr=m["lr"])
            if done % config.log_every == 0 or done == config.num_steps:
                m.pop("finite")
                logger.scalars(done, {**m, "skipped": skipped_seen})

        try:
            for step in range(start, config.num_steps):
                batch = sharding_lib.global_batch(next(loader), batch_sharding)
                state, metrics = step_fn(state, batch)
                settle()
                pending = (step + 1, metrics)
                done = step + 1
                evaluate = validator is not None and (
                    done % config.eval_every == 0 or done == config.num_steps)
                save = evaluate or done % config.checkpoint_every == 0 or done == config.num_steps
                if not save:
                    continue
                settle()
                meta = {"step": done, "best_psnr": best}
                scores = None
                if evaluate:
                    scores, triplets = validator(state.ema)
                    best = scores["psnr"] if best is None else max(best, scores["psnr"])
                    meta.update(val_psnr=scores["psnr"], val_ssim=scores["ssim"],
                                best_psnr=best)
                    summary["validation"] = {"step": done, **scores}
                    logger.scalars(done, scores, prefix="val")
                    logger.images(done, triplets[:config.val_images_to_log])
                    logger.message(f"step {done}: validation PSNR {scores['psnr']:.3f} dB, "
                                   f"SSIM {scores['ssim']:.4f} (bicubic "
                                   f"{validator.bicubic['psnr']:.3f} dB)")
                checkpoints.save(ts.to_items(state), loader.get_state(), meta,
                                 metrics=None if scores is None else {"psnr": scores["psnr"]})
            settle()
        finally:
            checkpoints.close()
            logger.close()
            loader.close()
        summary["step"] = int(jax.device_get(state.step))
        summary["skipped"] = int(jax.device_get(state.skipped))
        summary["state"] = state
    return summary
