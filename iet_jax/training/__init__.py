"""Training: from a config to a workdir of checkpoints.

- `config`: the official recipes, the full training config and the checks before a run.
- `state`: the train state (parameters, EMA, optimiser state, counters) and its EMA update.
- `optim`: the optimiser (Muon + Adam, as the official recipes) and the learning-rate schedule.
- `sharding`: the device mesh and the shardings of the batch and the state.
- `init`: where the weights start (`init_from`).
- `step`: the jitted train step.
- `validation`: PSNR/SSIM of the EMA weights during training.
- `metrics_log`: metrics.jsonl, TensorBoard and the progress bar.
- `loop`: `train_and_evaluate`, which runs all of the above.
"""
