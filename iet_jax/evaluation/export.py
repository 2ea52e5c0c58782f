"""A model shipped as a `jax.export` artifact: fixed-size tiles in, upscaled tiles out, runnable
with jax and numpy alone (no iet_jax).

`export_model(model, tile)` lowers the model's eval-mode forward pass on (batch, tile, tile, 3)
float32 NHWC inputs in [0, 1] to StableHLO with `jax.export`, with the weights inside as
constants, and returns the serialized artifact (`Exported.serialize()`) with a spec: a dict,
written as JSON beside it, of what the artifact expects and how to tile an image with it the
way `Upscaler(model, tile=tile, overlap=overlap)` does. Reading it back takes
`jax.export.deserialize(blob).call(tiles)`.

- **Batch.** The batch dimension is symbolic by default: one artifact takes any number of
  tiles per call (each call with a new batch size compiles once where it runs). `batch=N`
  fixes it instead.
- **Platforms.** Lowering does not need the device: the artifact holds one module for every
  platform of `PLATFORMS` that lowers ('cpu' must; the others are kept when they lower, and the
  spec names those that did not, with the reason). It runs on the platform of the caller's
  default JAX backend.
- **Gathers.** The attention's gathers are exported with `gather_impl='xla'` (plain XLA
  gathers), whatever the checkpoint says: the Pallas (Triton) kernels lower only for CUDA and
  the native CPU kernels exist only where iet-jax built them (`lower` also keeps the native
  top-k and merge out), so an artifact that used either would not run everywhere. The
  numbers are the same up to the order of float32 sums.
- **Tiles.** A tile smaller than `model.min_size()` is refused (the model would pad it).
  Inside a tile the model pads nothing, so each tile's output is exactly what the Upscaler
  computes for it; the blending of overlapping tiles is done by the caller (the spec's
  `tiling`).
- **Size.** Besides the weights the artifact holds the attention's initial candidate tables
  (constants of the tile size, int32, tile^2 x (local_range^2 + sparse_range^2) entries): for
  IET-light x4 at tile 96 they are 34 of its 38 MB. They compress well (gzip: 4.4 MB).

`check_output` and `write_export` write the artifact and its JSON (each atomically, refusing
existing files unless asked to overwrite).
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from iet_jax.conventions.text import shown
from iet_jax.evaluation import inference
from iet_jax.evaluation.pictures import file_in_the_way
from iet_jax.io import files
from iet_jax.kernels import native
from iet_jax.model.network import IET, abstract_model, count_parameters

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")  # what jax.export can lower for
REQUIRED_PLATFORMS = ("cpu",)
EXPORT_GATHER_IMPL = "xla"
SPEC_SUFFIX = ".json"
FORMAT = "iet-jax tile model (jax.export)"


def exportable(model: IET) -> IET:
    """The same model (same weights) with gather_impl 'xla', which lowers for every platform."""
    if model.config.gather_impl == EXPORT_GATHER_IMPL:
        return model
    fields = model.config.to_dict()
    fields["gather_impl"] = EXPORT_GATHER_IMPL
    graphdef, _ = nnx.split(abstract_model(ml_collections.ConfigDict(fields)))
    return nnx.merge(graphdef, nnx.state(model))


def _tile_forward(model: IET):
    """The jitted eval-mode forward pass, the weights closed over (constants of the export)."""
    graphdef, state = nnx.split(exportable(model))

    def upscale_tiles(x):
        return nnx.merge(graphdef, state)(x.astype(jnp.float32)).astype(jnp.float32)

    return jax.jit(upscale_tiles)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def check_platforms(platforms) -> tuple[str, ...]:
    platforms = tuple(dict.fromkeys(platforms))
    unknown = [p for p in platforms if p not in PLATFORMS]
    if unknown or not platforms:
        raise ValueError(f"unknown platform {shown(', '.join(unknown) or '(none)')}; choose "
                         f"among {', '.join(PLATFORMS)} (e.g. --platforms cpu,cuda)")
    return platforms


def lower(forward, arg, platforms, strict: bool = False):
    """(Exported for the platforms that lower, {platform: why not} for the others).

    All platforms are lowered together; when that fails each is tried alone. A platform of
    `REQUIRED_PLATFORMS` that does not lower, or with `strict` any, raises ValueError.
    The native CPU kernels stay out (`native.disabled`): the artifact must run without them.
    """
    platforms = check_platforms(platforms)
    with native.disabled():
        try:
            return jax.export.export(forward, platforms=platforms)(arg), {}
        except Exception:  # noqa: BLE001 - which platform failed is found below
            pass
        failed = {}
        for platform in platforms:
            try:
                jax.export.export(forward, platforms=(platform,))(arg)
            except Exception as e:  # noqa: BLE001 - lowering rules raise many kinds
                failed[platform] = _first_line(e)
        fatal = [p for p in failed if strict or p in REQUIRED_PLATFORMS]
        if fatal:
            p = fatal[0]
            hint = "" if p in REQUIRED_PLATFORMS else f"; leave {p} out of --platforms"
            raise ValueError(f"the model does not lower for {p} ({shown(failed[p])}){hint}")
        kept = tuple(p for p in platforms if p not in failed)
        return jax.export.export(forward, platforms=kept)(arg), failed


def export_model(model: IET, tile: int, batch: int | None = None,
                 platforms=PLATFORMS, *, overlap: int = inference.DEFAULT_OVERLAP,
                 strict: bool = False) -> tuple[bytes, dict]:
    """(serialized `jax.export` artifact, spec) of the model's forward pass on tiles.

    The artifact maps (batch, tile, tile, 3) float32 NHWC in [0, 1] to (batch, s*tile,
    s*tile, 3) float32 (not clipped); `batch=None` leaves the batch symbolic (any size).
    `overlap` is the tiling the spec describes (that of `Upscaler(model, tile=tile,
    overlap=overlap)`). Platforms that do not lower are left out (see `lower`).
    ValueError for a tile the model cannot run, a bad batch or platform.
    """
    inference.check_tile(model, tile, overlap)
    if batch is not None and batch < 1:
        raise ValueError(f"the batch must be 1 or more tiles, got {batch}; leave --batch out "
                         f"for any batch size")
    shape = (jax.export.symbolic_shape(f"b, {tile}, {tile}, 3") if batch is None
             else (batch, tile, tile, 3))
    exported, failed = lower(_tile_forward(model), jax.ShapeDtypeStruct(shape, jnp.float32),
                             platforms, strict)
    blob = bytes(exported.serialize())
    return blob, describe(model, tile, batch, overlap, exported, failed)


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def describe(model: IET, tile: int, batch: int | None, overlap: int, exported,
             failed: dict) -> dict:
    """The spec of an export: what goes in and out, the platforms, the tiling."""
    scale, config = inference.model_scale(model), model.config
    rows = "batch" if batch is None else batch
    return {
        "format": FORMAT,
        "load": "jax.export.deserialize(bytearray(open(artifact, 'rb').read())).call(tiles)",
        "scale": scale,
        "tile": tile,
        "batch": "any" if batch is None else batch,
        "input": {"shape": [rows, tile, tile, 3], "dtype": "float32", "layout": "NHWC",
                  "channels": "RGB", "range": [0.0, 1.0]},
        "output": {"shape": [rows, tile * scale, tile * scale, 3], "dtype": "float32",
                   "layout": "NHWC", "channels": "RGB",
                   "range": "about [0, 1], not clipped: clip before converting to integers"},
        "platforms": list(exported.platforms),
        "platforms_not_lowered": failed,
        "runs_on": "the platform of the caller's default JAX backend (jax.default_backend())",
        "tiling": {
            "overlap": overlap,
            "min_image": tile,
            "starts": "along a side of n LR pixels: [0] if n == tile, else k = max(2, "
                      "ceil((n - overlap) / (tile - overlap))) tiles starting at "
                      "round(i * (n - tile) / (k - 1)), i = 0 .. k-1",
            "blend": "each tile's output is weighted by outer(wy, wx): per side 1, except "
                     "across the overlap of m HR pixels with a neighbour, where it is "
                     "smoothstep(r) = r * r * (3 - 2 * r), r = (p + 0.5) / m at the p-th HR "
                     "pixel from the tile's edge (the smaller weight where two overlaps "
                     "meet); weighted outputs and weights are summed over the tiles, then "
                     "divided",
            "smaller_images": "images with a side below the tile do not fit: export a smaller "
                              "tile or upscale them with iet_jax",
            "same_as": f"iet_jax.evaluation.inference.Upscaler(model, tile={tile}, "
                       f"overlap={overlap})",
        },
        "model": {
            "compute_dtype": config.dtype,
            "param_dtype": config.param_dtype,
            "parameters": count_parameters(model),
            "min_tile": inference.model_min_size(model),
            "gather_impl": EXPORT_GATHER_IMPL,
            "gather_impl_note": "exported with the plain XLA gathers (not the Pallas or "
                                "native CPU kernels) so that it runs on every platform; the "
                                "same numbers up to the order of float32 sums",
            "config": json.loads(json.dumps(config.to_dict(), default=list)),
        },
        "calling_convention_version": exported.calling_convention_version,
        "versions": {"iet_jax": _version("iet-jax"), "jax": jax.__version__,
                     "jaxlib": _version("jaxlib")},
    }


def spec_path(output: str | Path) -> Path:
    """Where the spec of the artifact `output` goes: beside it, suffix .json."""
    return Path(output).with_suffix(SPEC_SUFFIX)


def check_output(output: str | Path, overwrite: bool = False) -> tuple[Path, Path]:
    """(artifact path, spec path), refused with a one-line ValueError before anything is
    computed: a folder, a name ending in .json, a folder path through a file, or existing files
    without `overwrite`."""
    output = Path(output)
    spec = spec_path(output)
    if output.suffix == SPEC_SUFFIX:
        raise ValueError(f"--output {shown(output)} ends in {SPEC_SUFFIX}, the name of the spec "
                         f"written beside the artifact: give e.g. {shown(spec.with_suffix('.jaxexport'))}")
    if output.is_dir():
        raise ValueError(f"--output {shown(output)} is a folder: give a file name, e.g. "
                         f"{shown(output / 'model.jaxexport')}")
    blocker = file_in_the_way(output.parent)
    if blocker is not None:
        raise ValueError(f"cannot make the folder {shown(output.parent)}: {shown(blocker)} is a "
                         f"file; give another --output")
    existing = [p for p in (output, spec) if p.exists()]
    if existing and not overwrite:
        raise ValueError(f"{' and '.join(shown(p) for p in existing)} already "
                         f"{'exist' if len(existing) > 1 else 'exists'}; use --overwrite to "
                         f"replace, or another --output")
    if spec.is_dir():
        raise ValueError(f"{shown(spec)} is a folder, where the spec would be written; give "
                         f"another --output")
    return output, spec


def write_export(output: str | Path, blob: bytes, spec: dict,
                 overwrite: bool = False) -> tuple[Path, Path]:
    """Write the artifact and its spec beside it (each under a temporary name, then renamed),
    after `check_output`. A spec that cannot be written takes the new artifact with it.
    Returns (artifact path, spec path); `files.WriteError` when the disk refuses."""
    output, spec_file = check_output(output, overwrite)
    files.make_dirs(output.parent, option="--output")
    files.write_bytes_atomic(output, blob, option="--output")
    try:
        files.write_text_atomic(spec_file, json.dumps(spec, indent=2) + "\n", option="--output")
    except files.WriteError:
        output.unlink(missing_ok=True)
        raise
    return output, spec_file
