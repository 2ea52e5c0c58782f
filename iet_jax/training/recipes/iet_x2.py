"""IET (classical) x2, first stage (the official 000_IET_SRx2_scratch; iet_x2_finetune
continues it): `--config iet_x2` (official training settings) or `--config iet_x2:eval`
(the settings the released checkpoint was evaluated with)."""

from iet_jax.training.config import recipe


def get_config(settings: str | None = None):
    return recipe("iet", 2, settings)
