"""The packaged recipe `iet_x3` (iet_jax/configs/iet_x3.py, its one copy):
this path and `--config iet_x3` load the same config."""

from iet_jax.configs.iet_x3 import get_config  # noqa: F401
