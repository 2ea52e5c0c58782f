"""IET-light x4: `--config iet_light_x4` (official training settings) or
`--config iet_light_x4:eval` (the settings the released checkpoint was evaluated with)."""

from iet_jax.training.config import recipe


def get_config(settings: str | None = None):
    return recipe("iet_light", 4, settings)
