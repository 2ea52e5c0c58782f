"""The packaged recipe `iet_x4` (iet_jax/configs/iet_x4.py, its one copy):
this path and `--config iet_x4` load the same config."""

from iet_jax.configs.iet_x4 import get_config  # noqa: F401
