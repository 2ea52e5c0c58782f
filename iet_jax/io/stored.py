"""What model directories and training workdirs store alike.

Both hold the model config as `config.json` beside parameter trees that orbax wrote from nested
dicts with string keys. This module reads and writes that config, converts between the model's
parameter dicts (integer keys for `nnx.List` entries) and the stored form, and builds the model
a `config.json` describes before its stored parameters are checked against it and filled in.
A checkpoint that cannot be loaded raises `CheckpointError`, naming the file and the fix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from iet_jax.model import config as config_lib
from iet_jax.model.network import IET, abstract_model

CONFIG_FILE = "config.json"
# What a config.json that cannot be read needs.
_CONFIG_FIX = ("restore it, or write the model again (python -m iet_jax.convert writes model "
               "directories, python -m iet_jax.train workdirs)")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the fix."""


class CheckpointMissingError(CheckpointError, FileNotFoundError):
    """No checkpoint where one was asked for (also a FileNotFoundError, as it always was)."""


def config_to_json(config: ml_collections.ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True)


def config_from_json(text: str, **overrides: Any) -> ml_collections.ConfigDict:
    fields = json.loads(text)
    for key in ("depths", "topk_focus", "topk_prop_1", "topk_prop_2", "topk_prop_3"):
        if key in fields:
            fields[key] = tuple(tuple(v) if isinstance(v, list) else v for v in fields[key])
    return config_lib.model_config(**{**fields, **overrides})


def read_config(directory: Path, **overrides: Any) -> ml_collections.ConfigDict:
    """The model config in `directory`/config.json; CheckpointError naming the file if it
    cannot be read, is not JSON, or is not a model config."""
    path = Path(directory) / CONFIG_FILE
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
        raise CheckpointError(f"cannot read {path}: {why}; {_CONFIG_FIX}") from e
    try:
        fields = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e.msg}, line {e.lineno} column "
                              f"{e.colno}); {_CONFIG_FIX}") from e
    if not isinstance(fields, dict):
        raise CheckpointError(f"{path} holds a JSON {type(fields).__name__}, not the object of "
                              f"model config fields; {_CONFIG_FIX}")
    try:
        return config_from_json(text, **overrides)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise CheckpointError(f"{path} is not a valid model config ({e}); {_CONFIG_FIX}") from e


def empty_model(directory: Path, dtype: str | None):
    """(graphdef, state, pure-dict target) of the model `directory`/config.json describes."""
    overrides = {} if dtype is None else config_lib.dtype_fields(dtype)
    config = read_config(directory, **overrides)
    try:
        model = abstract_model(config)
    except Exception as e:  # a config that passes the checks but builds no network
        text = str(e).strip().splitlines()
        raise CheckpointError(
            f"{Path(directory) / CONFIG_FILE} describes a model that cannot be built "
            f"({type(e).__name__}: {text[0] if text else ''}); {_CONFIG_FIX}") from e
    graphdef, state = nnx.split(model)
    return graphdef, state, nnx.to_pure_dict(state)


def filled_model(graphdef, state, target, stored) -> IET:
    """The model with `stored` (already checked against `target`) cast to its dtypes."""
    restored = jax.tree_util.tree_map(
        lambda ref, value: jnp.asarray(value, ref.dtype), target, stored)
    nnx.replace_by_pure_dict(state, restored)
    return nnx.merge(graphdef, state)


def check_tree(directory: Path, target: dict, stored: Any) -> None:
    """Refuse a checkpoint whose parameter tree does not fit the config, naming the entries."""
    want, have = _shapes_by_path(target), _shapes_by_path(stored)
    problems = [f"missing {k} {s}" for k, s in want.items() if k not in have]
    problems += [f"unexpected {k} {s}" for k, s in have.items() if k not in want]
    problems += [f"{k}: checkpoint {have[k]} vs config {s}" for k, s in want.items()
                 if k in have and have[k] != s]
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise CheckpointError(
            f"the parameters in {directory} do not fit its {CONFIG_FILE}:\n  {shown}{more}")


def _shapes_by_path(tree) -> dict[str, tuple[int, ...]]:
    """'blocks/0/layers/1/wqkv/kernel' -> shape."""
    return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def with_str_keys(tree):
    """Integer keys (nnx.List indices) as strings, the form orbax stores."""
    if not isinstance(tree, dict):
        return tree
    return {str(k): with_str_keys(v) for k, v in tree.items()}


def with_int_keys(tree):
    """Undo `with_str_keys` on a restored nested dict."""
    if not isinstance(tree, dict):
        return tree
    return {int(k) if isinstance(k, str) and k.isdigit() else k: with_int_keys(v)
            for k, v in tree.items()}
