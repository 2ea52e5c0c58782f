"""IET and IET-light as Flax NNX modules, NHWC throughout.

`IET(config, rngs=...)` builds any of the six official networks from a model config
(`iet_jax.model.config`); `model(x)` maps images (B, H, W, 3) in [0, 1] to (B, sH, sW, 3).
Initialisation follows the official one (Linear N(0, 0.02), zero bias; LayerNorm 1/0;
PyTorch's default uniform init for convolutions) so training from scratch starts alike.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from iet_jax.model import attention
from iet_jax.model.config import validate

RGB_MEAN = (0.4488, 0.4371, 0.4040)
SIMILARITY_BLOCKS = (6, 7)  # blocks whose FFN is SF-FFN
BOTTLENECK_BLOCKS = (1, 3, 5)  # blocks whose end conv is the 3-conv bottleneck
UPSAMPLE_FEATURES = 64


def _torch_uniform(fan_in: int):
    """PyTorch's default Conv2d init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class _Factory:
    """Builds layers with the config's dtypes and the official initialisers."""

    def __init__(self, config: ml_collections.ConfigDict, rngs: nnx.Rngs):
        self.dtype = jnp.dtype(config.dtype)
        self.param_dtype = jnp.dtype(config.param_dtype)
        self.depthwise_impl = config.depthwise_impl
        self.rngs = rngs

    def linear(self, din: int, dout: int) -> nnx.Linear:
        return nnx.Linear(
            din, dout, kernel_init=nnx.initializers.normal(0.02),
            bias_init=nnx.initializers.zeros, dtype=self.dtype, param_dtype=self.param_dtype,
            rngs=self.rngs,
        )

    def conv(self, din: int, dout: int, kernel: int, groups: int = 1) -> nnx.Conv:
        init = _torch_uniform(din // groups * kernel * kernel)
        return nnx.Conv(
            din, dout, (kernel, kernel), padding="SAME", feature_group_count=groups,
            kernel_init=init, bias_init=init, dtype=self.dtype, param_dtype=self.param_dtype,
            rngs=self.rngs,
        )

    def norm(self, dim: int) -> nnx.LayerNorm:
        return nnx.LayerNorm(
            dim, epsilon=1e-5, use_fast_variance=False, dtype=self.dtype,
            param_dtype=self.param_dtype, rngs=self.rngs,
        )


DEPTHWISE_IMPLS = ("auto", "conv", "shifted")


def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU as PyTorch computes it, x/2 (1 + erf(x / sqrt 2)). `jax.nn.gelu` uses erfc,
    which XLA's CPU backend evaluates about 3x slower (the same values to rounding)."""
    return 0.5 * x * (1 + jax.lax.erf(x * math.sqrt(0.5)))


def pixel_shuffle(x: jax.Array, r: int) -> jax.Array:
    """NHWC PixelShuffle with PyTorch's channel order (c, r1, r2)."""
    b, h, w, crr = x.shape
    c = crr // (r * r)
    x = x.reshape(b, h, w, c, r, r).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(b, h * r, w * r, c)


def depthwise_conv(x: jax.Array, kernel: jax.Array, bias: jax.Array, impl: str = "auto"
                   ) -> jax.Array:
    """'SAME' depthwise conv of NHWC `x` with a (k, k, 1, C) kernel (nnx.Conv's layout), plus
    `bias`.

    'conv': one grouped convolution. 'shifted': k*k shifted multiply-adds of the padded input,
    the same sum in another order; XLA's CPU backend runs a grouped convolution tens of times
    slower than that (a 5x5 one on (1, 75, 75, 480): 165 ms against 6 ms). 'auto': shifted on
    CPU, conv elsewhere, chosen when the program is lowered for a platform
    (`jax.lax.platform_dependent`), so one exported program does each where it runs. bfloat16
    inputs are summed in float32 either way.
    """
    if impl == "auto":
        return jax.lax.platform_dependent(
            x, kernel, bias, cpu=functools.partial(depthwise_conv, impl="shifted"),
            default=functools.partial(depthwise_conv, impl="conv"))
    if impl not in ("conv", "shifted"):
        raise ValueError(f"depthwise_impl must be one of {DEPTHWISE_IMPLS}, got {impl!r}")
    out_dtype = x.dtype
    acc = jnp.float32 if x.dtype == jnp.bfloat16 else x.dtype
    if impl == "conv":
        y = jax.lax.conv_general_dilated(
            x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=x.shape[-1], preferred_element_type=acc)
    else:
        y = _shifted_depthwise(x.astype(acc), kernel[:, :, 0].astype(acc))
    return (y + bias.astype(acc)).astype(out_dtype)


def _same_padding(k: int) -> tuple[int, int]:
    """'SAME' padding of a k-tap axis: (before, after), the extra tap after when k is even."""
    return (k - 1) // 2, k // 2


def _shift_add(x: jax.Array, kernel: jax.Array, pad_h: tuple[int, int],
               pad_w: tuple[int, int]) -> jax.Array:
    """sum over taps (i, j) of x padded by (pad_h, pad_w), shifted by (i, j), times kernel[i, j]
    (k, k, C): one fused loop on CPU, with no shifted copy materialised."""
    kh, kw = kernel.shape[:2]
    h, w = x.shape[1:3]
    padded = jnp.pad(x, ((0, 0), pad_h, pad_w, (0, 0)))
    return sum(padded[:, i:i + h, j:j + w, :] * kernel[i, j]
               for i in range(kh) for j in range(kw))


@jax.custom_vjp
def _shifted_depthwise(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """'SAME' depthwise conv of NHWC x with a (k, k, C) kernel as k*k shifted multiply-adds.

    Its own backward: differentiated by JAX, each of the k*k shifted copies of x would be
    kept for the kernel's gradient (k*k times the activation; measured as the largest cost of
    a CPU training step). Here only x is kept and the backward is shifted multiply-adds too.
    """
    kh, kw = kernel.shape[:2]
    return _shift_add(x, kernel, _same_padding(kh), _same_padding(kw))


def _shifted_depthwise_fwd(x, kernel):
    return _shifted_depthwise(x, kernel), (x, kernel)


def _shifted_depthwise_bwd(residuals, g):
    x, kernel = residuals
    kh, kw = kernel.shape[:2]
    h, w = x.shape[1:3]
    # dx: the same conv of g with the kernel flipped and the padding swapped.
    dx = _shift_add(g, kernel[::-1, ::-1], _same_padding(kh)[::-1], _same_padding(kw)[::-1])
    # dkernel[i, j] = sum over pixels of g * (x shifted by (i, j)); one row of taps at a time
    # (a loop, not k*k separate passes: faster on CPU and quicker to compile).
    padded = jnp.pad(x, ((0, 0), _same_padding(kh), _same_padding(kw), (0, 0)))

    def tap_row(i):
        rows = jax.lax.dynamic_slice_in_dim(padded, i, h, axis=1)
        return jnp.stack([jnp.sum(rows[:, :, j:j + w, :] * g, axis=(0, 1, 2))
                          for j in range(kw)])

    return dx, jax.lax.map(tap_row, jnp.arange(kh))


_shifted_depthwise.defvjp(_shifted_depthwise_fwd, _shifted_depthwise_bwd)


class DepthwiseGELU(nnx.Module):
    """Depthwise k x k conv followed by GELU (LePE and the FFNs' spatial mixing). The weights
    live in an nnx.Conv (the official layout); `depthwise_conv` computes with them."""

    def __init__(self, dim: int, kernel: int, make: _Factory):
        self.conv = make.conv(dim, dim, kernel, groups=dim)
        self.impl = make.depthwise_impl

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.conv.dtype or x.dtype
        y = depthwise_conv(x.astype(dtype), self.conv.kernel[...].astype(dtype),
                           self.conv.bias[...].astype(dtype), self.impl)
        return gelu(y)


class ConvFFN(nnx.Module):
    def __init__(self, dim: int, hidden: int, kernel: int, make: _Factory):
        self.fc1 = make.linear(dim, hidden)
        self.dwconv = DepthwiseGELU(hidden, kernel, make)
        self.fc2 = make.linear(hidden, dim)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = gelu(self.fc1(x))
        return self.fc2(x + self.dwconv(x))


class SimilarityFFN(nnx.Module):
    """SF-FFN: fuse each head's channels with its most similar token's, then a ConvFFN.

    fc0 and dwconv0 act on one head's d channels and are shared by all heads.
    """

    def __init__(self, dim: int, hidden: int, heads: int, kernel: int, make: _Factory):
        self.heads = heads
        d = dim // heads
        self.fc0 = make.linear(2 * d, d)
        self.dwconv0 = DepthwiseGELU(d, kernel, make)
        self.ffn = ConvFFN(dim, hidden, kernel, make)

    def __call__(self, x: jax.Array, x_sim: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        d = c // self.heads

        def by_head(t):  # (B,H,W,C) -> (B*heads,H,W,d)
            return t.reshape(b, h, w, self.heads, d).transpose(0, 3, 1, 2, 4).reshape(-1, h, w, d)

        g = gelu(self.fc0(jnp.concatenate([by_head(x), by_head(x_sim)], axis=-1)))
        g = g + self.dwconv0(g)
        g = g.reshape(b, self.heads, h, w, d).transpose(0, 2, 3, 1, 4).reshape(b, h, w, c)
        return self.ffn(g)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["idx", "attn", "propagated"],
                   meta_fields=["block", "layer", "height", "width"])
@dataclasses.dataclass(frozen=True)
class Candidates:
    """One layer's candidate lists, as `IET.__call__(..., return_candidates=True)` reports them.

    Token `i` is pixel `(i // width, i % width)` of the (mirror-padded) LR token grid; `-1`
    marks an empty slot. A pytree: `block`, `layer`, `height`, `width` are static.
    """

    block: int
    layer: int
    height: int  # token grid after padding (IET.min_size)
    width: int
    idx: jax.Array  # (B, h, N, K) int32: the lists this layer attended to, after its top-k cut
    attn: jax.Array  # (B, h, N, K): its (cascaded) attention weights on `idx`
    propagated: jax.Array | None  # (B, h, N, K + k_add): the lists after two-hop propagation


class IETLayer(nnx.Module):
    """Pre-norm transformer layer: IEA with LePE, then ConvFFN (or SF-FFN in blocks 6, 7)."""

    def __init__(self, config: ml_collections.ConfigDict, plan: attention.LayerPlan,
                 make: _Factory):
        dim = config.embed_dim
        self.plan = plan
        self.heads = config.num_heads
        self.attn_dim = config.nattn_dim if plan.block == 0 else dim
        self.scale = (self.attn_dim // self.heads) ** -0.5
        self.gather_impl = config.gather_impl
        self.gather_deterministic = config.gather_deterministic
        self.initial_attention = config.initial_attention
        self.merge = config.merge
        hidden = int(dim * config.mlp_ratio)
        kernel = config.convffn_kernel_size
        self.norm1 = make.norm(dim)
        self.wqkv = make.linear(dim, 3 * self.attn_dim)
        self.lepe = DepthwiseGELU(self.attn_dim, kernel, make)
        self.rpb = (
            nnx.Param(0.02 * jax.random.normal(make.rngs.params(),
                                               (self.heads, config.local_range ** 2),
                                               make.param_dtype))
            if plan.has_rpb else None
        )
        self.proj = make.linear(self.attn_dim, dim)
        self.norm2 = make.norm(dim)
        if plan.similarity:
            self.norm3 = make.norm(dim)
            self.ffn = SimilarityFFN(dim, hidden, self.heads, kernel, make)
        else:
            self.ffn = ConvFFN(dim, hidden, kernel, make)

    def _heads(self, t: jax.Array) -> jax.Array:
        """(B,H,W,c) -> (B, heads, N, c/heads)."""
        b, h, w, c = t.shape
        return t.reshape(b, h * w, self.heads, c // self.heads).transpose(0, 2, 1, 3)

    def __call__(self, x: jax.Array, state: attention.AttnState,
                 initial: attention.InitialCandidates, train: bool, record: list | None = None):
        """(x, state) -> (x, state). With a list `record`, appends this layer's `Candidates`
        (the only thing it changes; the outputs are the same either way)."""
        b, h, w, c = x.shape
        qkv = self.wqkv(self.norm1(x))
        q, k, v = jnp.split(qkv, 3, axis=-1)
        lepe = self.lepe(v)
        # Scores, softmax, cascade and top-k stay in float32 (float64 under x64) whatever the
        # compute dtype, so bfloat16 changes the inputs of candidate selection, not its math.
        attn_dtype = jnp.float64 if qkv.dtype == jnp.float64 else jnp.float32
        q = self._heads(q) * self.scale
        out, state = attention.attend(
            q, self._heads(k), self._heads(v).astype(attn_dtype), state, self.plan, initial,
            None if self.rpb is None else self.rpb[...], self.gather_impl,
            self.gather_deterministic, train, self.initial_attention,
        )
        out = out.transpose(0, 2, 1, 3).reshape(b, h, w, self.attn_dim).astype(x.dtype)
        y = self.proj(out + lepe)
        kept = state
        if self.plan.propagate is not None:
            k1, k2, k_add = self.plan.propagate
            state = state._replace(
                idx=attention.propagate(state.idx, state.attn, k1, k2, k_add, self.merge))
        if record is not None:
            lists = kept.idx if kept.idx is not None else jnp.broadcast_to(
                jnp.asarray(initial.idx), kept.attn.shape)
            record.append(Candidates(
                self.plan.block, self.plan.layer, h, w, lists, kept.attn,
                state.idx if self.plan.propagate is not None else None))
        x = x + y
        if not self.plan.similarity:
            return x + self.ffn(self.norm2(x)), state
        rows = attention.similar_tokens(state.idx, state.attn)
        y_sim = attention.gather_tokens(self._heads(y), rows)
        y_sim = y_sim.transpose(0, 2, 1, 3).reshape(b, h, w, c)
        return x + self.ffn(self.norm2(x), self.norm3(y_sim)), state


class Bottleneck(nnx.Module):
    """3x3 C->C/4, LeakyReLU(0.2), 1x1, LeakyReLU(0.2), 3x3 C/4->C: end conv of blocks 1, 3, 5."""

    def __init__(self, dim: int, make: _Factory):
        self.conv0 = make.conv(dim, dim // 4, 3)
        self.conv1 = make.conv(dim // 4, dim // 4, 1)
        self.conv2 = make.conv(dim // 4, dim, 3)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jax.nn.leaky_relu(self.conv0(x), 0.2)
        x = jax.nn.leaky_relu(self.conv1(x), 0.2)
        return self.conv2(x)


class IETBlock(nnx.Module):
    """Layers, then an image-space conv, with a residual around both."""

    def __init__(self, config: ml_collections.ConfigDict, plans: list[attention.LayerPlan],
                 make: _Factory):
        self.layers = nnx.List([IETLayer(config, p, make) for p in plans])
        block = plans[0].block
        dim = config.embed_dim
        self.conv = Bottleneck(dim, make) if block in BOTTLENECK_BLOCKS else make.conv(dim, dim, 3)

    def __call__(self, x, state, initial, train: bool, record: list | None = None):
        y = x
        for layer in self.layers:
            y, state = layer(y, state, initial, train, record)
        return x + self.conv(y), state


class Upsampler(nnx.Module):
    """Classical: conv+LeakyReLU(0.01), PixelShuffle stages, conv. Light: one conv+shuffle."""

    def __init__(self, config: ml_collections.ConfigDict, make: _Factory):
        s, dim, f = config.scale, config.embed_dim, UPSAMPLE_FEATURES
        self.direct = config.upsampler == "pixelshuffledirect"
        if self.direct:
            self.factors = (s,)
            self.stages = nnx.List([make.conv(dim, 3 * s * s, 3)])
            return
        self.factors = (3,) if s == 3 else (2,) * int(math.log2(s))
        self.conv_before = make.conv(dim, f, 3)
        self.stages = nnx.List([make.conv(f, f * r * r, 3) for r in self.factors])
        self.conv_last = make.conv(f, 3, 3)

    def __call__(self, x: jax.Array) -> jax.Array:
        if not self.direct:
            x = jax.nn.leaky_relu(self.conv_before(x), 0.01)
        for conv, r in zip(self.stages, self.factors):
            x = pixel_shuffle(conv(x), r)
        return x if self.direct else self.conv_last(x)


class IET(nnx.Module):
    """The Individualized Exploratory Transformer for single-image super-resolution."""

    def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        validate(config)
        if "float64" in (config.dtype, config.param_dtype) and not jax.config.jax_enable_x64:
            raise ValueError("float64 needs JAX's x64 mode: jax.config.update('jax_enable_x64', True)")
        config = ml_collections.FrozenConfigDict(config)
        self.config = config
        self.plan = tuple(tuple(block) for block in attention.build_plan(
            config.topk_focus, config.topk_prop_1, config.topk_prop_2, config.topk_prop_3,
            config.local_range ** 2 + config.sparse_range ** 2, SIMILARITY_BLOCKS,
        ))
        make = _Factory(config, rngs)
        dim = config.embed_dim
        self.conv_first = make.conv(3, dim, 3)
        self.patch_norm = make.norm(dim)
        self.blocks = nnx.List([IETBlock(config, plans, make) for plans in self.plan])
        self.norm = make.norm(dim)
        self.conv_after_body = make.conv(dim, dim, 3)
        self.upsample = Upsampler(config, make)

    def min_size(self, train: bool = False) -> int:
        """Inputs shorter than this are mirror-padded (the dilated window needs the room)."""
        m = self.config.sparse_range * self.config.dilation
        return max(m, self.config.img_size) if train else m

    def __call__(self, x: jax.Array, *, train: bool = False, return_candidates: bool = False
                 ) -> jax.Array | tuple[jax.Array, list[Candidates]]:
        """(B, H, W, 3) in [0, 1] -> (B, sH, sW, 3).

        `train` follows the official training mode: padding to `img_size` and the
        training-mode cascade normalisation (`attention.cascade`).

        `return_candidates=True` returns `(output, candidates)` instead: one `Candidates` per
        layer, in order (block 0 layer 0 first), read from the same forward pass; the output
        is the same array either way. Nothing is stored on the model.
        """
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"expected NHWC images (B, H, W, 3), got shape {x.shape}")
        cfg = self.config
        height, width = x.shape[1:3]
        x = mirror_pad(x.astype(cfg.dtype), self.min_size(train))
        mean = jnp.asarray(RGB_MEAN, x.dtype)
        x = (x - mean) * cfg.img_range
        h, w = x.shape[1:3]
        initial = attention.initial_candidates(h, w, cfg.local_range, cfg.sparse_range,
                                               cfg.dilation)
        f = self.conv_first(x)
        t = self.patch_norm(f)
        state = attention.AttnState(idx=None, attn=None)
        record = [] if return_candidates else None
        for block in self.blocks:
            if cfg.get("remat", False) and not return_candidates:
                # recompute the block's activations in the backward pass
                t, state = nnx.remat(lambda b, t, s: b(t, s, initial, train))(block, t, state)
            else:
                t, state = block(t, state, initial, train, record)
        f = self.conv_after_body(self.norm(t)) + f
        y = self.upsample(f) / cfg.img_range + mean
        y = y[:, : height * cfg.scale, : width * cfg.scale]
        return (y, record) if return_candidates else y


def mirror_pad(x: jax.Array, size: int) -> jax.Array:
    """Extend H and W to at least `size` by appending the flipped image, then cut to `size`.

    The official model appends one flip; an image shorter than size/2 needs more, so this
    repeats (x, flip(x), x, ...) until long enough, which equals the official result wherever
    the official code works.
    """
    for axis in (1, 2):
        n = x.shape[axis]
        if n >= size:
            continue
        pieces, total = [x], n
        while total < size:
            pieces.append(jnp.flip(pieces[-1], axis=axis))
            total += n
        x = jax.lax.slice_in_dim(jnp.concatenate(pieces, axis=axis), 0, size, axis=axis)
    return x


def count_parameters(model: nnx.Module) -> int:
    return sum(p.size for p in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param)))


def abstract_model(config: ml_collections.ConfigDict) -> IET:
    """The model with shapes and dtypes only: nothing is initialised or allocated."""
    return nnx.eval_shape(lambda: IET(config, rngs=nnx.Rngs(0)))
