"""Training: from a config to a workdir of checkpoints.

- `config`: the official recipes, the full training config and the checks before a run.
- `recipes`: the recipe files that ship in the package (`--config iet_x4:eval`, `--config
  demo`), and how a `--config` value names one.
- `state`: the train state (parameters, EMA, optimiser state, counters), its creator and its
  EMA update.
- `optim`: the optimiser (Muon + Adam, as the official recipes) and the learning-rate schedule.
- `sharding`: the device mesh and the shardings of the batch and the state.
- `init`: where the weights start (`init_from`).
- `step`: the train step (gradient accumulation, update, EMA) and its jitted form.
- `validation`: PSNR/SSIM of the EMA weights during training.
- `metrics_log`: metrics.jsonl, TensorBoard and the progress bar.
- `loop`: `train_and_evaluate`, which runs all of the above, and its named parts
  (`prepare_run`, `restore_or_initialise`, `StepMonitor`, ...).
"""
