"""Model configuration: defaults and the six official networks.

A model config is an ml_collections ConfigDict whose budget fields keep the official names
(`topk_focus`, `topk_prop_1/2/3`) so that option files and the paper's tables map one to one.
Official option files convert with `iet_jax.io.official.from_options_file`; the training
recipes, which hold a model config, are in `iet_jax.training.config`.

The released checkpoints were evaluated with `options/test/*.yml` ("eval" settings here) and
trained with `options/train/*.yml` ("train"). They differ in more than the dilation: the eval
settings also change some budgets (e.g. classical block 1 keeps 325 instead of 345).
"""

from __future__ import annotations

import copy
from typing import Any

import ml_collections

from iet_jax.kernels.gather import IMPLEMENTATIONS as GATHER_IMPLEMENTATIONS

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
        # "auto" (GPU: pallas; CPU: native where built, else xla), "xla", "native", "pallas";
        # see iet_jax.kernels.gather.
        gather_impl="auto",
        # True: the gathers' backward sums in a fixed order (same bits every run, slower)
        # instead of atomic adds; matters for gather_impl "pallas" on GPU.
        gather_deterministic=False,
        # Depthwise convs (LePE, FFNs): "auto" (CPU: shifted multiply-adds, else one grouped
        # conv), "conv", "shifted"; the same sums in another order (iet_jax.model.network).
        depthwise_impl="auto",
        # The layers on the initial window lists (block 0 until a layer prunes): "gather"
        # (the lists through gather_impl), "tiled" (the windows as tiled matrix products) or
        # "auto" (per platform, iet_jax.model.attention.INITIAL_AUTO); the same sums.
        initial_attention="auto",
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
    if config.depthwise_impl not in ("auto", "conv", "shifted"):
        raise ValueError(f"depthwise_impl must be 'auto', 'conv' or 'shifted', got "
                         f"{config.depthwise_impl!r}")
    if config.gather_impl not in GATHER_IMPLEMENTATIONS:
        raise ValueError(f"gather_impl must be one of {GATHER_IMPLEMENTATIONS}, got "
                         f"{config.gather_impl!r}")
    if config.initial_attention not in ("auto", "gather", "tiled"):
        raise ValueError(f"initial_attention must be 'auto', 'gather' or 'tiled', got "
                         f"{config.initial_attention!r}")
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
