"""Weights and checkpoints on disk, read and written.

- `pth`: PyTorch `.pth` files read safely, without torch.
- `official`: the official code's state-dict key map, `.pth` -> model, and BasicSR option
  files -> model configs.
- `stored`: what model directories and training workdirs store alike (`config.json`,
  parameter trees with string keys), and `CheckpointError` for what cannot be loaded.
- `model_dir`: a model directory (`config.json` + `params/`): `save_model`, `load_model`
  (which also reads a training workdir's weights).
- `workdir`: the training workdir's checkpoints: written, listed, verified against their
  checksums and read (`Checkpoints`, `read_step`), the newest intact step as "latest".
- `files`: small files written atomically (`write_text_atomic`, `write_bytes_atomic`,
  `append_line`, `WriteError`).
- `lock`: the training workdir's lock (`WorkdirLock`): one trainer per workdir.
"""
