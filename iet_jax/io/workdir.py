"""The training workdir on disk: its checkpoints (orbax `CheckpointManager`), written and read.

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

`Checkpoints` saves and restores the train state as orbax items (the training loop turns its
state into them: `iet_jax.training.state.to_items`); `workdir_steps`, `workdir_step` and
`load_training_model` read a workdir's checkpoints back, e.g. for evaluation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from iet_jax.io.stored import (CONFIG_FILE, check_tree, empty_model, filled_model,
                               with_int_keys)
from iet_jax.model.network import IET

WORKDIR_CHECKPOINTS = "checkpoints"  # orbax CheckpointManager directory inside a workdir
WORKDIR_WEIGHTS = "ema"  # the checkpoint item evaluated (EMA of the parameters)
TRAIN_CONFIG_FILE = "train_config.json"
METRICS_FILE = "metrics.jsonl"
ARRAY_ITEMS = ("params", "ema", "opt_state", "train")
JSON_ITEMS = ("loader", "meta")


# ----------------------------------------------------------------------------- writing


class Checkpoints:
    """Save and restore train states, as orbax items, in `WORKDIR/checkpoints`."""

    def __init__(self, workdir: str | Path, keep: int = 3, async_save: bool = True,
                 keep_best: bool = True):
        self.directory = Path(workdir).absolute() / WORKDIR_CHECKPOINTS
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

    def save(self, items: dict[str, Any], loader_state: dict, meta: dict,
             metrics: dict | None = None) -> None:
        """Save the array `items` (one per name of ARRAY_ITEMS) with the loader state and meta."""
        step = int(meta["step"])
        args = {k: ocp.args.StandardSave(v) for k, v in items.items()}
        args["loader"] = ocp.args.JsonSave(loader_state)
        args["meta"] = ocp.args.JsonSave(meta)
        self.manager.save(step, args=ocp.args.Composite(**args), metrics=metrics, force=True)

    def restore(self, step: int, like: dict[str, Any]) -> tuple[dict[str, Any], dict, dict]:
        """(items, loader state, meta) of `step`, the items restored into the shapes, dtypes
        and shardings of `like` (items of arrays or abstract arrays)."""
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like)
        args = {k: ocp.args.StandardRestore(v) for k, v in target.items()}
        args["loader"] = ocp.args.JsonRestore()
        args["meta"] = ocp.args.JsonRestore()
        out = self.manager.restore(step, args=ocp.args.Composite(**args))
        items = {k: out[k] for k in ARRAY_ITEMS}
        return items, out["loader"], out["meta"]

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


# ----------------------------------------------------------------------------- reading


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
    graphdef, state, target = empty_model(directory, dtype)
    path = directory / WORKDIR_CHECKPOINTS / str(step) / item
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    # One item of a CheckpointManager step: read it with its handler. It was saved from a
    # device mesh; restore it onto one local device whatever that mesh was.
    handler = ocp.StandardCheckpointHandler()
    try:
        stored = handler.metadata(path).tree
        check_tree(directory, target, with_int_keys(stored))
        stored = handler.restore(path, args=ocp.args.StandardRestore(jax.tree_util.tree_map(
            lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device), stored)))
    finally:
        handler.close()
    return filled_model(graphdef, state, target, with_int_keys(stored))
