"""The Pallas gather kernels (interpreted on CPU) against the XLA reference, their lowering
for CUDA, their use under a mesh, and a tiny model run with each implementation."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iet_jax.kernels import gather, native, reference
from iet_jax.kernels import pallas_gather as pg
from gather_cases import attention_loss, close, inputs, lists
from tiny import tiny_model_config

pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")

# Shapes that exercise the masking: N not a multiple of the query block, K and d not powers
# of two, K not a multiple of the slot chunk.
H, N, K, D = 3, 37, 13, 10

# Tolerances relative to the largest reference magnitude. float32 and float64 differ from the
# reference only by summation order; bfloat16 inputs are upcast exactly and accumulated in
# float32 by both implementations, so they meet the float32 tolerance.
RTOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-5, jnp.float64: 1e-12}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float64])
def test_primitives_match_xla(dtype):
    # "highest": on a GPU the XLA reference's float32 dots could otherwise use TF32.
    with jax.enable_x64(dtype == jnp.float64), jax.default_matmul_precision("highest"):
        x, y, w, idx = inputs(0, (H, N, K, D), dtype)
        for name, got, want in [
            ("qk", pg.qk(x, y, idx), reference.qk(x, y, idx)),
            ("av", pg.av(w, y, idx), reference.av(w, y, idx)),
            ("scatter", pg.scatter(w, x, idx), reference.scatter(w, x, idx)),
            ("sorted", pg.scatter_deterministic(w, x, idx), reference.scatter(w, x, idx)),
        ]:
            assert got.dtype == want.dtype == pg.accumulation_dtype(dtype), name
            close(got, want, RTOL[dtype])
        assert not np.asarray(pg.qk(x, y, idx))[np.asarray(idx) < 0].any()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gradients_match_xla(dtype):
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 2, N, D)), dtype) for _ in range(3))
    idx = lists(rng, (2, 2, N, K), N)
    grad = jax.jit(jax.value_and_grad(attention_loss, argnums=(0, 1, 2)), static_argnums=(4, 5))
    with jax.default_matmul_precision("highest"):  # no TF32 in the reference on a GPU
        ref_value, ref_grads = grad(q, k, v, idx, "xla", False)
    for deterministic in (False, True):
        value, grads = grad(q, k, v, idx, "pallas", deterministic)
        close(value, ref_value, 1e-5)
        for g, r in zip(grads, ref_grads):
            assert g.dtype == r.dtype == dtype
            # bfloat16 gradients are float32 sums rounded to bfloat16 once: half an ulp.
            close(g, r, 1e-5 if dtype == jnp.float32 else 2 ** -8)


def test_deterministic_scatter_repeats_bits():
    x, _, w, idx = inputs(2, (H, N, K, D))
    idx = jnp.where(idx >= 0, idx % 4, idx)  # a few hot tokens with long segments
    first = np.asarray(jax.jit(pg.scatter_deterministic)(w, x, idx))
    second = np.asarray(pg.scatter_deterministic(w, x, idx))  # traced and compiled again
    np.testing.assert_array_equal(first.view(np.uint32), second.view(np.uint32))
    with jax.default_matmul_precision("highest"):
        close(first, reference.scatter(w, x, idx), 1e-5)


def tiny_light_config():
    """IET-light's structure (3 heads, pixelshuffledirect, rpb, cascade, prune, propagation)
    with 2 blocks, 3x3 + dilated 5x5 windows (K = 34) and 10x10 inputs, in float64."""
    return tiny_model_config(
        embed_dim=12, nattn_dim=12, num_heads=3, depths=(2, 1),
        topk_focus=((34, 20), (12,)), topk_prop_3=(6, 0), dtype="float64",
        param_dtype="float64", gather_impl="xla")


def test_tiny_model_training_step_pallas_matches_xla(monkeypatch):
    """Forward, L1 loss, gradients and one SGD update agree between the implementations.

    float64: in float32, summation-order differences can flip a top-k selection between two
    nearly tied candidates and the outputs then legitimately differ.
    """
    import optax
    from flax import nnx

    from iet_jax.model import IET

    def train_step(model, x, target):
        optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)

        @nnx.jit
        def step(model, optimizer, x, target):
            def loss_fn(m):
                y = m(x)
                return jnp.mean(jnp.abs(y - target)), y

            (loss, y), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
            optimizer.update(model, grads)
            return loss, y, grads

        return step(model, optimizer, x, target) + (nnx.state(model, nnx.Param),)

    traced = []  # the Pallas primitives the pallas model's step was built from

    def counted(primitive):
        def run(*args):
            traced.append(primitive.__name__)
            return primitive(*args)
        return run

    monkeypatch.setitem(gather.PRIMITIVES, "pallas",
                        tuple(map(counted, gather.PRIMITIVES["pallas"])))
    with jax.enable_x64(True):
        model = IET(tiny_light_config(), rngs=nnx.Rngs(0))
        pallas_model = nnx.clone(model)  # same weights; only the layers' gather_impl differs
        for block in pallas_model.blocks:
            for layer in block.layers:
                layer.gather_impl = "pallas"
        x = jax.random.uniform(jax.random.key(1), (2, 10, 10, 3), jnp.float64)
        target = jax.random.uniform(jax.random.key(2), (2, 20, 20, 3), jnp.float64)
        want = train_step(model, x, target)
        assert not traced
        got = train_step(pallas_model, x, target)
        assert {"qk", "av", "scatter"} <= set(traced)
        leaves = jax.tree.leaves(want)
        assert len(leaves) == len(jax.tree.leaves(got)) > 50
        for g, w in zip(jax.tree.leaves(got), leaves):
            assert g.dtype == jnp.float64
            close(g, w, 1e-10)


def test_auto_resolution_and_names():
    cpu = "native" if native.available() else "xla"
    assert gather.resolve("auto") == ("pallas" if jax.default_backend() == "gpu" else cpu)
    assert gather.resolve("pallas") == "pallas"
    assert gather.resolve("pallas", deterministic=True) == "pallas_deterministic"
    with pytest.raises(ValueError, match="not one of"):
        gather.resolve("triton")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernels_lower_for_cuda(dtype):
    """Forward and backward, both scatters, export for an H100 without a GPU: every gather is
    a Triton call (six per step), so a kernel Triton cannot take fails here."""
    from jax import export
    from jax.sharding import AbstractDevice, AbstractMesh

    device = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
    mesh = AbstractMesh((1,), ("x",), abstract_device=device)
    b, h, n, k, d = 2, 3, 300, 45, 40  # K and d not powers of two
    args = (jax.ShapeDtypeStruct((b, h, n, d), dtype),) * 3 + (
        jax.ShapeDtypeStruct((b, h, n, k), jnp.int32),)
    for deterministic in (False, True):
        step = jax.jit(jax.value_and_grad(attention_loss, argnums=(0, 1, 2)),
                       static_argnums=(4, 5))
        with jax.sharding.use_abstract_mesh(mesh):
            exported = export.export(
                step, platforms=["cuda"],
                disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
            )(*args, "pallas", deterministic)
        assert exported.mlir_module().count("__gpu$xla.gpu.triton") == 6


SHARDED_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    import test_pallas_gather as t
    from iet_jax.kernels import gather
    assert jax.device_count() == 8
    rows = []  # the leading axis each Pallas primitive is traced with: (batch x heads) it sees

    def recorded(primitive):
        def run(x, y, idx):
            rows.append(x.shape[0])
            return primitive(x, y, idx)
        return run

    gather.PRIMITIVES["pallas"] = tuple(map(recorded, gather.PRIMITIVES["pallas"]))
    rng = np.random.default_rng(3)
    q, k, v = (jnp.asarray(rng.standard_normal((8, 2, t.N, t.D)), jnp.float32) for _ in range(3))
    idx = t.lists(rng, (8, 2, t.N, t.K), t.N)
    step = jax.jit(jax.value_and_grad(t.attention_loss, argnums=(0, 1, 2)), static_argnums=(4, 5))
    want = step(q, k, v, idx, "pallas", False)  # no mesh: no shard_map
    explicit, auto = jax.sharding.AxisType.Explicit, jax.sharding.AxisType.Auto
    for batch, spec, kind in ((8, P(("data", "fsdp")), explicit), (4, P("data"), auto)):
        mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(kind, kind))
        with jax.set_mesh(mesh):
            put = lambda a: jax.device_put(a[:batch], NamedSharding(mesh, spec))
            args = [put(a) for a in (q, k, v, idx)]
            rows.clear()
            jax.make_jaxpr(step, static_argnums=(4, 5))(*args, "pallas", False)
            # qk, av forward; dq, dk, da, dv backward: each on one device's share of the batch
            assert len(rows) >= 6 and set(rows) == {2}, rows
            got = step(*args, "pallas", False)
        ref = want if batch == 8 else step(q[:4], k[:4], v[:4], idx[:4], "pallas", False)
        for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
            t.close(g, r, 1e-5)  # another XLA program around the kernels: float32 rounding
        assert got[1][1].sharding.spec[0] == spec[0], got[1][1].sharding
    print("sharded ok")
""")


def test_pallas_under_mesh_uses_shard_map_and_matches():
    """8 simulated CPU devices (a fresh process: this one has already started JAX)."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu", PYTHONPATH=os.path.dirname(__file__))
    result = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], env=env, text=True,
                            capture_output=True, timeout=600)
    assert result.returncode == 0 and "sharded ok" in result.stdout, result.stderr[-3000:]


@pytest.mark.gpu
def test_compiled_kernels_match_xla_at_iet_shapes():
    # The compiled Triton kernels at one classical layer's size (B*h = 6, N = 56*56, K = 225,
    # d = 40): too slow to interpret on a CPU, so this runs only on a GPU.
    rng = np.random.default_rng(7)
    h, n, k, d = 6, 56 * 56, 225, 40
    x = jnp.asarray(rng.standard_normal((h, n, d)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((h, n, d)), jnp.float32)
    w = jnp.asarray(rng.random((h, n, k)), jnp.float32)
    idx = jnp.asarray(rng.integers(-1, n, (h, n, k)), jnp.int32)
    with jax.default_matmul_precision("highest"):
        close(pg.qk(x, y, idx), reference.qk(x, y, idx), RTOL[jnp.float32])
        close(pg.av(w, y, idx), reference.av(w, y, idx), RTOL[jnp.float32])
        close(pg.scatter(w, x, idx), reference.scatter(w, x, idx), RTOL[jnp.float32])
