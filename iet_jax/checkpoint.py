"""A model on disk: `config.json` (the model config) beside `params/` (an orbax checkpoint).

Written by `python -m iet_jax.convert` and read by everything that needs weights. Keeping the
config next to the parameters means a checkpoint always says which network it holds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from iet_jax.model import config as config_lib
from iet_jax.model import IET

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"


def config_to_json(config: ml_collections.ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True)


def config_from_json(text: str, **overrides: Any) -> ml_collections.ConfigDict:
    fields = json.loads(text)
    for key in ("depths", "topk_focus", "topk_prop_1", "topk_prop_2", "topk_prop_3"):
        if key in fields:
            fields[key] = tuple(tuple(v) if isinstance(v, list) else v for v in fields[key])
    return config_lib.model_config(**{**fields, **overrides})


def abstract_model(config: ml_collections.ConfigDict) -> IET:
    """The model with shapes and dtypes only: nothing is initialised or allocated."""
    return nnx.eval_shape(lambda: IET(config, rngs=nnx.Rngs(0)))


def save_model(directory: str | Path, model: IET, metadata: dict | None = None) -> Path:
    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    params = with_str_keys(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory / PARAMS_DIR, params, force=True)
    config = ml_collections.ConfigDict(model.config.to_dict())
    (directory / CONFIG_FILE).write_text(config_to_json(config))
    if metadata is not None:
        (directory / "source.json").write_text(json.dumps(metadata, indent=2, sort_keys=True))
    return directory


def load_model(directory: str | Path, dtype: str | None = None, which: str | int = "latest"
               ) -> IET:
    """Rebuild the model a checkpoint directory describes and fill in its parameters.

    `directory` is a model directory (config.json + params/) or a training workdir
    (`python -m iet_jax.train`); from a workdir the EMA weights of the `which` checkpoint
    ('latest', 'best' by validation PSNR, or a step number) are loaded.

    `dtype` ('float32', 'bfloat16', 'float64') overrides the stored compute dtype; parameters
    are then kept in float32 for bfloat16 and float64 for float64.
    """
    directory = Path(directory).absolute()
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {directory}")
    if is_training_workdir(directory):
        return load_training_model(directory, dtype=dtype, which=which)
    config_path = directory / CONFIG_FILE
    if not config_path.is_file() or not (directory / PARAMS_DIR).is_dir():
        raise FileNotFoundError(
            f"{directory} is not an iet-jax model checkpoint (expected {CONFIG_FILE} and "
            f"{PARAMS_DIR}/); official .pth weights convert with python -m iet_jax.convert"
        )
    graphdef, state, target = _empty_model(directory, dtype)
    with ocp.StandardCheckpointer() as checkpointer:
        stored = with_int_keys(checkpointer.restore(directory / PARAMS_DIR))
    _check_tree(directory, target, stored)
    return _filled(graphdef, state, target, stored)


def _empty_model(directory: Path, dtype: str | None):
    """(graphdef, state, pure-dict target) of the model `directory`/config.json describes."""
    overrides = {} if dtype is None else dtype_fields(dtype)
    config = config_from_json((directory / CONFIG_FILE).read_text(), **overrides)
    graphdef, state = nnx.split(abstract_model(config))
    return graphdef, state, nnx.to_pure_dict(state)


def _filled(graphdef, state, target, stored) -> IET:
    """The model with `stored` (already checked against `target`) cast to its dtypes."""
    restored = jax.tree_util.tree_map(
        lambda ref, value: jnp.asarray(value, ref.dtype), target, stored)
    nnx.replace_by_pure_dict(state, restored)
    return nnx.merge(graphdef, state)


def dtype_fields(dtype: str) -> dict[str, str]:
    """Config fields for a dtype given by name: bfloat16 computes on float32 parameters."""
    if dtype not in config_lib.DTYPES:
        raise ValueError(f"dtype must be one of {config_lib.DTYPES}, got {dtype!r}")
    return {"dtype": dtype, "param_dtype": "float32" if dtype == "bfloat16" else dtype}


def _check_tree(directory: Path, target: dict, stored: Any) -> None:
    """Refuse a checkpoint whose parameter tree does not fit the config, naming the entries."""
    want, have = _shapes_by_path(target), _shapes_by_path(stored)
    problems = [f"missing {k} {s}" for k, s in want.items() if k not in have]
    problems += [f"unexpected {k} {s}" for k, s in have.items() if k not in want]
    problems += [f"{k}: checkpoint {have[k]} vs config {s}" for k, s in want.items()
                 if k in have and have[k] != s]
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ValueError(
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


# ----------------------------------------------------------------------------- training workdirs

WORKDIR_CHECKPOINTS = "checkpoints"  # orbax CheckpointManager directory inside a workdir
WORKDIR_WEIGHTS = "ema"  # the checkpoint item evaluated (EMA of the parameters)


def is_training_workdir(directory: str | Path) -> bool:
    """A directory written by `python -m iet_jax.train` (config.json + checkpoints/)."""
    directory = Path(directory)
    return (directory / CONFIG_FILE).is_file() and (directory / WORKDIR_CHECKPOINTS).is_dir()


def workdir_steps(directory: str | Path) -> list[int]:
    """Complete checkpoints of a training workdir (unfinished saves are not listed)."""
    root = Path(directory) / WORKDIR_CHECKPOINTS
    steps = [int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit()
             and (p / "_CHECKPOINT_METADATA").is_file()]
    return sorted(steps)


def workdir_step(directory: str | Path, which: str | int = "latest") -> int:
    """The step of the 'latest' or 'best' (validation PSNR) checkpoint, or `which` itself."""
    directory = Path(directory).absolute()
    steps = workdir_steps(directory)
    if not steps:
        raise FileNotFoundError(f"training workdir {directory} has no complete checkpoint yet")
    if which == "latest":
        return steps[-1]
    if which == "best":
        scored = []
        for step in steps:
            meta = directory / WORKDIR_CHECKPOINTS / str(step) / "meta" / "metadata"
            try:
                psnr = json.loads(meta.read_text()).get("val_psnr")
            except (OSError, ValueError):
                psnr = None
            if psnr is not None:
                scored.append((psnr, step))
        if not scored:
            raise FileNotFoundError(f"no checkpoint of {directory} carries a validation PSNR")
        return max(scored)[1]
    step = int(which)
    if step not in steps:
        raise FileNotFoundError(f"training workdir {directory} has no checkpoint {step}; "
                                f"it has {steps}")
    return step


def load_training_model(directory: str | Path, dtype: str | None = None,
                        which: str | int = "latest", item: str = WORKDIR_WEIGHTS) -> IET:
    """The EMA weights (`item="params"`: the trained parameters) of a training checkpoint, in
    the model the workdir's config.json holds."""
    if item not in ("ema", "params"):
        raise ValueError(f"item must be 'ema' or 'params', got {item!r}")
    directory = Path(directory).absolute()
    step = workdir_step(directory, which)
    graphdef, state, target = _empty_model(directory, dtype)
    path = directory / WORKDIR_CHECKPOINTS / str(step) / item
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    # One item of a CheckpointManager step: read it with its handler. It was saved from a
    # device mesh; restore it onto one local device whatever that mesh was.
    handler = ocp.StandardCheckpointHandler()
    try:
        stored = handler.metadata(path).tree
        _check_tree(directory, target, with_int_keys(stored))
        stored = handler.restore(path, args=ocp.args.StandardRestore(jax.tree_util.tree_map(
            lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device), stored)))
    finally:
        handler.close()
    return _filled(graphdef, state, target, with_int_keys(stored))
