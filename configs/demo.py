"""The packaged recipe `demo` (`--config demo` names it too): its one copy is
iet_jax/training/recipes/demo.py, which this file loads."""

from iet_jax.training.recipes.demo import get_config  # noqa: F401
