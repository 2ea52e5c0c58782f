"""`IET(x, return_candidates=True)` and `python -m iet_jax.visualize`: the API returns the
forward's own output and lists, the figure draws exactly those lists, the distances are
what a hand count gives, and bad inputs are one line."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from iet_jax import visualize
from iet_jax.evaluation import candidates as cand
from iet_jax.io import model_dir
from iet_jax.model import attention
from iet_jax.model.network import Candidates
from tiny import photo

H, W = 12, 14


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return model_dir.load_model(tiny_checkpoint)


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("visualize") / "lr.png"
    Image.fromarray(np.round(photo(H, W) * 255).astype(np.uint8)).save(path)
    return path


def _image(path) -> np.ndarray:
    return np.asarray(Image.open(path), np.float32) / 255.0


def test_the_api_returns_the_plain_forward_output_and_one_record_per_layer(model, image_file):
    x = jnp.asarray(_image(image_file))[None]
    plain = nnx.jit(lambda m, x: m(x))(model, x)
    y, lists = nnx.jit(lambda m, x: m(x, return_candidates=True))(model, x)
    assert np.array_equal(np.asarray(plain), np.asarray(y))
    eager, eager_lists = model(x, return_candidates=True)
    assert np.array_equal(np.asarray(model(x)), np.asarray(eager))
    plans = [p for block in model.plan for p in block]
    assert [(c.block, c.layer) for c in lists] == [(p.block, p.layer) for p in plans]
    for c, p in zip(lists, plans):
        assert (c.height, c.width) == (H, W)
        assert c.idx.shape == c.attn.shape == (1, model.config.num_heads, H * W, p.keep)
        if p.propagate is None:
            assert c.propagated is None
        else:
            assert c.propagated.shape[-1] == p.keep + p.propagate[2]
    # block 0 layer 0 scores the initial lists and keeps them all (tiny config)
    assert plans[0].on_initial and not plans[0].prunes
    cfg = model.config
    initial = attention.initial_candidates(H, W, cfg.local_range, cfg.sparse_range, cfg.dilation)
    assert np.array_equal(np.asarray(lists[0].idx[0, 0]), initial.idx)


def test_the_figure_draws_the_models_own_candidates(model, tiny_checkpoint, image_file,
                                                   tmp_path):
    token = (5, 6)
    out = tmp_path / "out.png"
    rc = visualize.main(["--checkpoint", str(tiny_checkpoint), "--image",
                         str(image_file), "--token", "5,6", "--output", str(out)])
    assert rc == 0 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    drawn = json.loads((tmp_path / "out.png.json").read_text())["panels"]
    x = jnp.asarray(_image(image_file))[None]
    _, lists = nnx.jit(lambda m, x: m(x, return_candidates=True))(model, x)
    i = token[0] * W + token[1]
    heads = model.config.num_heads
    per_head = 1 + len(model.plan)  # the initial windows, then each block's last layer
    assert len(drawn) == heads * per_head
    for panel in drawn:
        if panel["block"] < 0:
            continue
        c = [c for c in lists if c.block == panel["block"] and c.layer == panel["layer"]][0]
        idx = np.asarray(c.idx[0, panel["head"], i])
        attn = np.asarray(c.attn[0, panel["head"], i], np.float64)
        want = sorted((int(j) // W, int(j) % W, float(a)) for j, a in zip(idx, attn) if j >= 0)
        got = sorted((y, x_, w) for (y, x_), w in zip(panel["kept"], panel["weights"]))
        assert got == want
        added = set()
        if c.propagated is not None:
            grown = np.asarray(c.propagated[0, panel["head"], i])
            added = {(int(j) // W, int(j) % W) for j in set(grown.tolist()) - set(idx.tolist())
                     if j >= 0}
        assert {tuple(p) for p in panel["added"]} == added
    assert any(p["added"] for p in drawn)  # block 0 propagates: something was added


def test_mean_distances_against_a_hand_count():
    # a 2 x 3 grid of tokens, one head; the image is its top row (queries 0, 1, 2)
    idx = np.array([[0, 4, 4], [5, 1, 0], [2, 3, -1], [0, 0, 0], [1, 1, 1], [2, 2, 2]])
    propagated = np.array([[3, -1], [1, 2], [2, 5]] + [[0, 0]] * 3)
    c = Candidates(0, 0, 2, 3, idx[None, None], np.ones(idx.shape)[None, None],
                   propagated[None, None])
    (block, layer, kept, grown), = cand.mean_distances([c], 1, 3)
    # token 0 at (0,0): 0 and (1,1) (listed twice, counted once) -> (0 + sqrt 2) / 2; token 1 at (0,1): (1,2), self,
    # (0,0) -> (sqrt 2 + 0 + 1) / 3; token 2 at (0,2): self, (1,0) -> (0 + sqrt 5) / 2
    want = ((0 + 2 ** 0.5) / 2 + (2 ** 0.5 + 1) / 3 + 5 ** 0.5 / 2) / 3
    assert (block, layer) == (0, 0) and kept == pytest.approx(want)
    assert grown == pytest.approx((1.0 + 0.5 + 0.5) / 3)  # (1,0); self, (0,2); self, (1,2)


def test_the_summary_figure_is_written_with_the_apis_distances(capsys, model, tiny_checkpoint,
                                                               image_file, tmp_path):
    out = tmp_path / "summary.png"
    args = ["--checkpoint", str(tiny_checkpoint), "--image", str(image_file), "--summary",
            str(out), "--every-layer"]
    assert visualize.main(args) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    x = jnp.asarray(_image(image_file))[None]
    _, lists = nnx.jit(lambda m, x: m(x, return_candidates=True))(model, x)
    lists = [Candidates(c.block, c.layer, c.height, c.width, np.asarray(c.idx), None,
                        None if c.propagated is None else np.asarray(c.propagated))
             for c in lists]
    printed = capsys.readouterr().out
    for block, layer, kept, grown in cand.mean_distances(lists, H, W):
        after = "" if grown is None else f", after propagation {grown:.4f}"
        assert f"block {block} layer {layer}: kept {kept:.4f}{after}\n" in printed


@pytest.mark.parametrize("change,words", [
    (["--token", "12,0"], ["--token 12,0 is outside the image", "12 rows"]),
    (["--token", "0,14"], ["outside the image", "14 columns"]),
    (["--blocks", "0,2"], ["--blocks 0,2", "blocks 0 to 1"]),
    (["--heads", "5"], ["--heads 5", "heads 0 to 1"]),
    (["--image", "NOPE"], ["cannot read the image"]),
    (["--image", "GARBAGE"], ["cannot read the image", "garbage.png"]),
    (["--checkpoint", "NOPE"], ["checkpoint directory not found", "nope.png"]),
    (["--checkpoint", "GARBAGE"], ["garbage.png"]),
    (["--output", "EXISTS"], ["exists; use --overwrite"]),
])
def test_bad_inputs_are_one_line(capsys, tiny_checkpoint, image_file, tmp_path, change, words):
    exists = tmp_path / "exists.png"
    exists.write_bytes(b"x")
    (tmp_path / "garbage.png").write_bytes(b"not a picture")
    args = {"--checkpoint": str(tiny_checkpoint), "--image": str(image_file),
            "--token": "1,1", "--output": str(tmp_path / "o.png")}
    flag, value = change
    value = {"NOPE": str(tmp_path / "nope.png"), "EXISTS": str(exists),
             "GARBAGE": str(tmp_path / "garbage.png")}.get(value, value)
    args[flag] = value
    argv = [part for item in args.items() for part in item]
    assert visualize.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    for word in words:
        assert word in err[0], (word, err[0])
    assert not (tmp_path / "o.png").exists()


def test_a_bad_token_or_blocks_text_is_a_usage_error(capsys, tiny_checkpoint, image_file):
    for flag, value in (("--token", "3"), ("--blocks", "x")):
        with pytest.raises(SystemExit) as e:
            visualize.main(["--checkpoint", str(tiny_checkpoint), "--image", str(image_file),
                            "--output", "o.png", flag, value])
        assert e.value.code == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert "error: argument " + flag in last, last
