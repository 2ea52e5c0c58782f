"""IET (classical) x2, second stage (the official 001_IET_SRx2_finetune):
`--config iet_x2_finetune` (official training settings: LR patch 82, dilation 3, remat,
starting from workdirs/iet_x2) or `--config iet_x2_finetune:eval` (the network the released
x2 checkpoint was evaluated with)."""

from iet_jax.training.config import recipe


def get_config(settings: str | None = None):
    return recipe("iet", 2, settings, stage="finetune")
