"""Where a run's weights start (`init_from`): a training workdir, a model directory or an
official `.pth`, read as BasicSR does (parameters from the source's `params`, EMA from its
`params_ema`; a source with one set starts both from it).
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from iet_jax.io import model_dir, official, pth, stored
from iet_jax.io import workdir as workdir_lib
from iet_jax.model.network import abstract_model
from iet_jax.training.config import ConfigError


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
        try:
            step = workdir_lib.read_step(source)
        except stored.CheckpointError as e:
            raise ConfigError(f"init_from: {e}") from e
        return (_flat(step.items["params"]), _flat(step.items["ema"]),
                f"parameters and EMA of its step {step.step}")
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
