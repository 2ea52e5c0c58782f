"""Ship a model: a `jax.export` artifact of its forward pass on fixed-size tiles.

    python -m iet_jax.export --checkpoint converted/iet_light_x4 --tile 96 \\
        --output model.jaxexport [--tile-overlap 16] [--batch N] [--platforms cpu,cuda,tpu]
        [--dtype bfloat16] [--overwrite] [--verbose]

Writes `model.jaxexport` (the serialized `jax.export.Exported`: the weights are inside) and
`model.json` beside it (what the artifact expects and returns, the platforms it holds, how to
tile an image with it as `python -m iet_jax.upscale --tile 96 --tile-overlap 16` does, the
versions and the checkpoint). Running it needs jax and numpy only:
`jax.export.deserialize(bytearray(open("model.jaxexport", "rb").read())).call(tiles)` with
tiles (batch, 96, 96, 3) float32 in [0, 1]; the README has a loader that tiles whole images.

- The batch dimension is symbolic (any number of tiles per call) unless `--batch N`.
- Lowering needs no accelerator: by default the artifact holds every platform of cpu, cuda,
  rocm and tpu that lowers (cpu must); `--platforms` asks for some, all of which must lower.
- The attention's gathers are exported as plain XLA gathers (`gather_impl='xla'`), which lower
  everywhere, not as the Pallas kernels (CUDA only) or the native CPU kernels (built where
  iet-jax is installed); its top-k and merge are XLA's too.
- Nothing is computed before the command line, the output and the checkpoint are checked: a
  bad checkpoint, a tile below the model's minimum (named), an existing output without
  `--overwrite` are refused with one line and exit code 2. Both files are written under
  temporary names and renamed when complete.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from iet_jax.conventions.text import command, shown
from iet_jax.evaluation import export as export_lib
from iet_jax.evaluation import inference
from iet_jax.evaluation.command_line import Parser, add_checkpoint, error, load_checkpoint
from iet_jax.io import files, model_dir


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog=command("iet-export", "iet_jax.export"),
        description="Export an iet-jax checkpoint's forward pass on fixed-size tiles as a "
                    "jax.export artifact (+ a JSON spec beside it) that runs without iet_jax.")
    add_checkpoint(p)
    p.add_argument("--tile", type=int, required=True,
                   help="tile side in LR pixels (at least the model's minimum, e.g. 75 for "
                        "the official eval settings)")
    p.add_argument("--output", required=True,
                   help="the artifact, e.g. model.jaxexport; the spec goes beside it "
                        "(model.json)")
    p.add_argument("--tile-overlap", type=int, default=inference.DEFAULT_OVERLAP,
                   help="the overlap of neighbouring tiles the spec describes, in LR pixels "
                        "(default %(default)s, as python -m iet_jax.upscale)")
    p.add_argument("--batch", type=int, default=None,
                   help="a fixed number of tiles per call (default: any, a symbolic batch)")
    p.add_argument("--platforms", default=None,
                   help=f"comma-separated, among {','.join(export_lib.PLATFORMS)}; all must "
                        f"lower (default: those of them that lower; cpu must)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="compute dtype (default: the checkpoint's); tiles go in and out as "
                        "float32 whatever it is")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing artifact and spec")
    p.add_argument("--verbose", action="store_true", help="show the traceback of errors")
    return p


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:  # the command line and the output before the checkpoint, all of them before lowering
        strict = args.platforms is not None
        platforms = export_lib.check_platforms(
            [p.strip() for p in args.platforms.split(",") if p.strip()] if strict
            else export_lib.PLATFORMS)
        if args.batch is not None and args.batch < 1:
            raise ValueError(f"--batch must be 1 or more tiles, got {args.batch}; leave it out "
                             f"for any batch size")
        export_lib.check_output(args.output, args.overwrite)
        model = load_checkpoint(args.checkpoint, args.dtype, args.verbose, args.which)
        inference.check_tile(model, args.tile, args.tile_overlap)
    except (model_dir.CheckpointError, FileNotFoundError, ValueError) as e:
        error(e, args.verbose)
        return 2
    start = time.perf_counter()
    try:
        blob, spec = export_lib.export_model(model, args.tile, args.batch, platforms,
                                             overlap=args.tile_overlap, strict=strict)
        spec["checkpoint"] = str(Path(args.checkpoint).absolute())
        output, spec_file = export_lib.write_export(args.output, blob, spec, args.overwrite)
    except (ValueError, files.WriteError) as e:
        error(e, args.verbose)
        return 2
    elapsed = time.perf_counter() - start
    batch = "any number of" if args.batch is None else str(args.batch)
    print(f"exported the x{spec['scale']} model on {batch} {args.tile} x {args.tile} tiles for "
          f"{', '.join(spec['platforms'])} to {shown(output)} ({_size(len(blob))}) and "
          f"{shown(spec_file)} in {elapsed:.1f} s")
    for platform, why in spec["platforms_not_lowered"].items():
        print(f"note: left out {platform}, which does not lower: {shown(why)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
