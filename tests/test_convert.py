"""Official .pth -> iet-jax: end to end on a tiny official checkpoint written by torch.

fixtures/official_tiny/ holds a tiny IET (official architecture, embed_dim 12) saved by
torch.save with different `params` and `params_ema`, its option file, and the official
model's outputs for an astronaut crop (float32 and float64 runs of the PyTorch model).
"""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from iet_jax import convert
from iet_jax.io import model_dir, official, pth, stored
from iet_jax.model.network import abstract_model

TINY = Path(__file__).parent / "fixtures" / "official_tiny"
OPTIONS = TINY / "tiny_x2.yml"
WEIGHTS = TINY / "tiny_x2.pth"


@pytest.fixture(scope="module")
def expected():
    return np.load(TINY / "tiny_x2_expected.npz")


@nnx.jit
def forward(model, x):
    """One compiled forward shared by the tests (models of one config reuse it)."""
    return model(x)


def test_load_official_uses_ema_and_matches_official_float32(expected):
    model = official.load_official(OPTIONS, WEIGHTS)
    out = np.asarray(forward(model, jnp.asarray(expected["input"])))
    # float32: the official run itself moves by ~3e-5 with thread count and memory layout
    # (near-ties at the top-k cut), so this bound is looser than the float64 one below.
    assert np.abs(out - expected["output"]).max() < 2e-4


def test_load_official_float64(expected):
    with jax.enable_x64(True):
        model = official.load_official(OPTIONS, WEIGHTS, dtype="float64")
        out = np.asarray(forward(model, jnp.asarray(expected["input"], jnp.float64)))
    # The official float64 run kept its float32-rounded RGB mean: about 6e-8 from ours.
    assert np.abs(out - expected["output_float64"]).max() < 1e-6


def test_params_differ_from_ema(expected):
    state_dict, which = pth.select_state_dict(pth.load_pth(WEIGHTS))
    assert which == "params_ema"
    plain = pth.load_pth(WEIGHTS)["params"]
    model = official.load_state_dict(
        abstract_model(official.from_options_file(OPTIONS)), plain)
    out = np.asarray(forward(model, jnp.asarray(expected["input"])))
    assert np.abs(out - expected["output"]).max() > 1e-2  # the EMA weights are what matched


def test_wrong_scale_checkpoint_is_named():
    with pytest.raises(ValueError) as error:
        official.load_official(OPTIONS, TINY / "tiny_x4_light.pth")
    message = str(error.value)
    assert "upsample.0.weight" in message and "(48, 12, 3, 3)" in message
    assert "x4 model but the config is x2" in message


def test_missing_and_unexpected_keys_are_listed():
    state_dict, _ = pth.select_state_dict(pth.load_pth(WEIGHTS))
    state_dict = dict(state_dict)
    state_dict.pop("norm.weight")
    state_dict["extra.weight"] = np.zeros(3)
    model = abstract_model(official.from_options_file(OPTIONS))
    with pytest.raises(ValueError, match=r"missing    norm.weight \(12,\)[\s\S]*unexpected extra"):
        official.load_state_dict(model, state_dict)


def test_cli_writes_a_checkpoint_that_loads_back(tmp_path, expected, capsys):
    out_dir = tmp_path / "tiny"
    convert.main(["--official-options", str(OPTIONS), "--checkpoint", str(WEIGHTS),
                  "--output", str(out_dir)])
    assert "params_ema" in capsys.readouterr().out
    source = json.loads((out_dir / "source.json").read_text())
    assert source["state_dict_key"] == "params_ema" and len(source["checkpoint_sha256"]) == 64
    restored = model_dir.load_model(out_dir)
    direct = official.load_official(OPTIONS, WEIGHTS)
    x = jnp.asarray(expected["input"])
    np.testing.assert_array_equal(np.asarray(forward(restored, x)), np.asarray(forward(direct, x)))
    assert restored.config.to_dict() == direct.config.to_dict()


def test_checkpoint_that_does_not_fit_its_config(tmp_path):
    out_dir = tmp_path / "tiny"
    convert.main(["--official-options", str(OPTIONS), "--checkpoint", str(WEIGHTS),
                  "--output", str(out_dir)])
    cfg = json.loads((out_dir / stored.CONFIG_FILE).read_text())
    cfg["scale"] = 3
    (out_dir / stored.CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"do not fit its config.json[\s\S]*upsample"):
        model_dir.load_model(out_dir)


def test_missing_inputs_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an iet-jax model checkpoint"):
        model_dir.load_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found"):
        model_dir.load_model(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="option file not found"):
        official.load_official(tmp_path / "nope.yml", WEIGHTS)
    with pytest.raises(SystemExit):
        convert.main(["--official-options", str(OPTIONS), "--checkpoint",
                      str(tmp_path / "missing.pth"), "--output", str(tmp_path / "o")])


def test_options_without_network_g(tmp_path):
    bad = tmp_path / "bad.yml"
    shutil.copy(OPTIONS, bad)
    bad.write_text("name: x\nscale: 2\n")
    with pytest.raises(ValueError, match="no network_g section"):
        official.from_options_file(bad)


def test_command_line_mistakes_are_one_line(tmp_path, capsys):
    """Each mistake: exit 2 and one `error:` line naming it; nothing written."""
    listed = tmp_path / "listed.yml"
    listed.write_text("network_g:\n  - type: IET\n")
    broken = tmp_path / "broken.yml"
    broken.write_text("network_g: {type: IET\n")
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "mine.txt").write_text("the user's")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = {
        "network_g a list": ([listed, WEIGHTS, tmp_path / "o"], "network_g is a list"),
        "YAML that does not parse": ([broken, WEIGHTS, tmp_path / "o"], "cannot read"),
        "options a folder": ([tmp_path, WEIGHTS, tmp_path / "o"], "is a folder, not an option"),
        "checkpoint a folder": ([OPTIONS, tmp_path, tmp_path / "o"], "is a folder, not a .pth"),
        "output not empty": ([OPTIONS, WEIGHTS, kept], "is not empty; give a new folder, or "
                                                       "--overwrite"),
        "output a file": ([OPTIONS, WEIGHTS, a_file], "is a file; give a folder"),
    }
    for name, ((options, weights, output), says) in cases.items():
        with pytest.raises(SystemExit) as exit_:
            convert.main(["--official-options", str(options), "--checkpoint", str(weights),
                          "--output", str(output)])
        err = capsys.readouterr().err
        assert exit_.value.code == 2, name
        assert err.startswith("error: ") and err.count("\n") == 1 and says in err, (name, err)
    assert not (tmp_path / "o").exists()
    assert sorted(p.name for p in kept.iterdir()) == ["mine.txt"]
    assert a_file.read_text() == "x"
    convert.main(["--official-options", str(OPTIONS), "--checkpoint", str(WEIGHTS),
                  "--output", str(kept), "--overwrite"])
    assert model_dir.load_model(kept).config.scale == official.from_options_file(OPTIONS).scale
