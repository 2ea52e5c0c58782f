"""Train IET: `python -m iet_jax.train --config configs/<recipe>.py --workdir DIR`.

Any config field can be overridden on the command line (`--config.batch_size=32`,
`--config.model.dtype=bfloat16`, `--config.optim.muon=False`). Rerunning the same command
resumes from the workdir's latest complete checkpoint and continues exactly as if the run
had not stopped (same parameters, optimiser state, EMA, and input batches).

Semantics:
- `batch_size` is the global batch over all devices and hosts (split over the mesh's data
  and fsdp axes, and over `optim.grad_accum_steps` micro-batches); the learning rate does not
  change with the number of devices. The same config on 1 or 64 devices computes the same
  updates (up to floating-point reordering).
- Loss: L1 between SR output and HR patch, averaged over pixels and the global batch.
- Validation uses the EMA weights; PSNR/SSIM on Y with `crop_border = scale`.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from iet_jax import optim as optim_lib
from iet_jax import sharding as sharding_lib
from iet_jax import train_state as ts
from iet_jax.datasets import loader as loader_lib
from iet_jax.io import model_dir, official, pth, stored
from iet_jax.io import workdir as workdir_lib
from iet_jax.model import config as config_lib
from iet_jax.model.network import IET, abstract_model
from iet_jax.sharding import ConfigError

# Model fields that decide the parameter shapes outside the upsampler: an initialisation
# checkpoint (init_from) must agree on them.
ARCHITECTURE_FIELDS = ("embed_dim", "nattn_dim", "depths", "num_heads", "convffn_kernel_size",
                       "mlp_ratio", "local_range", "upsampler")


_STEP_CACHE: dict = {}  # the last jitted train step (compiled once per config and process)


class NonFiniteError(FloatingPointError):
    """Loss or gradients became NaN/inf (config.nonfinite = 'stop')."""


# ----------------------------------------------------------------------------- config checks


def model_config_for_training(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The model config the run uses: bfloat16 compute keeps float32 parameters and state."""
    fields = config.model.to_dict()
    if fields["dtype"] == "bfloat16":
        fields.update(config_lib.dtype_fields("bfloat16"))
    for key in ("depths", "topk_focus", "topk_prop_1", "topk_prop_2", "topk_prop_3"):
        fields[key] = tuple(tuple(v) if isinstance(v, (list, tuple)) else v for v in fields[key])
    return config_lib.model_config(**fields)


def validate_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Refuse what cannot train, naming the field; return the model config to use."""
    try:
        model_cfg = model_config_for_training(config)
        nnx.eval_shape(lambda: IET(model_cfg, rngs=nnx.Rngs(0)))  # budgets, plan, dtypes
    except ValueError as e:
        raise ConfigError(f"model: {e}") from e
    data = config.data
    if data.scale != model_cfg.scale:
        raise ConfigError(f"data.scale ({data.scale}) must equal model.scale ({model_cfg.scale})")
    window = model_cfg.sparse_range * model_cfg.dilation
    need = max(window, model_cfg.img_size)
    if data.patch_size < need:
        what = (f"the attention window needs model.sparse_range x model.dilation = "
                f"{model_cfg.sparse_range} x {model_cfg.dilation} = {window} tokens"
                if data.patch_size < window else
                f"the model pads training inputs to model.img_size = {model_cfg.img_size} "
                f"(lower model.img_size too)")
        raise ConfigError(f"data.patch_size {data.patch_size} is too small: {what}; use "
                          f"data.patch_size >= {need}")
    positive = {"batch_size": config.batch_size, "num_steps": config.num_steps,
                "optim.grad_accum_steps": config.optim.grad_accum_steps,
                "keep_checkpoints": config.keep_checkpoints,
                "checkpoint_every": config.checkpoint_every, "log_every": config.log_every}
    for name, value in positive.items():
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if config.eval_every < 0:
        raise ConfigError(f"eval_every must be >= 0 (0: no validation), got {config.eval_every}")
    if config.batch_size % config.optim.grad_accum_steps:
        raise ConfigError(f"batch_size {config.batch_size} is not divisible by "
                          f"optim.grad_accum_steps {config.optim.grad_accum_steps}")
    if not 0.0 <= config.ema_decay < 1.0:
        raise ConfigError(f"ema_decay must be in [0, 1), got {config.ema_decay}")
    if config.nonfinite not in ("stop", "skip"):
        raise ConfigError(f"nonfinite must be 'stop' or 'skip', got {config.nonfinite!r}")
    if config.param_sharding not in ("replicate", "fsdp"):
        raise ConfigError(f"param_sharding must be 'replicate' or 'fsdp', got "
                          f"{config.param_sharding!r}")
    if config.optim.learning_rate <= 0:
        raise ConfigError(f"optim.learning_rate must be positive, got {config.optim.learning_rate}")
    if config.optim.muon_variant not in optim_lib.MUON_VARIANTS:
        raise ConfigError(f"optim.muon_variant must be one of {optim_lib.MUON_VARIANTS}, got "
                          f"{config.optim.muon_variant!r}")
    if list(config.optim.milestones) != sorted(config.optim.milestones):
        raise ConfigError(f"optim.milestones must be increasing, got {config.optim.milestones}")
    check_init_from(config, model_cfg)
    return model_cfg


def check_init_from(config: ml_collections.ConfigDict, model_cfg) -> None:
    """An initialisation source must exist; a workdir or model dir must hold the same
    architecture (an official .pth is checked key by key when it is loaded)."""
    path = config.init_from
    if not path:
        return
    directory = Path(path)
    if directory.is_file():
        return
    config_file = directory / stored.CONFIG_FILE
    if not config_file.is_file():
        raise ConfigError(
            f"init_from: {path!r} is not a training workdir, model directory (no "
            f"{stored.CONFIG_FILE}) or .pth file. Train the earlier stage into it "
            f"first, pass --config.init_from=<workdir, converted model dir or official .pth>, "
            f"or --config.init_from='' to train from scratch")
    source = json.loads(config_file.read_text())
    diff = []
    for field in ARCHITECTURE_FIELDS:
        mine, theirs = model_cfg[field], source.get(field)
        if isinstance(mine, (tuple, list)):
            mine, theirs = list(mine), list(theirs) if theirs is not None else None
        if mine != theirs:
            diff.append(f"model.{field}: {theirs!r} in the checkpoint vs {mine!r} here")
    if diff:
        raise ConfigError(f"init_from: {path} holds another architecture:\n  " + "\n  ".join(diff))


def open_sources(config: ml_collections.ConfigDict):
    """(train, validation or None) sources; a missing build is refused with its command."""
    from iet_jax import datasets

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


# ----------------------------------------------------------------------------- the model


def init_params(model_cfg, seed: int):
    """Freshly initialised parameters as a nested dict with string keys."""
    model = IET(model_cfg, rngs=nnx.Rngs(seed))
    return stored.with_str_keys(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def apply_model(graphdef, params, x, *, train: bool):
    return nnx.merge(graphdef, stored.with_int_keys(params))(x, train=train)


def _flat(tree) -> dict:
    """'blocks/0/layers/1/wqkv/kernel' -> leaf."""
    return {"/".join(str(getattr(k, "key", k)) for k in path): leaf
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _model_weights(model) -> dict:
    return _flat(stored.with_str_keys(nnx.to_pure_dict(nnx.state(model, nnx.Param))))


# Official keys of the upsampler, which may differ between scales (BasicSR's strict=False).
_OFFICIAL_UPSAMPLER = ("upsample.", "conv_before_upsample.", "conv_last.")


def _official_weights(state_dict: dict, model_cfg, path: str) -> dict:
    """An official state dict in our names and layouts; unknown keys outside the upsampler
    are refused."""
    keys = official.official_keys(abstract_model(model_cfg))
    unknown = sorted(k for k in state_dict
                     if k not in keys and not k.startswith(_OFFICIAL_UPSAMPLER))
    if unknown:
        raise ConfigError(f"init_from: {path} holds keys this model does not have (another "
                          f"architecture?): {unknown[:10]}")
    return {"/".join(str(p) for p in keys[k][0]): keys[k][1].to_ours(np.asarray(v))
            for k, v in state_dict.items() if k in keys}


def init_weights(path: str, model_cfg) -> tuple[dict, dict, str]:
    """(training weights, EMA weights, what they came from) of an `init_from` source, as flat
    dicts in our names. Like BasicSR: the parameters start from the source's `params`, the EMA
    from its `params_ema`; a source with only one of them starts both from it."""
    source = Path(path)
    if source.is_file():  # an official (BasicSR) .pth
        try:
            obj = pth.load_pth(source)
            train_sd, train_key = pth.select_state_dict(obj, ("params", "params_ema"))
            ema_sd, ema_key = pth.select_state_dict(obj, ("params_ema", "params"))
        except ValueError as e:
            raise ConfigError(f"init_from: {e}") from e
        return (_official_weights(train_sd, model_cfg, path),
                _official_weights(ema_sd, model_cfg, path),
                f"parameters from {train_key or 'the state dict'!r}, EMA from "
                f"{ema_key or 'the state dict'!r}")
    if workdir_lib.is_training_workdir(source):
        step = workdir_lib.workdir_step(source)
        return (_model_weights(workdir_lib.load_training_model(source, item="params")),
                _model_weights(workdir_lib.load_training_model(source, item="ema")),
                f"parameters and EMA of its step {step}")
    weights = _model_weights(model_dir.load_model(source))
    return weights, weights, "parameters and EMA from its one set of weights"


def load_init_params(path: str, params: dict, model_cfg) -> tuple[dict, dict, list[str], str]:
    """Fill `params` (the training weights) and a copy (the EMA) from `init_weights(path)`.

    Every parameter outside the upsampler must be present with the same shape; upsampler
    parameters are taken where their shapes agree (x4 from x2: the first stage) and stay
    freshly initialised otherwise. Returns (params, ema, names left fresh, description).
    """
    train_src, ema_src, description = init_weights(path, model_cfg)
    fresh, problems = set(), []

    def fill(src):
        def take(key_path, leaf):
            name = "/".join(str(getattr(k, "key", k)) for k in key_path)
            value = src.get(name)
            if value is not None and tuple(value.shape) == tuple(leaf.shape):
                return jnp.asarray(value, leaf.dtype)
            if name.startswith("upsample/"):
                fresh.add(name)
                return leaf
            problems.append(f"{name}: {None if value is None else tuple(value.shape)} in the "
                            f"checkpoint vs {tuple(leaf.shape)} here")
            return leaf

        return jax.tree_util.tree_map_with_path(take, params)

    out_params, out_ema = fill(train_src), fill(ema_src)
    if problems:
        raise ConfigError(f"init_from: {path} does not fit the model:\n  " + "\n  ".join(problems[:20]))
    return out_params, out_ema, sorted(fresh), description


# ----------------------------------------------------------------------------- the train step


def make_train_step(config, graphdef, tx, schedule, compute_dtype):
    accum = config.optim.grad_accum_steps
    decay = float(config.ema_decay)
    acc_dtype = jnp.float64 if compute_dtype == jnp.float64 else jnp.float32

    def loss_fn(params, lr, hr):
        sr = apply_model(graphdef, params, lr.astype(compute_dtype), train=True)
        return jnp.mean(jnp.abs(sr.astype(acc_dtype) - hr.astype(acc_dtype)))

    grad_fn = jax.value_and_grad(loss_fn)

    def step(state: ts.TrainState, batch: dict):
        if accum == 1:
            loss, grads = grad_fn(state.params, batch["lr"], batch["hr"])
        else:
            # Micro-batch i holds rows i, i + accum, ...: every device keeps its share.
            def split(x):
                x = x.reshape((x.shape[0] // accum, accum) + x.shape[1:]).swapaxes(0, 1)
                return jax.lax.with_sharding_constraint(
                    x, jax.sharding.PartitionSpec(None, sharding_lib.BATCH_AXES))

            micro = jax.tree.map(split, batch)

            def body(carry, mb):
                loss, grads = grad_fn(state.params, mb["lr"], mb["hr"])
                return (carry[0] + loss, jax.tree.map(jnp.add, carry[1], grads)), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            (loss, grads), _ = jax.lax.scan(body, (jnp.zeros((), acc_dtype), zeros), micro)
            loss = loss / accum
            grads = jax.tree.map(lambda g: g / accum, grads)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = ts.ema_update(state.ema, params, decay)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def keep(new, old):  # a non-finite step changes nothing but the counters
            return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)

        new_state = ts.TrainState(
            step=state.step + 1, params=keep(params, state.params), ema=keep(ema, state.ema),
            opt_state=keep(opt_state, state.opt_state), rng=state.rng,
            skipped=state.skipped + (~ok).astype(jnp.int32))
        metrics = {"loss": loss.astype(jnp.float32), "grad_norm": grad_norm.astype(jnp.float32),
                   "lr": schedule(state.step),
                   "finite": ok}
        return new_state, metrics

    return step


# ----------------------------------------------------------------------------- validation


class Validator:
    """PSNR/SSIM (Y, crop = scale) of the EMA weights on the validation images."""

    def __init__(self, source, config, graphdef, param_shardings, mesh, compute_dtype):
        from iet_jax.conventions import metrics
        from iet_jax.conventions.imresize import bicubic_upscale

        self.metrics = metrics
        self.scale = config.data.scale
        crop = config.data.val_crop
        limit = config.data.val_max_images or len(source)
        self.images = []
        for i in range(min(limit, len(source))):
            item = source[i]
            lr, hr = np.asarray(item["lr"]), np.asarray(item["hr"])
            if crop:
                h, w = lr.shape[:2]
                ch, cw = min(crop, h), min(crop, w)
                y0, x0 = (h - ch) // 2, (w - cw) // 2
                lr = lr[y0:y0 + ch, x0:x0 + cw]
                hr = hr[y0 * self.scale:(y0 + ch) * self.scale,
                        x0 * self.scale:(x0 + cw) * self.scale]
            bicubic = bicubic_upscale(lr, self.scale)  # the same reference row as evaluate
            self.images.append((str(item.get("name", i)), lr, hr, bicubic))
        self.bicubic = self._scores([(b, hr) for _, _, hr, b in self.images])
        replicated = sharding_lib.replicated(mesh)
        self._replicated = replicated
        self._predict = jax.jit(
            lambda params, x: apply_model(graphdef, params, x.astype(compute_dtype),
                                          train=False).astype(jnp.float32),
            in_shardings=(param_shardings, replicated), out_shardings=replicated)

    def _scores(self, pairs):
        psnr = [self.metrics.psnr(sr, hr, crop_border=self.scale) for sr, hr in pairs]
        ssim = [self.metrics.ssim(sr, hr, crop_border=self.scale) for sr, hr in pairs]
        return {"psnr": float(np.mean(psnr)), "ssim": float(np.mean(ssim))}

    def __call__(self, params) -> tuple[dict, list]:
        groups: dict[tuple, list[int]] = {}
        for i, (_, lr, _, _) in enumerate(self.images):
            groups.setdefault(lr.shape, []).append(i)
        outputs: list[Any] = [None] * len(self.images)
        for indices in groups.values():  # one call per image size
            x = np.stack([self.images[i][1] for i in indices]).astype(np.float32) / 255.0
            y = self._predict(params, jax.device_put(x, self._replicated))
            y = np.asarray(y.addressable_data(0))
            for j, i in enumerate(indices):
                outputs[i] = self.metrics.to_uint8(y[j])
        scores = self._scores([(sr, img[2]) for sr, img in zip(outputs, self.images)])
        triplets = [(name, np.concatenate([b, sr, hr], axis=1))
                    for (name, _, hr, b), sr in zip(self.images, outputs)]
        return scores, triplets


# ----------------------------------------------------------------------------- logging


class Logger:
    """metrics.jsonl, TensorBoard (tensorboardX, if installed) and the progress bar."""

    def __init__(self, workdir: Path, start_step: int, total: int, enabled: bool):
        self.enabled = enabled
        self.path = workdir / workdir_lib.METRICS_FILE
        self.writer = None
        self.bar = None
        if not enabled:
            return
        if self.path.exists():  # a resumed run rewrites what came after its checkpoint
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= start_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        try:
            from tensorboardX import SummaryWriter
            self.writer = SummaryWriter(str(workdir / "tensorboard"))
        except ImportError:
            print("tensorboardX is not installed: no TensorBoard logs (metrics.jsonl is "
                  "written); pip install tensorboardX", file=sys.stderr)
        from tqdm import tqdm
        self.bar = tqdm(total=total, initial=start_step, unit="step", dynamic_ncols=True,
                        smoothing=0.1)

    def scalars(self, step: int, values: dict, *, prefix: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **{f"{prefix}/{k}": v
                                                         for k, v in values.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(f"{prefix}/{k}", v, step)

    def images(self, step: int, triplets) -> None:
        if self.enabled and self.writer is not None:
            for name, img in triplets:
                self.writer.add_image(f"val/{name} (bicubic | SR | HR)", img, step,
                                      dataformats="HWC")

    def progress(self, n: int, **postfix) -> None:
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v)
                                  for k, v in postfix.items()}, refresh=False)

    def message(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


# ----------------------------------------------------------------------------- the loop


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
        params = init_params(model_cfg, seed)
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


# ----------------------------------------------------------------------------- command line


def main(argv=None) -> int:
    from absl import flags
    from ml_collections import config_flags

    argv = list(sys.argv if argv is None else argv)
    flags_ = flags.FlagValues()
    config_flag = config_flags.DEFINE_config_file(
        "config", None, "training config file, e.g. configs/demo.py or configs/iet_x2.py:train",
        flag_values=flags_, lock_config=True, sys_argv=argv)
    flags.DEFINE_string("workdir", None, "where checkpoints and logs go (resumes if present)",
                        flag_values=flags_)
    try:
        flags_(argv)
    except flags.Error as e:
        print(f"error: {e}\nusage: python -m iet_jax.train --config configs/<recipe>.py "
              f"--workdir DIR [--config.FIELD=VALUE ...]", file=sys.stderr)
        return 2
    if config_flag.value is None or not flags_.workdir:
        print("usage: python -m iet_jax.train --config configs/<recipe>.py --workdir DIR "
              "[--config.FIELD=VALUE ...]", file=sys.stderr)
        return 2
    try:
        summary = train_and_evaluate(config_flag.value, flags_.workdir)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:
        print(f"stopped: {e}", file=sys.stderr)
        return 3
    val = summary["validation"]
    if val is not None and jax.process_index() == 0:
        print(f"done: step {summary['step']}, validation PSNR {val['psnr']:.3f} dB / SSIM "
              f"{val['ssim']:.4f} (bicubic {summary['bicubic']['psnr']:.3f} dB / "
              f"{summary['bicubic']['ssim']:.4f}); checkpoints in {flags_.workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
