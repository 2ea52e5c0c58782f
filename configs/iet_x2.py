"""IET (classical) x2, first stage (the official 000_IET_SRx2_scratch; configs/iet_x2_finetune.py
continues it): `configs/iet_x2.py` (official training settings) or `configs/iet_x2.py:eval`
(the settings the released checkpoint was evaluated with)."""

from iet_jax.training.config import recipe


def get_config(settings: str | None = None):
    return recipe("iet", 2, settings)
