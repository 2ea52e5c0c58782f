"""Tiny models, stand-ins, images and training runs the tests share (nothing here is a
test)."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import skimage.data
from flax import nnx

from iet_jax.conventions.imresize import imresize
from iet_jax.io import workdir as workdir_lib
from iet_jax.model import config
from iet_jax.model.network import abstract_model, pixel_shuffle
from iet_jax.training.config import training_config

CONFIGS = Path(__file__).parent.parent / "configs"  # the recipes


# ---------------------------------------------------------------- tiny IETs
def tiny_model_config(scale: int = 2, **overrides):
    """IET-light's structure at toy size: 2 blocks of one layer, 3x3 dense and dilated 5x5
    sparse windows (min_size() = 5 * 2 = 10 LR pixels). `overrides` are model_config fields."""
    fields = dict(
        embed_dim=8, nattn_dim=8, depths=(1, 1), num_heads=2, scale=scale,
        upsampler="pixelshuffledirect", mlp_ratio=1.0, local_range=3, sparse_range=5,
        dilation=2, img_size=10, convffn_kernel_size=3, topk_focus=((34,), (16,)),
        topk_prop_1=(4, 0), topk_prop_2=(2, 0), topk_prop_3=(8, 0))
    return config.model_config(**{**fields, **overrides})


def random_model(cfg, seed: int = 0):
    """An IET with random weights, filled in from NumPy (no per-shape init compilations)."""
    graphdef, state = nnx.split(abstract_model(cfg))
    rng = np.random.default_rng(seed)
    state = jax.tree_util.tree_map(
        lambda a: jnp.asarray(rng.normal(0.0, 0.2, a.shape), a.dtype), state)
    return nnx.merge(graphdef, state)


def photo(h: int, w: int, y0: int = 150, x0: int = 180) -> np.ndarray:
    """A crop of scikit-image's astronaut photograph, float32 in [0, 1]."""
    return skimage.data.astronaut()[y0:y0 + h, x0:x0 + w].astype(np.float32) / 255.0


# ---------------------------------------------------------------- stand-in networks
def nearest(x):
    """Nearest-neighbour x2: commutes with flips and transposes."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


nearest.scale = 2

_W = np.random.default_rng(3).normal(0, 0.5, (3, 3 * 9)).astype(np.float32)


def pointwise_x3(x):
    """A 1x1 conv + PixelShuffle(3) + sigmoid: every output pixel sees one input pixel."""
    return jax.nn.sigmoid(pixel_shuffle(x @ jnp.asarray(_W), 3))


pointwise_x3.scale = 3


def neighbourly(x):
    """x2 stand-in whose output depends on the neighbourhood and on the input's size.

    A 3x3 box blur (edge pixels repeated) plus a pattern over the whole input: a pixel
    computed by the wrong patch, or at the wrong place in its patch, comes out different.
    """
    h, w = x.shape[1:3]
    p = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    blur = sum(p[:, i:i + h, j:j + w] for i in range(3) for j in range(3)) / 9.0
    ys = jnp.arange(2 * h, dtype=jnp.float32)[:, None]
    xs = jnp.arange(2 * w, dtype=jnp.float32)[None, :]
    pattern = jnp.sin(0.37 * ys + 0.11 * h) * jnp.cos(0.23 * xs + 0.07 * w)
    return nearest(blur) + 0.1 * pattern[None, :, :, None]


neighbourly.scale = 2


# ---------------------------------------------------------------- tiny training runs
def tiny_training_config(*, scale: int = 2, patch: int = 8, batch: int = 4, steps: int = 6,
                         dtype: str = "float32"):
    """A training config for `tiny_model_config` with 12 features, undilated windows and
    `patch`-pixel LR patches: a checkpoint and a log record every step, no validation."""
    model = tiny_model_config(
        scale, embed_dim=12, nattn_dim=12, dilation=1, img_size=patch,
        topk_focus=((34,), (12,)), topk_prop_3=(6, 0), dtype=dtype, param_dtype=dtype)
    cfg = training_config(
        model=model, dataset="synthetic", patch_size=patch, batch_size=batch,
        learning_rate=2e-3, num_steps=steps, milestones=(steps - 1,), warmup_steps=2,
        muon_lr_scale=6.0)
    cfg.checkpoint_every = 1
    cfg.keep_checkpoints = 10
    cfg.eval_every = 0
    cfg.log_every = 1
    cfg.data.val_crop = 12
    return cfg


def synthetic_source(n: int, seed: int, size: int = 24, scale: int = 2) -> list[dict]:
    """Smooth random colour images (bicubic-enlarged noise) with their bicubic LR."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        hr = imresize(rng.random((6, 6, 3)) * 255.0, size / 6)
        hr = np.clip(np.round(hr), 0, 255).astype(np.uint8)
        lr = np.clip(np.round(imresize(hr.astype(np.float64), 1 / scale)), 0, 255)
        out.append({"hr": hr, "lr": lr.astype(np.uint8), "name": f"img{i}"})
    return out


def read_item(workdir, step: int, item: str):
    """A checkpoint item as NumPy arrays (restored onto one device, verified)."""
    return jax.tree.map(np.asarray, workdir_lib.read_step(workdir, step).items[item])
