"""Train state and the training workdir's checkpoints (orbax `CheckpointManager`).

A workdir written by `python -m iet_jax.train`:

    WORKDIR/config.json           the model config (same format as a model directory's)
    WORKDIR/train_config.json     the full training config
    WORKDIR/checkpoints/<step>/   params, ema, opt_state, train (step, rng, skipped),
                                  loader (input position, JSON), meta (JSON: val PSNR, ...)
    WORKDIR/metrics.jsonl         one JSON record per log / validation event
    WORKDIR/tensorboard/          TensorBoard events (when tensorboardX is installed)

Saves are asynchronous and atomic: a step directory appears under its final name only once
complete, so a run killed at any moment (even during a save) restarts from the last complete
checkpoint. The latest `keep` checkpoints are kept, plus the best by validation PSNR.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import flax.struct
import jax
import numpy as np
import orbax.checkpoint as ocp

from iet_jax import checkpoint as checkpoint_lib

CHECKPOINT_DIR = checkpoint_lib.WORKDIR_CHECKPOINTS
TRAIN_CONFIG_FILE = "train_config.json"
METRICS_FILE = "metrics.jsonl"
ARRAY_ITEMS = ("params", "ema", "opt_state", "train")
JSON_ITEMS = ("loader", "meta")


@flax.struct.dataclass
class TrainState:
    """Everything a train step reads and writes. `params`/`ema` are nested dicts with string
    keys (the form orbax stores); `opt_state` is optax's state for `params`."""

    step: jax.Array  # int32: updates applied so far
    params: Any
    ema: Any
    opt_state: Any
    rng: jax.Array  # uint32 key data (reserved for stochastic training; saved and restored)
    skipped: jax.Array  # int32: steps skipped for non-finite loss/gradients


def to_items(state: TrainState) -> dict[str, Any]:
    """The state as orbax items; optax's state is stored as its list of leaves."""
    leaves = jax.tree.leaves(state.opt_state)
    return {
        "params": state.params,
        "ema": state.ema,
        "opt_state": {f"{i:05d}": leaf for i, leaf in enumerate(leaves)},
        "train": {"step": state.step, "rng": state.rng, "skipped": state.skipped},
    }


def from_items(items: dict[str, Any], like: TrainState) -> TrainState:
    treedef = jax.tree.structure(like.opt_state)
    leaves = [items["opt_state"][k] for k in sorted(items["opt_state"])]
    return TrainState(step=items["train"]["step"], params=items["params"], ema=items["ema"],
                      opt_state=jax.tree.unflatten(treedef, leaves), rng=items["train"]["rng"],
                      skipped=items["train"]["skipped"])


class Checkpoints:
    """Save and restore train states in `WORKDIR/checkpoints`."""

    def __init__(self, workdir: str | Path, keep: int = 3, async_save: bool = True,
                 keep_best: bool = True):
        self.directory = Path(workdir).absolute() / CHECKPOINT_DIR
        policies = [ocp.checkpoint_managers.LatestN(max(1, keep))]
        if keep_best:
            policies.append(ocp.checkpoint_managers.BestN(
                get_metric_fn=lambda m: m["psnr"], n=1, keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=ARRAY_ITEMS + JSON_ITEMS)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, state: TrainState, loader_state: dict, meta: dict,
             metrics: dict | None = None) -> None:
        step = int(meta["step"])
        args = {k: ocp.args.StandardSave(v) for k, v in to_items(state).items()}
        args["loader"] = ocp.args.JsonSave(loader_state)
        args["meta"] = ocp.args.JsonSave(meta)
        self.manager.save(step, args=ocp.args.Composite(**args), metrics=metrics, force=True)

    def restore(self, step: int, like: TrainState) -> tuple[TrainState, dict, dict]:
        """Restore into the shapes, dtypes and shardings of `like` (arrays or abstract)."""
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
            to_items(like))
        args = {k: ocp.args.StandardRestore(v) for k, v in target.items()}
        args["loader"] = ocp.args.JsonRestore()
        args["meta"] = ocp.args.JsonRestore()
        out = self.manager.restore(step, args=ocp.args.Composite(**args))
        items = {k: out[k] for k in ARRAY_ITEMS}
        return from_items(items, like), out["loader"], out["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(state: TrainState, shardings) -> TrainState:
    """ShapeDtypeStructs with the given shardings (a tree like `state`)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        state, shardings)


def ema_update(ema, params, decay: float):
    """ema <- decay * ema + (1 - decay) * params (BasicSR's `model_ema`)."""
    return jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p).astype(e.dtype),
                        ema, params)


def write_json(path: Path, value: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True, default=_json_default))
    tmp.replace(path)


def _json_default(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, (tuple, set)):
        return list(x)
    raise TypeError(f"not JSON serialisable: {type(x)}")
