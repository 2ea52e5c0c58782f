"""The packaged recipe `iet_x2_finetune` (`--config iet_x2_finetune` names it too): its one copy is
iet_jax/training/recipes/iet_x2_finetune.py, which this file loads."""

from iet_jax.training.recipes.iet_x2_finetune import get_config  # noqa: F401
