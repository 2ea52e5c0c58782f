"""The packaged recipe `iet_x2_finetune` (iet_jax/configs/iet_x2_finetune.py, its one copy):
this path and `--config iet_x2_finetune` load the same config."""

from iet_jax.configs.iet_x2_finetune import get_config  # noqa: F401
