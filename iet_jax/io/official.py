"""The official PyTorch IET, read: its key map, its `.pth` weights and its option files.

`load_official(options, checkpoint, dtype='float32')` returns the ready model for an official
option file (.yml) and `.pth`; `from_options_file` / `from_network_g` turn an option file's
`network_g` section into a model config; `official_keys` / `official_shapes` map every
official state-dict key to our parameter path and layout; `load_state_dict` fills a model from
an official state dict.

`.pth` files are read by `iet_jax.io.pth` without torch and without running any code from the
file. Every official key must be used and every parameter filled; otherwise the error lists
the keys and shapes that do not match.

The key map and layout conversions, as tables: docs/conventions.md.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, NamedTuple

import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from iet_jax.conventions.text import printable
from iet_jax.io import pth
from iet_jax.model import config as config_lib
from iet_jax.model.network import IET, Bottleneck, SimilarityFFN, abstract_model


class _Rule(NamedTuple):
    """How one official tensor becomes ours, and the official shape of one of ours."""

    official_leaf: str
    to_ours: Callable[[np.ndarray], np.ndarray]
    official_shape: Callable[[tuple], tuple]


def _same(x):
    return x


_BIAS = _Rule("bias", _same, _same)
# Linear weight (out, in) -> kernel (in, out); Conv2d (O, I, kh, kw) -> (kh, kw, I, O).
_LINEAR = {"kernel": _Rule("weight", lambda w: w.T, lambda s: s[::-1]), "bias": _BIAS}
_CONV = {"kernel": _Rule("weight", lambda w: w.transpose(2, 3, 1, 0),
                         lambda s: (s[3], s[2], s[0], s[1])), "bias": _BIAS}
_NORM = {"scale": _Rule("weight", _same, _same), "bias": _BIAS}
_RPB = {"rpb": _Rule("relative_position_bias", _same, _same)}


def _modules(model: IET) -> Iterator[tuple[tuple, str, dict]]:
    """(our module path, official module name, leaf rules) for every parametrised module."""
    yield ("conv_first",), "conv_first", _CONV
    yield ("patch_norm",), "patch_embed.norm", _NORM
    for b, block in enumerate(model.blocks):
        ours, theirs = ("blocks", b), f"layers.{b}"
        for l, layer in enumerate(block.layers):
            o, t = ours + ("layers", l), f"{theirs}.residual_group.layers.{l}"
            yield o + ("norm1",), f"{t}.norm1", _NORM
            yield o + ("wqkv",), f"{t}.wqkv", _LINEAR
            yield o + ("lepe", "conv"), f"{t}.v_LePE.depthwise_conv.0", _CONV
            if layer.rpb is not None:
                yield o, f"{t}.attn_win", _RPB
            yield o + ("proj",), f"{t}.attn_win.proj", _LINEAR
            yield o + ("norm2",), f"{t}.norm2", _NORM
            f = o + ("ffn",)
            if isinstance(layer.ffn, SimilarityFFN):
                yield o + ("norm3",), f"{t}.norm3", _NORM
                yield f + ("fc0",), f"{t}.convffn.fc0", _LINEAR
                yield f + ("dwconv0", "conv"), f"{t}.convffn.dwconv0.depthwise_conv.0", _CONV
                f, dwconv = f + ("ffn",), "dwconv1"
            else:
                dwconv = "dwconv"
            yield f + ("fc1",), f"{t}.convffn.fc1", _LINEAR
            yield f + ("dwconv", "conv"), f"{t}.convffn.{dwconv}.depthwise_conv.0", _CONV
            yield f + ("fc2",), f"{t}.convffn.fc2", _LINEAR
        if isinstance(block.conv, Bottleneck):
            for i in range(3):
                yield ours + ("conv", f"conv{i}"), f"{theirs}.conv.{2 * i}", _CONV
        else:
            yield ours + ("conv",), f"{theirs}.conv.0", _CONV
    yield ("norm",), "norm", _NORM
    yield ("conv_after_body",), "conv_after_body", _CONV
    up = model.upsample
    if up.direct:
        yield ("upsample", "stages", 0), "upsample.0", _CONV
    else:
        yield ("upsample", "conv_before"), "conv_before_upsample.0", _CONV
        for i in range(len(up.stages)):
            yield ("upsample", "stages", i), f"upsample.{2 * i}", _CONV
        yield ("upsample", "conv_last"), "conv_last", _CONV


def official_keys(model: IET) -> dict[str, tuple[tuple, _Rule]]:
    """official key -> (our parameter path, rule)."""
    keys = {}
    for ours, theirs, rules in _modules(model):
        for leaf, rule in rules.items():
            keys[f"{theirs}.{rule.official_leaf}"] = (ours + (leaf,), rule)
    return keys


def official_shapes(model: IET) -> dict[str, tuple[int, ...]]:
    """The official state dict's keys and shapes for this model (what a .pth must hold)."""
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return {key: tuple(rule.official_shape(tuple(param_at(params, path).shape)))
            for key, (path, rule) in official_keys(model).items()}


def param_at(tree, path):
    """The leaf at `path` (a tuple of keys) of a nested dict of parameters."""
    for p in path:
        tree = tree[p]
    return tree


def load_state_dict(model: IET, state_dict: dict[str, np.ndarray]) -> IET:
    """A copy of `model` (concrete or abstract) holding an official state dict's weights.

    Every official key must be used and every parameter filled, with matching shapes.
    """
    keys = official_keys(model)
    expected = official_shapes(model)
    missing = sorted(set(keys) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(keys))
    wrong = sorted(k for k in keys if k in state_dict
                   and tuple(np.shape(state_dict[k])) != expected[k])
    if missing or unexpected or wrong:
        raise ValueError(_mismatch_message(model, state_dict, expected, missing, unexpected, wrong))
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    for key, (path, rule) in keys.items():
        parent = param_at(params, path[:-1])
        value = rule.to_ours(np.asarray(state_dict[key]))
        parent[path[-1]] = jnp.asarray(value, dtype=parent[path[-1]].dtype)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def guess_scale(state_dict: dict[str, np.ndarray]) -> int | None:
    """The upscaling factor an official state dict was trained for, from its upsampler."""
    if "conv_before_upsample.0.weight" not in state_dict:
        w = state_dict.get("upsample.0.weight")
        return None if w is None else int(round(math.sqrt(w.shape[0] / 3)))
    if "upsample.2.weight" in state_dict:
        return 4
    w = state_dict.get("upsample.0.weight")
    return None if w is None else int(round(math.sqrt(w.shape[0] / w.shape[1])))


def _mismatch_message(model, state_dict, expected, missing, unexpected, wrong) -> str:
    lines = [f"the checkpoint does not fit the config ({len(missing)} missing, "
             f"{len(unexpected)} unexpected, {len(wrong)} of the wrong shape):"]
    lines += [f"  missing    {k} {expected[k]}" for k in missing[:15]]
    lines += [f"  unexpected {k} {tuple(np.shape(state_dict[k]))}" for k in unexpected[:15]]
    lines += [f"  shape      {k}: checkpoint {tuple(np.shape(state_dict[k]))}, config "
              f"{expected[k]}" for k in wrong[:15]]
    if max(len(missing), len(unexpected), len(wrong)) > 15:
        lines.append("  ... (first 15 of each shown)")
    scale = guess_scale(state_dict)
    if scale is not None and scale != model.config.scale:
        lines.append(f"the checkpoint is a x{scale} model but the config is x{model.config.scale}: "
                     f"use the option file that belongs to the checkpoint")
    else:
        lines.append("use the option file the checkpoint was trained or released with")
    return "\n".join(lines)


def load_official(options: str | Path, checkpoint_path: str | Path,
                  dtype: str = "float32") -> IET:
    """Official option file + .pth -> a ready model, called as model(x) on NHWC [0, 1] images."""
    model, _ = convert_official(options, checkpoint_path, dtype)
    return model


def convert_official(options: str | Path, checkpoint_path: str | Path, dtype: str = "float32"
                     ) -> tuple[IET, str | None]:
    """(model, the state-dict key its weights came from) for an option file and a .pth."""
    config = from_options_file(options, **config_lib.dtype_fields(dtype))
    state_dict, which = pth.select_state_dict(pth.load_pth(checkpoint_path))
    try:
        model = load_state_dict(abstract_model(config), state_dict)
    except ValueError as e:
        raise ValueError(f"{checkpoint_path} with {options}: {e}") from None
    return model, which


# ----------------------------------------------------------------------------- option files

_UNSUPPORTED = {
    "ape": (False,), "patch_norm": (True,), "resi_connection": ("1conv",), "in_chans": (3,),
    "patch_size": (1,), "qkv_bias": (True,),
}
_IGNORED = {"type", "use_checkpoint"}  # rematerialisation is a training option here
_ALIASES = {"upscale": "scale", "cur_dim": "nattn_dim", "natten_dim": "nattn_dim"}


def from_network_g(network_g: Mapping[str, Any], **overrides: Any) -> ml_collections.ConfigDict:
    """Turn the `network_g` section of an official BasicSR option file into a model config."""
    if network_g.get("type", "IET") != "IET":
        raise ValueError(f"network_g.type is {network_g['type']!r}; only 'IET' converts")
    fields: dict[str, Any] = {}
    for key, value in network_g.items():
        if key in _IGNORED:
            continue
        if key in _UNSUPPORTED:
            if value not in _UNSUPPORTED[key]:
                raise ValueError(f"network_g.{key} = {value!r} is not supported by iet-jax")
            continue
        name = _ALIASES.get(key, key)
        if isinstance(value, list):
            value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        fields[name] = value
    if isinstance(fields.get("depths"), int):
        fields["depths"] = (fields["depths"],)
    fields["mlp_ratio"] = float(fields.get("mlp_ratio", 2.0))
    fields["img_range"] = float(fields.get("img_range", 1.0))
    return config_lib.model_config(**{**fields, **overrides})


def from_options_file(path: str | Path, **overrides: Any) -> ml_collections.ConfigDict:
    """Read an official option file (.yml) and convert its `network_g` section."""
    import yaml

    path = Path(path)
    shown = printable(str(path), 500)
    if path.is_dir():
        raise ValueError(f"{shown} is a folder, not an option file; give the official "
                         f"options/test/*.yml of the checkpoint")
    if not path.is_file():
        raise FileNotFoundError(f"official option file not found: {shown}")
    try:
        with path.open() as f:
            options = yaml.safe_load(f)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        reason = e.strerror if isinstance(e, OSError) else str(e).splitlines()[0]
        raise ValueError(f"cannot read {shown} as YAML ({printable(reason)}); give the "
                         f"official options/test/*.yml of the checkpoint") from e
    if not isinstance(options, dict) or "network_g" not in options:
        raise ValueError(f"{shown} has no network_g section; is it a BasicSR option file?")
    network_g = options["network_g"]
    if not isinstance(network_g, dict):
        raise ValueError(f"{shown}: network_g is a {type(network_g).__name__}, not the mapping "
                         f"of network fields a BasicSR option file has (type: IET, upscale: "
                         f"..., embed_dim: ...)")
    try:
        return from_network_g(network_g, **overrides)
    except (TypeError, KeyError, AttributeError) as e:  # a field of the wrong kind
        raise ValueError(f"{shown}: network_g is not an IET network ({printable(str(e))})"
                         ) from e
