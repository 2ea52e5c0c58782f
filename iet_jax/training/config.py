"""Training configs: the official recipes, the full config, and the checks before a run.

`recipe(variant, scale, settings, stage)` is the config of an official recipe
(`--config <name>`: `training/recipes/<name>.py`); `training_config` builds one from its
parts. `validate_config` refuses what cannot train, naming the field (`ConfigError`), and
returns the model config the run uses (`model_config_for_training`: bfloat16 compute keeps
float32 parameters).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import ml_collections
from flax import nnx

from iet_jax.io import stored
from iet_jax.io import workdir as workdir_lib
from iet_jax.model import config as config_lib
from iet_jax.model.network import IET
from iet_jax.training import optim as optim_lib


class ConfigError(ValueError):
    """A configuration the training loop refuses; the message names the field."""


# ----------------------------------------------------------------------------- official recipes

# Official training recipes, one per options/train/*.yml, keyed (variant, scale, stage).
# `batch_size` is the global batch: per-GPU batch x the GPUs of the official README's commands
# (8 for IET, 4 for IET-light). `remat` is the option file's `use_checkpoint`; `network`
# holds train-settings network fields that differ from OFFICIAL_NETWORKS. `init_from` is the
# stage each one starts from: x2 fine-tuning from x2 scratch, x3/x4 from the final x2 model
# (classical: the x2 fine-tune, whose network the released x2 weights are evaluated with).
OFFICIAL_RECIPES: dict[tuple[str, int, str], dict[str, Any]] = {
    ("iet", 2, "scratch"): dict(  # 000_IET_SRx2_scratch
        dataset="df2k", patch_size=58, batch_size=6 * 8, learning_rate=2e-4, num_steps=400_000,
        milestones=(250_000, 350_000, 375_000, 390_000), warmup_steps=10_000, init_from="",
        remat=False),
    ("iet", 2, "finetune"): dict(  # 001_IET_SRx2_finetune
        dataset="df2k", patch_size=82, batch_size=3 * 8, learning_rate=3e-5, num_steps=250_000,
        milestones=(100_000, 150_000, 170_000, 190_000, 200_000), warmup_steps=100,
        init_from="workdirs/iet_x2", remat=True, network=dict(dilation=3, img_size=82)),
    ("iet", 3, "finetune"): dict(  # 002_IET_SRx3_finetune
        dataset="df2k", patch_size=82, batch_size=3 * 8, learning_rate=2e-5, num_steps=250_000,
        milestones=(50_000, 70_000, 90_000, 95_000), warmup_steps=100,
        init_from="workdirs/iet_x2_finetune", remat=True),
    ("iet", 4, "finetune"): dict(  # 003_IET_SRx4_finetune
        dataset="df2k", patch_size=56, batch_size=6 * 8, learning_rate=3e-5, num_steps=250_000,
        milestones=(50_000, 70_000, 90_000, 95_000), warmup_steps=1000,
        init_from="workdirs/iet_x2_finetune", remat=True),
    ("iet_light", 2, "scratch"): dict(  # 101_IET_light_SRx2_scratch
        dataset="div2k", patch_size=78, batch_size=14 * 4, learning_rate=5e-4,
        num_steps=400_000, milestones=(200_000, 300_000, 350_000, 375_000, 390_000),
        warmup_steps=20_000, init_from="", remat=False),
    ("iet_light", 3, "finetune"): dict(  # 102_IET_light_SRx3_finetune
        dataset="div2k", patch_size=78, batch_size=14 * 4, learning_rate=5e-4,
        num_steps=250_000, milestones=(25_000, 40_000, 50_000, 60_000), warmup_steps=10_000,
        init_from="workdirs/iet_light_x2", remat=False),
    ("iet_light", 4, "finetune"): dict(  # 103_IET_light_SRx4_finetune
        dataset="div2k", patch_size=78, batch_size=14 * 4, learning_rate=5e-4,
        num_steps=250_000, milestones=(50_000, 70_000, 90_000, 100_000), warmup_steps=10_000,
        init_from="workdirs/iet_light_x2", remat=False),
}
# Muon's learning rate is this multiple of the base rate (the official `scale` option).
MUON_LR_SCALE = {"iet": 5.0, "iet_light": 6.0}


def recipe(variant: str, scale: int, settings: str | None = None, stage: str | None = None
           ) -> ml_collections.ConfigDict:
    """The top-level config of an official recipe: `--config <name>[:train|:eval]`.

    `stage` is 'scratch' or 'finetune' (default: 'scratch' at x2, 'finetune' at x3/x4; only
    IET x2 has both). `model` holds the network (official train or eval settings); the other
    fields drive `python -m iet_jax.train` (see `training_config` for their meaning).
    """
    settings = settings or "train"
    default_stage = "scratch" if scale == 2 else "finetune"
    stage = stage or default_stage
    if (variant, scale, stage) not in OFFICIAL_RECIPES:
        raise ValueError(f"no official recipe {(variant, scale, stage)}; choose one of "
                         f"{sorted(OFFICIAL_RECIPES)}")
    entry = dict(OFFICIAL_RECIPES[variant, scale, stage])
    network = entry.pop("network", {})
    model = config_lib.official(variant, scale, settings, remat=entry.pop("remat"),
                     **(network if settings == "train" else {}))
    config = training_config(model=model, muon_lr_scale=MUON_LR_SCALE[variant], **entry)
    config.name = f"{variant}_x{scale}" + ("" if stage == default_stage else f"_{stage}")
    config.settings = settings
    return config


def training_config(*, model: ml_collections.ConfigDict, dataset: str, patch_size: int,
                    batch_size: int, learning_rate: float, num_steps: int,
                    milestones: tuple[int, ...], warmup_steps: int, muon_lr_scale: float,
                    init_from: str = "") -> ml_collections.ConfigDict:
    """A full training config: `model` plus data, optimiser, schedule, checkpoints, mesh."""
    config = ml_collections.ConfigDict()
    config.name = "custom"
    config.settings = "train"
    config.model = model
    config.seed = 0

    config.data = ml_collections.ConfigDict(dict(
        dataset=dataset,  # iet_jax.datasets name ('div2k', 'df2k', 'demo', a folder build)
        train_split="train",
        data_dir="",  # '' -> $IET_DATA_DIR or ~/tensorflow_datasets
        patch_size=patch_size,  # LR patch side; the HR patch is patch_size * scale
        scale=model.scale,  # must equal model.scale
        augment=True,  # flips and 90-degree rotations
        val_dataset="set5",
        val_split="test",
        val_max_images=0,  # 0: all images of the validation split
        val_crop=0,  # >0: validate on centre crops of this LR size (one compile, faster)
        # Training images whose LR side is shorter than patch_size: "error" refuses the run
        # naming them, "skip" leaves them out (and says how many).
        small_images="error",
        # Worker processes decoding and cropping the training batches (grain, spawned);
        # 0: in the training process, with read-ahead threads. The batches do not depend on
        # it, so a resumed run may change it.
        num_workers=0,
    ))
    # Global batch over all devices and hosts; it does not change with the device count.
    config.batch_size = batch_size
    config.num_steps = num_steps

    config.optim = ml_collections.ConfigDict(dict(
        learning_rate=learning_rate,  # base rate (Adam group); independent of device count
        warmup_steps=warmup_steps,  # linear warm-up (BasicSR's rule)
        milestones=tuple(milestones),  # the rate is multiplied by `gamma` at each
        gamma=0.5,
        weight_decay=1e-3,  # decoupled, scaled by the rate (PyTorch AdamW / Muon convention)
        b1=0.9,
        b2=0.99,
        eps=1e-10,  # the official MuonWithAuxAdam's Adam epsilon
        muon=True,  # 4-D conv kernels with Muon at muon_lr_scale x the rate; False: all Adam
        # "official": the muon-optimizer package's update (bfloat16 Newton-Schulz, no bias
        # correction); "optax": optax.contrib.muon. See iet_jax.training.optim.
        muon_variant="official",
        muon_lr_scale=muon_lr_scale,
        muon_momentum=0.95,
        grad_clip_norm=0.0,  # >0: clip gradients to this global norm
        grad_accum_steps=1,  # micro-batches per step (the global batch is split in these)
    ))
    config.ema_decay = 0.999  # 0 disables EMA (EMA weights then equal the parameters)
    # Where the weights start: a training workdir, a model dir or an official .pth ('' =
    # scratch). Parameters from its `params`, EMA from its `params_ema` (a workdir's params and
    # ema); a source holding one set starts both from it.
    config.init_from = init_from
    config.nonfinite = "stop"  # non-finite loss/gradients/new state: "stop" or "skip" (count)

    config.checkpoint_every = 1000
    config.keep_checkpoints = 3  # the latest N are kept, plus the best by validation PSNR
    config.async_checkpointing = True
    config.eval_every = 1000  # validation (EMA weights) and a checkpoint carrying its PSNR
    config.log_every = 100
    config.val_images_to_log = 3  # LR-bicubic / SR / HR triplets in TensorBoard

    # Device mesh (data, fsdp); -1 takes the remaining devices. The batch is split over
    # both axes; parameters and optimiser state are replicated or sharded over fsdp.
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
    config.param_sharding = "replicate"  # or "fsdp"
    # Multi-process runs (jax.distributed; see iet_jax.training.sharding.distributed_plan).
    # "auto" joins one when a coordinator, process count or id is given (here or in the
    # environment variable named) or a launcher is detected (SLURM, Open MPI, a Cloud TPU
    # pod, a Kubernetes Job); "on" always (refused when nothing says how); "off" never.
    config.distributed = ml_collections.ConfigDict(dict(
        mode="auto",
        coordinator_address="",  # HOST:PORT of process 0; '' -> $JAX_COORDINATOR_ADDRESS
        num_processes=0,  # 0 -> $JAX_NUM_PROCESSES, else the launcher's
        process_id=-1,  # 0..num_processes-1; -1 -> $JAX_PROCESS_ID, else the launcher's
        local_device_ids="",  # '0,1': this process's devices; '' -> $JAX_LOCAL_DEVICE_IDS
    ))
    return config


# ----------------------------------------------------------------------------- checks

# Model fields that decide the parameter shapes outside the upsampler: an initialisation
# checkpoint (init_from) must agree on them.
ARCHITECTURE_FIELDS = ("embed_dim", "nattn_dim", "depths", "num_heads", "convffn_kernel_size",
                       "mlp_ratio", "local_range", "upsampler")


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
    small_images = data.get("small_images", "error")
    if small_images not in ("error", "skip"):
        raise ConfigError(f"data.small_images must be 'error' or 'skip', got {small_images!r}")
    num_workers = data.get("num_workers", 0)
    if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 0:
        raise ConfigError(f"data.num_workers must be an integer >= 0 (0: no worker processes), "
                          f"got {num_workers!r}")
    if config.nonfinite not in ("stop", "skip"):
        raise ConfigError(f"nonfinite must be 'stop' or 'skip', got {config.nonfinite!r}")
    if config.param_sharding not in ("replicate", "fsdp"):
        raise ConfigError(f"param_sharding must be 'replicate' or 'fsdp', got "
                          f"{config.param_sharding!r}")
    check_learning_rate(config.optim)
    if config.optim.muon_variant not in optim_lib.MUON_VARIANTS:
        raise ConfigError(f"optim.muon_variant must be one of {optim_lib.MUON_VARIANTS}, got "
                          f"{config.optim.muon_variant!r}")
    if list(config.optim.milestones) != sorted(config.optim.milestones):
        raise ConfigError(f"optim.milestones must be increasing, got {config.optim.milestones}")
    check_init_from(config, model_cfg)
    return model_cfg


# The largest rate any parameter group may use. A step moves each weight by up to about the
# rate under Adam (its normalised update is at most about 1 per weight) and each kernel by
# about the rate in spectral norm under Muon (orthogonalised update), while IET's weights are of
# order 0.1 or less and the official rates are 2e-5 to 5e-4 (Muon's at most 3e-3): above 1,
# every step would move the weights by more than their size.
MAX_LEARNING_RATE = 1.0


def check_learning_rate(optim: ml_collections.ConfigDict) -> None:
    """The base rate must be finite and positive, and no group's rate above MAX_LEARNING_RATE
    (Muon's is `optim.muon_lr_scale` times the base rate)."""

    def number(value) -> float:
        try:
            return float(value)
        except (TypeError, ValueError):
            return math.nan

    scale = number(optim.muon_lr_scale) if optim.muon else 1.0
    if not (math.isfinite(scale) and scale > 0):
        raise ConfigError(f"optim.muon_lr_scale must be finite and positive, got "
                          f"{optim.muon_lr_scale!r}")
    top = MAX_LEARNING_RATE / scale
    rate = number(optim.learning_rate)
    if not (math.isfinite(rate) and 0 < rate <= top):
        why = (f" (Muon's rate, optim.muon_lr_scale = {scale:g} times it, may be at most "
               f"{MAX_LEARNING_RATE:g})" if optim.muon else "")
        raise ConfigError(f"optim.learning_rate must be finite with 0 < optim.learning_rate <= "
                          f"{top:g}{why}, got {optim.learning_rate!r}")


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
    source = read_json_object(config_file, "init_from: ", "restore it, or pass another "
                              "--config.init_from ('' trains from scratch)")
    diff = []
    for field in ARCHITECTURE_FIELDS:
        mine, theirs = model_cfg[field], source.get(field)
        if isinstance(mine, (tuple, list)):
            mine, theirs = list(mine), list(theirs) if theirs is not None else None
        if mine != theirs:
            diff.append(f"model.{field}: {theirs!r} in the checkpoint vs {mine!r} here")
    if diff:
        raise ConfigError(f"init_from: {path} holds another architecture:\n  " + "\n  ".join(diff))
    check_init_weights(directory)


def check_init_weights(directory: Path) -> None:
    """An `init_from` directory must hold weights: a training workdir a complete checkpoint,
    a model directory its params/."""
    fix = ("finish training that stage first (rerunning its command resumes it), or pass "
           "another --config.init_from ('' trains from scratch)")
    checkpoints = directory / workdir_lib.WORKDIR_CHECKPOINTS
    if checkpoints.is_dir():
        if not workdir_lib.workdir_steps(directory):
            raise ConfigError(f"init_from: the training workdir {directory} has no complete "
                              f"checkpoint yet (none in {checkpoints}); {fix}")
    elif not (directory / "params").is_dir():
        if (directory / workdir_lib.TRAIN_CONFIG_FILE).is_file():
            raise ConfigError(f"init_from: the training workdir {directory} has no checkpoint "
                              f"yet (no {workdir_lib.WORKDIR_CHECKPOINTS}/); {fix}")
        raise ConfigError(f"init_from: {directory} has a {stored.CONFIG_FILE} but no weights "
                          f"(neither params/ nor {workdir_lib.WORKDIR_CHECKPOINTS}/); pass a "
                          f"training workdir, a converted model directory or an official .pth")


def read_json_object(path: Path, prefix: str, fix: str) -> dict:
    """The JSON object in `path`; ConfigError naming the file and `fix` if it is unreadable,
    not JSON or not an object."""
    try:
        fields = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise ConfigError(f"{prefix}cannot read {path}: {e.strerror}; {fix}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{prefix}{path} is not UTF-8 text; {fix}") from e
    except json.JSONDecodeError as e:
        what = "is empty" if not e.doc.strip() else (
            f"is not valid JSON ({e.msg}, line {e.lineno} column {e.colno})")
        raise ConfigError(f"{prefix}{path} {what}; {fix}") from e
    if not isinstance(fields, dict):
        raise ConfigError(f"{prefix}{path} holds a JSON {type(fields).__name__}, not an object "
                          f"of config fields; {fix}")
    return fields


# ----------------------------------------------------------------------------- resuming

# Fields a rerun on a workdir that holds checkpoints may change: how long to train, what is
# logged, validated and kept, where the data lives and how many processes read it, and how the
# same computation is laid out on the devices (mesh, sharding, micro-batches,
# rematerialisation, gather kernels). Every
# other field (the model, seed, batch, data, patch, augmentation, optimiser, schedule, EMA)
# must equal the workdir's, so that the run continues exactly; `check_resume` refuses others.
RESUME_MAY_CHANGE = frozenset({
    "name", "settings", "num_steps", "eval_every", "log_every", "checkpoint_every",
    "keep_checkpoints", "async_checkpointing", "val_images_to_log", "nonfinite", "init_from",
    "data.data_dir", "data.val_dataset", "data.val_split", "data.val_max_images",
    "data.val_crop", "data.small_images", "data.num_workers", "optim.grad_accum_steps",
    "mesh.data", "mesh.fsdp", "param_sharding", "distributed", "model.remat", "model.gather_impl",
    "model.gather_deterministic", "model.depthwise_impl", "model.initial_attention",
})  # a group (e.g. "distributed") stands for all its fields


def may_change_on_resume(field: str) -> bool:
    """Whether a rerun may change `field` ('a.b.c'): it or a group holding it is in
    `RESUME_MAY_CHANGE`."""
    parts = field.split(".")
    return any(".".join(parts[:i]) in RESUME_MAY_CHANGE for i in range(1, len(parts) + 1))


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _show(value) -> str:
    return json.dumps(value, separators=(",", ":"))


def check_resume(config: ml_collections.ConfigDict, model_cfg, workdir: Path) -> None:
    """Refuse a config that does not fit the workdir's checkpoints (one line naming the fields
    that differ, old -> new, and the fix). Checked only when the workdir holds a checkpoint;
    the workdir's `config.json` decides the model fields, its `train_config.json` the others
    (and the model's when `config.json` is missing). Fields missing on either side (added or
    removed since the workdir was written) and `RESUME_MAY_CHANGE` are not compared."""
    workdir = Path(workdir)
    checkpoints = workdir / workdir_lib.WORKDIR_CHECKPOINTS
    try:
        has_steps = checkpoints.is_dir() and bool(workdir_lib.workdir_steps(workdir))
    except OSError as e:
        raise ConfigError(f"cannot read {checkpoints}: {e.strerror}") from e
    if not has_steps:
        return
    fix = (f"restore it, or delete it to have it written again from this config (the "
           f"checkpoints in {checkpoints} keep the weights)")
    new = _flatten(json.loads(config.to_json_best_effort()))
    old: dict = {}
    train_file = workdir / workdir_lib.TRAIN_CONFIG_FILE
    if train_file.is_file():
        old.update(_flatten(read_json_object(train_file, "", fix)))
    model_file = workdir / stored.CONFIG_FILE
    if model_file.is_file():
        old = {k: v for k, v in old.items() if not k.startswith("model.")}
        new = {k: v for k, v in new.items() if not k.startswith("model.")}
        old.update(_flatten(read_json_object(model_file, "", fix), "model."))
        new.update(_flatten(json.loads(stored.config_to_json(model_cfg)), "model."))
    keys = sorted(old, key=lambda k: (not k.startswith("model."), k))  # the model first
    diff = [f"{k} {_show(old[k])} -> {_show(new[k])}" for k in keys
            if k in new and not may_change_on_resume(k) and old[k] != new[k]]
    if diff:
        shown = ", ".join(diff[:12]) + (f" and {len(diff) - 12} more" if len(diff) > 12 else "")
        raise ConfigError(
            f"workdir {workdir} was trained with another config: {shown}; use a new "
            f"--workdir, or rerun with the workdir's values (its config is {train_file})")
