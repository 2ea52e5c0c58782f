"""The packaged recipe `iet_light_x2` (`--config iet_light_x2` names it too): its one copy is
iet_jax/training/recipes/iet_light_x2.py, which this file loads."""

from iet_jax.training.recipes.iet_light_x2 import get_config  # noqa: F401
