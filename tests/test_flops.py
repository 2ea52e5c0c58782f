"""FLOPs in the official tables' convention (multiply-adds for a 1280x720 output)."""

from pathlib import Path

import pytest

from iet_jax.flops import main as flops_main
from iet_jax.model import config, flops

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


# ------------------------------------------------------------------ the command

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# Published parameter counts of the x3 models.
PUBLISHED_PARAMS_X3 = {"iet": "19,853,789", "iet_light": "790,404"}


def run_command(capsys, *args):
    rc = flops_main(["python -m iet_jax.flops", *args])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("variant", ["iet", "iet_light"])
def test_command_default_at_x3_prints_the_published_flops(capsys, variant):
    # 1280x720 is not a multiple of 3: the official count uses LR 426x240 (floor).
    rc, out, err = run_command(capsys, "--config", f"{CONFIGS / variant}_x3.py:eval")
    assert rc == 0 and err == ""
    tera = f"{PUBLISHED_TERA[variant, 3]:.2f}T"
    assert out.splitlines() == [
        f"parameters: {PUBLISHED_PARAMS_X3[variant]}",
        f"FLOPs (multiply-adds) for a 1280x720 output (LR 426x240 at x3, rounded down as in "
        f"the paper): {tera}"]
    # the paper's size given explicitly counts the same
    rc, out2, _ = run_command(capsys, "--config", f"{CONFIGS / variant}_x3.py:eval",
                              "--output_size", "1280x720")
    assert rc == 0 and out2 == out


def test_command_x3_multiple_of_the_scale_and_x4(capsys):
    rc, out, _ = run_command(capsys, "--config", f"{CONFIGS}/iet_x3.py:eval",
                             "--output_size", "1278x720")
    assert rc == 0
    assert out.splitlines()[1] == ("FLOPs (multiply-adds) for a 1278x720 output "
                                   "(LR 426x240 at x3): 2.25T")
    rc, out, _ = run_command(capsys, "--config", f"{CONFIGS}/iet_light_x4.py:eval")
    assert rc == 0
    assert out.splitlines()[1] == ("FLOPs (multiply-adds) for a 1280x720 output "
                                   "(LR 320x180 at x4): 0.07T")


@pytest.mark.parametrize("args,problem,fix", [
    (["--config", "{configs}/iet_x3.py:eval", "--output_size", "1000x700"],
     "output size 1000x700 is not a multiple of the scale 3", "--output_size 999x699"),
    (["--config", "{configs}/iet_x4.py", "--output_size", "1280x721"],
     "output size 1280x721 is not a multiple of the scale 4", "--output_size 1280x720"),
    (["--config", "{configs}/iet_x4.py", "--output_size", "1280"],
     "--output_size '1280' is not WIDTHxHEIGHT", "give e.g. --output_size 1280x720"),
    ([], "--config is required", "usage: python -m iet_jax.flops --config"),
    (["--config", "{configs}/nope.py"], "cannot load --config", "configs/iet_x4.py:eval"),
    (["--config", "{configs}/iet_x3.py:bogus"], "no official network",
     "usage: python -m iet_jax.flops --config"),
])
def test_command_mistakes_are_one_line(capsys, args, problem, fix):
    rc, out, err = run_command(capsys, *(a.format(configs=CONFIGS) for a in args))
    assert rc == 2 and out == ""
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    assert problem in err and fix in err
