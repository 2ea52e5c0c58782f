"""The packaged recipe `iet_light_x2` (iet_jax/configs/iet_light_x2.py, its one copy):
this path and `--config iet_light_x2` load the same config."""

from iet_jax.configs.iet_light_x2 import get_config  # noqa: F401
