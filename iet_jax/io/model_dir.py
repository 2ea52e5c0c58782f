"""A model on disk: `config.json` (the model config) beside `params/` (an orbax checkpoint).

Written by `python -m iet_jax.convert` and read by everything that needs weights. Keeping the
config next to the parameters means a checkpoint always says which network it holds.
`load_model` also reads a training workdir (`iet_jax.io.workdir`).
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from iet_jax.io import workdir as workdir_lib
from iet_jax.io.stored import (CONFIG_FILE, check_tree, config_to_json, empty_model,
                               filled_model, with_int_keys, with_str_keys)
from iet_jax.model.network import IET

PARAMS_DIR = "params"


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
    if workdir_lib.is_training_workdir(directory):
        return workdir_lib.load_training_model(directory, dtype=dtype, which=which)
    config_path = directory / CONFIG_FILE
    if not config_path.is_file() or not (directory / PARAMS_DIR).is_dir():
        raise FileNotFoundError(
            f"{directory} is not an iet-jax model checkpoint (expected {CONFIG_FILE} and "
            f"{PARAMS_DIR}/); official .pth weights convert with python -m iet_jax.convert"
        )
    graphdef, state, target = empty_model(directory, dtype)
    with ocp.StandardCheckpointer() as checkpointer:
        stored = with_int_keys(checkpointer.restore(directory / PARAMS_DIR))
    check_tree(directory, target, stored)
    return filled_model(graphdef, state, target, stored)
