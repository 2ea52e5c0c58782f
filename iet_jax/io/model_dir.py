"""A model on disk: `config.json` (the model config) beside `params/` (an orbax checkpoint).

Written by `python -m iet_jax.convert` and read by everything that needs weights. Keeping the
config next to the parameters means a checkpoint always says which network it holds.
`load_model` also reads a training workdir (`iet_jax.io.workdir`). A checkpoint that cannot be
loaded (no model in the directory, a workdir without a complete checkpoint, a `config.json`
that is not a model config, unreadable parameters) raises `CheckpointError`, whose message is
one line naming the file and the fix (a parameter tree that does not fit its config lists the
differences, one per line).
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from iet_jax.io import workdir as workdir_lib
from iet_jax.io.stored import (CONFIG_FILE, CheckpointError, CheckpointMissingError, check_tree,
                               config_to_json, empty_model, filled_model, with_int_keys,
                               with_str_keys)
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

    A checkpoint that cannot be loaded raises `CheckpointError` (a ValueError), one line naming
    the file and the fix; `CheckpointMissingError` (also a FileNotFoundError) when there is
    none where one was asked for.
    """
    directory = Path(directory).absolute()
    if not directory.is_dir():
        if directory.exists():
            raise CheckpointMissingError(
                f"{directory} is a file, not a model directory (config.json + params/); "
                f"official .pth weights convert to one with python -m iet_jax.convert")
        raise CheckpointMissingError(
            f"checkpoint directory not found: {directory}; give a model directory (written by "
            f"python -m iet_jax.convert) or a training workdir")
    if workdir_lib.is_training_workdir(directory):
        return _load_from_workdir(directory, dtype, which)
    config_path = directory / CONFIG_FILE
    params = directory / PARAMS_DIR
    if not config_path.is_file() or not params.is_dir():
        if (directory / workdir_lib.TRAIN_CONFIG_FILE).is_file():
            raise CheckpointMissingError(
                f"the training workdir {directory} has no checkpoint yet (no "
                f"{workdir_lib.WORKDIR_CHECKPOINTS}/); training saves one every "
                f"checkpoint_every steps and at its end: wait for one, or load another "
                f"checkpoint")
        missing = " and ".join(name for name, there in (
            (CONFIG_FILE, config_path.is_file()), (PARAMS_DIR + "/", params.is_dir()))
            if not there)
        raise CheckpointMissingError(
            f"{directory} is not an iet-jax model checkpoint: it has no {missing} (a model "
            f"directory holds {CONFIG_FILE} and {PARAMS_DIR}/, a training workdir "
            f"{CONFIG_FILE} and {workdir_lib.WORKDIR_CHECKPOINTS}/); official .pth weights "
            f"convert with python -m iet_jax.convert")
    graphdef, state, target = empty_model(directory, dtype)
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            stored = with_int_keys(checkpointer.restore(params))
    except MemoryError:
        raise
    except Exception as e:  # orbax and tensorstore raise many kinds
        raise CheckpointError(
            f"cannot read the parameters in {params} ({_first_line(e)}): they are incomplete "
            f"or damaged; save or convert the model again") from e
    check_tree(directory, target, stored)
    return filled_model(graphdef, state, target, stored)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def _load_from_workdir(directory: Path, dtype: str | None, which: str | int) -> IET:
    """`workdir.load_training_model`; anything orbax raises becomes a CheckpointError."""
    try:
        return workdir_lib.load_training_model(directory, dtype=dtype, which=which)
    except (CheckpointError, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - orbax and tensorstore raise many kinds
        raise CheckpointError(f"cannot read the checkpoint {which} of the training workdir "
                              f"{directory} ({_first_line(e)})") from e
