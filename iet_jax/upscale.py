"""Upscale image files with a model checkpoint.

    iet-upscale --checkpoint converted/iet_x4 photo.jpg folder/ --output out/
        [--tile 128 --tile-overlap 16] [--auto-tile-above PIXELS] [--self-ensemble]
        [--recursive] [--keep-format] [--overwrite] [--which latest|best|STEP] [--verbose]

(`python -m iet_jax.upscale` is the same command.) `--checkpoint` is a model directory or a
training workdir; of a workdir, `--which` picks the checkpoint whose EMA weights upscale: the
newest intact one (`latest`, the default), the best by validation PSNR (`best`) or a step.

Inputs are PNG, JPEG or WebP files, or folders of them (`--recursive` descends into
subfolders; the folder structure is kept under `--output`). Each image is written as
`<stem>.png` (or in its own format with `--keep-format`).

- Grayscale images go through the model as three equal channels and are written back as
  grayscale (the mean of the three output channels).
- An alpha channel is upscaled bicubically (Pillow) and re-attached.
- 16-bit PNGs are computed from their 16-bit values and written as 16-bit PNGs.
- Images larger than `--auto-tile-above` LR pixels (default 192 x 192) are upscaled in tiles
  when no `--tile` is given, so memory stays bounded (0: always whole images).
- Nothing is lost: before anything is computed, the run is refused (exit code 2, one line
  naming the problem and the fix) if an output would be written over an input file, over an
  existing file (unless `--overwrite`), or over another input's output (`a/x.png` and
  `b/x.png` into one folder), or if `--output` cannot be a folder. Each file is written under
  a temporary name and renamed when complete.
- An unreadable file is reported and skipped; the others go on. The exit code is 1 if any
  file failed, 2 for a bad command line, checkpoint, tile size or output. File names are
  quoted with non-printable characters escaped.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from iet_jax.conventions.text import command, shown
from iet_jax.evaluation import inference
from iet_jax.evaluation.command_line import Parser, add_checkpoint, error, load_checkpoint
from iet_jax.evaluation.pictures import (check_outputs, collect_inputs, output_paths,
                                         prepare_folder, read_picture, upscale_picture,
                                         write_picture)
from iet_jax.io import model_dir


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog=command("iet-upscale", "iet_jax.upscale"),
        description="Upscale PNG/JPEG/WebP images (files or folders) with an iet-jax checkpoint.")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders")
    add_checkpoint(p)
    p.add_argument("--output", required=True,
                   help="folder for the upscaled images (made if missing); a run that would "
                        "write over an input file is refused")
    p.add_argument("--overwrite", action="store_true",
                   help="replace outputs that exist already (never an input file)")
    p.add_argument("--tile", type=int, default=None,
                   help="tile side in LR pixels, clamped to the image (an image the tile "
                        "covers goes through whole); default: whole images up to "
                        "--auto-tile-above pixels (each new size compiles)")
    p.add_argument("--tile-overlap", type=int, default=inference.DEFAULT_OVERLAP,
                   help="minimum overlap of neighbouring tiles in LR pixels (default %(default)s)")
    p.add_argument("--tile-batch", type=int, default=inference.DEFAULT_TILE_BATCH,
                   help="tiles per model call (default %(default)s)")
    p.add_argument("--auto-tile-above", type=int, default=inference.DEFAULT_AUTO_TILE_ABOVE,
                   metavar="PIXELS",
                   help="without --tile, upscale images of more than PIXELS LR pixels "
                        "(height x width) in tiles of about sqrt(PIXELS / tile batch) a side, "
                        "so that one model call gets about PIXELS pixels; 0: always whole "
                        "(default %(default)s = 192 x 192, chosen from CPU measurements: "
                        "5 KB per LR pixel for the demo model, 100 KB for IET-light x4 and "
                        "290 KB for IET x4; GPUs are not measured yet)")
    p.add_argument("--self-ensemble", action="store_true", help="x8 self-ensemble (8x slower)")
    p.add_argument("--recursive", "-r", action="store_true", help="descend into subfolders")
    p.add_argument("--keep-format", action="store_true",
                   help="write each image in its input format (default: PNG)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float64"), default=None,
                   help="compute dtype (default: the checkpoint's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--verbose", action="store_true",
                   help="show the traceback of errors (checkpoint, files)")
    return p


def load_upscaler(args) -> inference.Upscaler:
    model = load_checkpoint(args.checkpoint, args.dtype, args.verbose, args.which)
    return inference.Upscaler(model, tile=args.tile, overlap=args.tile_overlap,
                              self_ensemble=args.self_ensemble, tile_batch=args.tile_batch,
                              auto_tile_above=args.auto_tile_above or None)


def upscale_files(upscaler: inference.Upscaler, jobs, targets, args) -> tuple[list, int]:
    """Read, upscale and write each (input, output) pair; a file that fails is reported and
    skipped. Returns (the inputs that failed, how many images were tiled automatically)."""
    from tqdm import tqdm

    failed, auto_tiled = [], 0
    bar = tqdm(list(zip(jobs, targets)), unit="img", disable=args.no_progress or None,
               desc=f"x{upscaler.scale}")
    for (src, _), dst in bar:
        bar.set_postfix_str(shown(src.name), refresh=False)
        try:
            pic = read_picture(src)
        except Exception as e:  # noqa: BLE001 - any unreadable file is reported, not fatal
            error(f"cannot read {shown(src)}: {shown(e)}", args.verbose, tqdm.write)
            failed.append(src)
            continue
        height, width = pic.rgb.shape[:2]
        if upscaler.tile is None and upscaler.tile_for(height, width) is not None:
            if not auto_tiled:
                tqdm.write(f"note: {shown(src)} has {height} x {width} = {height * width} LR "
                           f"pixels, more than --auto-tile-above {upscaler.auto_tile_above}: "
                           f"upscaled in tiles of {upscaler.auto_tile} (so are other such "
                           f"images); --tile sets the tile, --auto-tile-above 0 turns this off")
            auto_tiled += 1
        try:
            out = upscale_picture(upscaler, pic)
            fmt = pic.format if args.keep_format else "PNG"
            write_picture(dst, out, fmt, overwrite=args.overwrite)
        except Exception as e:  # noqa: BLE001
            advice = (f"; {inference.memory_advice(upscaler, height, width)}"
                      if inference.is_out_of_memory(e) else "")
            error(f"{shown(src)}: {type(e).__name__}: {shown(e)}{advice}", args.verbose,
                  tqdm.write)
            failed.append(src)
    bar.close()
    return failed, auto_tiled


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.auto_tile_above < 0:
        error(f"--auto-tile-above is a number of LR pixels (0: never tile), got "
              f"{args.auto_tile_above}; use --auto-tile-above 0 or more")
        return 2
    jobs, missing = collect_inputs(args.inputs, args.recursive)
    for item in missing:
        error(f"{shown(item)}: no such file or folder")
    if not jobs:
        error("no PNG, JPEG or WebP images found in the inputs")
        return 1
    out_dir = Path(args.output)
    targets = output_paths(jobs, out_dir, args.keep_format)
    try:  # the outputs before the checkpoint, the checkpoint before any compute
        check_outputs(jobs, targets, out_dir, args.overwrite)
        upscaler = load_upscaler(args)
        prepare_folder(out_dir, "--output")
    except (model_dir.CheckpointError, FileNotFoundError, ValueError) as e:
        error(e, args.verbose)
        return 2
    start = time.perf_counter()
    failed, auto_tiled = upscale_files(upscaler, jobs, targets, args)
    failed = list(missing) + failed
    done = len(jobs) - (len(failed) - len(missing))
    elapsed = time.perf_counter() - start
    tiled = f" ({auto_tiled} in tiles of {upscaler.auto_tile})" if auto_tiled else ""
    print(f"upscaled {done} of {len(jobs) + len(missing)} images x{upscaler.scale}{tiled} into "
          f"{shown(out_dir)} in {elapsed:.1f} s" + (f"; {len(failed)} failed:" if failed else ""))
    for item in failed:
        print(f"  {shown(item)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
