"""IET-light x3: `configs/iet_light_x3.py` (official training settings) or `configs/iet_light_x3.py:eval`
(the settings the released checkpoint was evaluated with)."""

from iet_jax.training.config import recipe


def get_config(settings: str | None = None):
    return recipe("iet_light", 3, settings)
