"""Model configuration: defaults and the six official networks.

A model config is an ml_collections ConfigDict whose budget fields keep the official names
(`topk_focus`, `topk_prop_1/2/3`) so that option files and the paper's tables map one to one.
Official option files convert with `iet_jax.io.official.from_options_file`.

The released checkpoints were evaluated with `options/test/*.yml` ("eval" settings here) and
trained with `options/train/*.yml` ("train"). They differ in more than the dilation: the eval
settings also change some budgets (e.g. classical block 1 keeps 325 instead of 345).
"""

from __future__ import annotations

import copy
from typing import Any

import ml_collections

DTYPES = ("float32", "bfloat16", "float64")
UPSAMPLERS = ("pixelshuffle", "pixelshuffledirect")

_CLASSICAL = dict(
    embed_dim=240, nattn_dim=240, depths=(4,) * 8, num_heads=6, convffn_kernel_size=5,
    mlp_ratio=2.0, upsampler="pixelshuffle",
)
_LIGHT = dict(
    embed_dim=54, nattn_dim=60, depths=(3,) * 8, num_heads=3, convffn_kernel_size=7,
    mlp_ratio=1.0, upsampler="pixelshuffledirect",
)
_PROP_1 = (22, 20, 14, 12, 0, 0, 0, 0)
_PROP_2 = (12, 10, 7, 6, 0, 0, 0, 0)
_CLASSICAL_TRAIN_FOCUS = ((914, 914, 225, 225), (345, 225, 225, 125), (225, 125, 125, 125),
                          (185, 81, 81, 81), (121, 81, 81, 81), (64, 64, 64, 64),
                          (36, 36, 36, 36), (24, 24, 24, 24))
_CLASSICAL_EVAL_FOCUS = ((914, 914, 225, 225), (325, 225, 225, 125)) + _CLASSICAL_TRAIN_FOCUS[2:]
_LIGHT_TRAIN_FOCUS = ((914, 225, 225), (345, 225, 125), (225, 125, 125), (185, 81, 81),
                      (121, 81, 81), (64, 64, 64), (36, 36, 36), (36, 36, 36))


def _light_eval_focus(block1: int, block2: int):
    return (_LIGHT_TRAIN_FOCUS[0], (block1, 225, 125), (block2, 125, 125)) + _LIGHT_TRAIN_FOCUS[3:]


# (variant, scale, settings) -> network fields, transcribed from the official option files.
OFFICIAL_NETWORKS: dict[tuple[str, int, str], dict[str, Any]] = {}
for _s, _dil, _img in ((2, 2, 58), (3, 3, 82), (4, 2, 56)):
    OFFICIAL_NETWORKS["iet", _s, "train"] = dict(
        _CLASSICAL, scale=_s, dilation=_dil, img_size=_img, topk_focus=_CLASSICAL_TRAIN_FOCUS,
        topk_prop_3=(120, 100, 60, 40, 0, 0, 0, 0))
    OFFICIAL_NETWORKS["iet", _s, "eval"] = dict(
        _CLASSICAL, scale=_s, dilation=3, img_size=82, topk_focus=_CLASSICAL_EVAL_FOCUS,
        topk_prop_3=(100, 100, 60, 40, 0, 0, 0, 0))
for _s, _focus, _add in ((2, _light_eval_focus(325, 245), 100), (3, _light_eval_focus(325, 225), 100),
                         (4, _LIGHT_TRAIN_FOCUS, 120)):
    OFFICIAL_NETWORKS["iet_light", _s, "train"] = dict(
        _LIGHT, scale=_s, dilation=3, img_size=78, topk_focus=_LIGHT_TRAIN_FOCUS,
        topk_prop_3=(120, 100, 60, 40, 0, 0, 0, 0))
    OFFICIAL_NETWORKS["iet_light", _s, "eval"] = dict(
        _LIGHT, scale=_s, dilation=3, img_size=78, topk_focus=_focus,
        topk_prop_3=(_add, 100, 60, 40, 0, 0, 0, 0))

# Parameter counts of the official models (paper and `sum(p.numel())` of the released nets).
OFFICIAL_PARAMETER_COUNTS = {
    ("iet", 2): 19_669_149, ("iet", 3): 19_853_789, ("iet", 4): 19_816_861,
    ("iet_light", 2): 783_099, ("iet_light", 3): 790_404, ("iet_light", 4): 800_631,
}


def model_config(**fields: Any) -> ml_collections.ConfigDict:
    """A model config: official IET x4 eval settings, with `fields` overriding any entry."""
    cfg = dict(
        OFFICIAL_NETWORKS["iet", 4, "eval"],
        local_range=17,  # dense window side (r1)
        sparse_range=25,  # dilated window side (r2)
        topk_prop_1=_PROP_1,  # k1: best candidates whose own best ones are borrowed
        topk_prop_2=_PROP_2,  # k2: how many of each of those
        img_range=1.0,
        dtype="float32",  # compute dtype
        param_dtype="float32",
        gather_impl="auto",  # "auto" (GPU: pallas, else xla), "xla", "pallas"; see iet_jax.kernels
        # True: the gathers' backward sums in a fixed order (same bits every run, slower)
        # instead of atomic adds; matters for gather_impl "pallas" on GPU.
        gather_deterministic=False,
        merge="index",  # "index": official cut by token index; "rank": keep best first
        remat=False,  # rematerialise each block in the backward pass (training memory)
    )
    unknown = set(fields) - set(cfg)
    if unknown:
        raise ValueError(f"unknown model config fields {sorted(unknown)}; known: {sorted(cfg)}")
    cfg.update(fields)
    config = ml_collections.ConfigDict(cfg)
    validate(config)
    return config


def official(variant: str, scale: int, settings: str = "eval", **overrides: Any):
    """One of the six official networks; settings 'eval' (released checkpoints) or 'train'."""
    key = (variant, scale, settings)
    if key not in OFFICIAL_NETWORKS:
        raise ValueError(
            f"no official network {key}; choose variant in ('iet', 'iet_light'), scale in "
            f"(2, 3, 4) and settings in ('eval', 'train')"
        )
    return model_config(**{**copy.deepcopy(OFFICIAL_NETWORKS[key]), **overrides})


def validate(config: ml_collections.ConfigDict) -> None:
    """Refuse configs the network cannot run, naming the field."""
    if config.dtype not in DTYPES or config.param_dtype not in DTYPES:
        raise ValueError(f"dtype and param_dtype must be among {DTYPES}")
    if config.upsampler not in UPSAMPLERS:
        raise ValueError(f"upsampler {config.upsampler!r} is not supported; use one of {UPSAMPLERS}")
    if config.upsampler == "pixelshuffle" and config.scale not in (2, 3, 4, 8):
        raise ValueError(f"scale {config.scale} needs upsampler 'pixelshuffledirect'")
    if config.scale < 1:
        raise ValueError(f"scale must be a positive integer, got {config.scale}")
    for name in ("local_range", "sparse_range"):
        if getattr(config, name) % 2 != 1:
            raise ValueError(f"{name} must be odd, got {getattr(config, name)}")
    if len(config.topk_focus) != len(config.depths) or any(
        len(f) != d for f, d in zip(config.topk_focus, config.depths)
    ):
        raise ValueError("topk_focus must have one budget per layer of every block (see depths)")
    for name in ("embed_dim", "nattn_dim"):
        if getattr(config, name) % config.num_heads:
            raise ValueError(f"{name} ({getattr(config, name)}) must divide by num_heads")


def dtype_fields(dtype: str) -> dict[str, str]:
    """Config fields for a dtype given by name: bfloat16 computes on float32 parameters."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    return {"dtype": dtype, "param_dtype": "float32" if dtype == "bfloat16" else dtype}


# ----------------------------------------------------------------------------- training recipes

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
    """The top-level config of an official recipe: `configs/<name>.py[:train|:eval]`.

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
    model = official(variant, scale, settings, remat=entry.pop("remat"),
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
        # correction); "optax": optax.contrib.muon. See iet_jax.optim.
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
    config.nonfinite = "stop"  # non-finite loss/gradients: "stop" or "skip" (and count)

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
    # Multi-process: "auto" initialises jax.distributed when the environment describes
    # several processes (SLURM, Open MPI, JAX_COORDINATOR_ADDRESS, ...); "on" / "off".
    config.distributed = "auto"
    return config
