"""The packaged recipe `iet_x3` (`--config iet_x3` names it too): its one copy is
iet_jax/training/recipes/iet_x3.py, which this file loads."""

from iet_jax.training.recipes.iet_x3 import get_config  # noqa: F401
