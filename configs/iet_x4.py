"""The packaged recipe `iet_x4` (`--config iet_x4` names it too): its one copy is
iet_jax/training/recipes/iet_x4.py, which this file loads."""

from iet_jax.training.recipes.iet_x4 import get_config  # noqa: F401
