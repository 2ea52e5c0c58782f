"""The packaged recipe `iet_x2` (iet_jax/configs/iet_x2.py, its one copy):
this path and `--config iet_x2` load the same config."""

from iet_jax.configs.iet_x2 import get_config  # noqa: F401
