"""Upscale image files with a model checkpoint.

    python -m iet_jax.upscale --checkpoint converted/iet_x4 photo.jpg folder/ --output out/
        [--tile 128 --tile-overlap 16] [--self-ensemble] [--recursive] [--keep-format]

Inputs are PNG, JPEG or WebP files, or folders of them (`--recursive` descends into
subfolders; the folder structure is kept under `--output`). Each image is written as
`<stem>.png` (or in its own format with `--keep-format`).

- Grayscale images go through the model as three equal channels and are written back as
  grayscale (the mean of the three output channels).
- An alpha channel is upscaled bicubically (Pillow) and re-attached.
- 16-bit PNGs are computed from their 16-bit values and written as 16-bit PNGs.
- An unreadable file is reported and skipped; the others go on. The exit code is 1 if any
  file failed, 2 for a bad command line, checkpoint or tile size.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from iet_jax.evaluation import inference
from iet_jax.evaluation.pictures import (collect_inputs, output_paths, read_picture,
                                         upscale_picture, write_picture)
from iet_jax.io import model_dir


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m iet_jax.upscale",
        description="Upscale PNG/JPEG/WebP images (files or folders) with an iet-jax checkpoint.")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders")
    p.add_argument("--checkpoint", required=True,
                   help="model directory (config.json + params/), e.g. from iet_jax.convert")
    p.add_argument("--output", required=True, help="folder for the upscaled images")
    p.add_argument("--tile", type=int, default=None,
                   help="tile side in LR pixels (default: whole images; each new size compiles)")
    p.add_argument("--tile-overlap", type=int, default=inference.DEFAULT_OVERLAP,
                   help="minimum overlap of neighbouring tiles in LR pixels (default %(default)s)")
    p.add_argument("--tile-batch", type=int, default=inference.DEFAULT_TILE_BATCH,
                   help="tiles per model call (default %(default)s)")
    p.add_argument("--self-ensemble", action="store_true", help="x8 self-ensemble (8x slower)")
    p.add_argument("--recursive", "-r", action="store_true", help="descend into subfolders")
    p.add_argument("--keep-format", action="store_true",
                   help="write each image in its input format (default: PNG)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float64"), default=None,
                   help="compute dtype (default: the checkpoint's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def load_upscaler(args) -> inference.Upscaler:
    model = (model_dir.load_model(args.checkpoint) if args.dtype is None
             else model_dir.load_model(args.checkpoint, dtype=args.dtype))
    return inference.Upscaler(model, tile=args.tile, overlap=args.tile_overlap,
                              self_ensemble=args.self_ensemble, tile_batch=args.tile_batch)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from tqdm import tqdm

    jobs, missing = collect_inputs(args.inputs, args.recursive)
    for item in missing:
        print(f"error: {item}: no such file or folder", file=sys.stderr)
    if not jobs:
        print("error: no PNG, JPEG or WebP images found in the inputs", file=sys.stderr)
        return 1
    try:
        upscaler = load_upscaler(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out_dir = Path(args.output)
    targets = output_paths(jobs, out_dir, args.keep_format)
    failed = list(missing)
    start = time.perf_counter()
    bar = tqdm(list(zip(jobs, targets)), unit="img", disable=args.no_progress or None,
               desc=f"x{upscaler.scale}")
    for (src, _), dst in bar:
        bar.set_postfix_str(src.name, refresh=False)
        try:
            pic = read_picture(src)
        except Exception as e:  # noqa: BLE001 - any unreadable file is reported, not fatal
            tqdm.write(f"error: cannot read {src}: {e}", file=sys.stderr)
            failed.append(str(src))
            continue
        try:
            out = upscale_picture(upscaler, pic)
            fmt = pic.format if args.keep_format else "PNG"
            write_picture(dst, out, fmt)
        except Exception as e:  # noqa: BLE001
            tqdm.write(f"error: {src}: {type(e).__name__}: {e}", file=sys.stderr)
            failed.append(str(src))
    bar.close()
    done = len(jobs) - (len(failed) - len(missing))
    elapsed = time.perf_counter() - start
    print(f"upscaled {done} of {len(jobs) + len(missing)} images x{upscaler.scale} into "
          f"{out_dir} in {elapsed:.1f} s" + (f"; {len(failed)} failed:" if failed else ""))
    for item in failed:
        print(f"  {item}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
