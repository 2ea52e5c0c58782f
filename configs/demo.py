"""The packaged recipe `demo` (iet_jax/configs/demo.py, its one copy):
this path and `--config demo` load the same config."""

from iet_jax.configs.demo import get_config  # noqa: F401
