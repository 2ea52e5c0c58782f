"""FLOPs in the official tables' convention (multiply-adds for a 1280x720 output)."""

import pytest

from iet_jax import config, flops

# Published: classical 5.02T / 2.25T / 1.26T, light 0.28T / 0.12T / 0.07T (x2 / x3 / x4).
PUBLISHED_TERA = {("iet", 2): 5.02, ("iet", 3): 2.25, ("iet", 4): 1.26,
                  ("iet_light", 2): 0.28, ("iet_light", 3): 0.12, ("iet_light", 4): 0.07}


@pytest.mark.parametrize("settings", ["train", "eval"])
@pytest.mark.parametrize("variant,scale", sorted(PUBLISHED_TERA))
def test_flops_round_to_the_published_table(variant, scale, settings):
    cfg = config.official(variant, scale, settings)
    tera = flops.flops(cfg, 720 // scale, 1280 // scale) / 1e12
    assert round(tera, 2) == PUBLISHED_TERA[variant, scale]


def test_flops_grow_with_budgets():
    base = config.official("iet", 4, "train")
    wider = config.official("iet", 4, "train", topk_focus=((914,) * 4,) + base.topk_focus[1:])
    assert flops.flops(wider, 180, 320) > flops.flops(base, 180, 320)
