"""Benchmark evaluation of a model checkpoint: PSNR / SSIM on Y, as SR papers report them.

    iet-evaluate --checkpoint converted/iet_x4 \
        [--datasets set5,set14,b100,urban100,manga109] [--data-dir D] [--dataset-split test]
        [--self-ensemble] [--tile N --tile-overlap M | --official-split]
        [--save-images DIR] [--output DIR] [--which latest|best|STEP]

(`python -m iet_jax.evaluate` is the same command.) `--checkpoint` is a model directory or a
training workdir; of a workdir, `--which` picks the checkpoint whose EMA weights are evaluated:
the newest intact one (`latest`, the default), the best by validation PSNR (`best`) or a step.

Each dataset is opened with `iet_jax.datasets.open_source(name, split, scale)` at the
checkpoint's scale; every LR image is upscaled, and the output is compared with its HR image
by `iet_jax.conventions.metrics` (uint8, `scale` pixels cropped per border, BT.601 Y). The
reference row is MATLAB-bicubic upscaling of the same LR image
(`iet_jax.conventions.imresize`). Results print as a table (PSNR/SSIM per dataset) and, with
`--output`, go to `results.json` (per image too) and `results.md`. The library part is
`iet_jax.evaluation.benchmark`.

The protocol (how images reach the model) is recorded with the numbers: `whole` (default:
each image in one piece), `tiled` (`--tile`: blended fixed-size tiles) or `official-split`
(`--official-split`: the official IETModel test, which cuts LR images of 384 x 384 pixels or
more into patches and keeps each patch's own cell; see `iet_jax.evaluation.inference`). With the
split test each image's row in `results.json` gives its patch grid (`[1, 1]`: whole). With
`--tile`, an image that one tile covers goes through whole (same numbers as `whole`).

A checkpoint that cannot be loaded, and `--output` / `--save-images` that cannot be folders,
are refused before any compute: one `error:` line naming the problem and the fix, exit code 2
(`--verbose` adds the traceback). Outside text (paths, dataset and image names) is quoted with
non-printable characters escaped; every file is written under a temporary name and renamed
when complete.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from iet_jax import datasets
from iet_jax.conventions.text import command, shown
from iet_jax.evaluation import inference
from iet_jax.evaluation.command_line import Parser, add_checkpoint, error, load_checkpoint
from iet_jax.evaluation.benchmark import (DEFAULT_DATASETS, DISPLAY_NAMES, describe_protocol,
                                          evaluate_source, format_scores, markdown_table,
                                          parse_datasets)
from iet_jax.evaluation.pictures import atomic_output, prepare_folder
from iet_jax.io import model_dir


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog=command("iet-evaluate", "iet_jax.evaluate"),
        description="PSNR/SSIM (Y channel, border = scale) of a checkpoint on SR benchmarks.")
    add_checkpoint(p)
    p.add_argument("--datasets", default=",".join(DEFAULT_DATASETS),
                   help="comma-separated dataset names, each optionally NAME:SPLIT "
                        "(default %(default)s)")
    p.add_argument("--data-dir", default=None,
                   help="where datasets are built (default $IET_DATA_DIR or ~/tensorflow_datasets)")
    p.add_argument("--dataset-split", default=None,
                   help="split for every dataset (default: 'test' for the benchmarks, "
                        "'validation' for others such as demo and div2k)")
    p.add_argument("--scale", type=int, default=None,
                   help="expected scale; refused if the checkpoint's differs")
    p.add_argument("--self-ensemble", action="store_true", help="x8 self-ensemble")
    p.add_argument("--tile", type=int, default=None, help="tile side in LR pixels (default: whole)")
    p.add_argument("--tile-overlap", type=int, default=inference.DEFAULT_OVERLAP,
                   help="minimum tile overlap in LR pixels (default %(default)s)")
    p.add_argument("--tile-batch", type=int, default=inference.DEFAULT_TILE_BATCH)
    p.add_argument("--official-split", action="store_true",
                   help="the official IETModel test: LR images of at least "
                        f"{inference.OFFICIAL_SPLIT}x{inference.OFFICIAL_SPLIT} pixels (area) "
                        "in patches, as the paper's numbers were made (default: whole images)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float64"), default=None)
    p.add_argument("--limit", type=int, default=None, help="only the first N images of each")
    p.add_argument("--no-bicubic", action="store_true", help="skip the bicubic reference row")
    p.add_argument("--save-images", default=None, metavar="DIR",
                   help="write the SR outputs to DIR/<dataset>/<name>.png")
    p.add_argument("--output", default=None, metavar="DIR",
                   help="write results.json and results.md to DIR")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--verbose", action="store_true",
                   help="show the traceback of errors (checkpoint, datasets)")
    return p



def open_datasets(wanted, scale: int, data_dir) -> tuple[dict, list[str]]:
    """(name -> source, problems): every dataset opened before any compute."""
    sources, problems = {}, []
    for name, split in wanted:
        try:
            sources[name] = datasets.open_source(name, split, scale, data_dir=data_dir)
        except datasets.DatasetNotBuiltError as e:
            problems.append(f"dataset {shown(name)} (x{scale}) is not built; build it with:\n"
                            f"  {shown(e)}")
        except (FileNotFoundError, ValueError) as e:
            problems.append(f"dataset {shown(name)}: {shown(e)}")
    return sources, problems


def score_datasets(upscaler: inference.Upscaler, sources: dict, args) -> dict | None:
    """name -> scores of each dataset, printed as they come; None (after an error line) if
    one fails."""
    results = {}
    for name, source in sources.items():
        save = None if args.save_images is None else Path(args.save_images) / name
        try:
            res = evaluate_source(upscaler, source, upscaler.scale, save_dir=save,
                                  bicubic=not args.no_bicubic, limit=args.limit,
                                  progress=not args.no_progress, desc=shown(name))
        except ValueError as e:
            error(e, args.verbose)
            return None
        except Exception as e:  # noqa: BLE001 - out of memory: say what to change
            if not inference.is_out_of_memory(e):
                raise
            error(f"dataset {shown(name)}: {type(e).__name__}: {shown(e)}; "
                  f"{inference.memory_advice(upscaler)}", args.verbose)
            return None
        results[name] = res
        ref = (f"  (bicubic {format_scores(res['bicubic_psnr'], res['bicubic_ssim'])})"
               if "bicubic_psnr" in res else "")
        print(f"{shown(DISPLAY_NAMES.get(name, name))}: {res['count']} images, "
              f"{format_scores(res['psnr'], res['ssim'])}{ref}, {res['seconds']:.1f} s", flush=True)
    return results


def write_results(out: Path, label: str, upscaler: inference.Upscaler, wanted, results: dict,
                  table: str, args) -> None:
    """results.json (settings and scores) and results.md (the table), each written whole."""
    scale = upscaler.scale
    settings = {"checkpoint": str(Path(args.checkpoint).absolute()), "which": args.which,
                "scale": scale,
                "splits": dict(wanted), "self_ensemble": args.self_ensemble,
                "protocol": upscaler.protocol, "split_patch": upscaler.split,
                "tile": args.tile, "tile_overlap": args.tile_overlap if args.tile else None,
                "dtype": str(upscaler.model.config.dtype), "limit": args.limit,
                "metric": "PSNR (dB) / SSIM on Y (BT.601), uint8, border = scale"}
    with atomic_output(out / "results.json") as temp:
        temp.write_text(json.dumps({"settings": settings, "datasets": results}, indent=1))
    extras = ", ".join(s for s in (
        describe_protocol(upscaler), "x8 self-ensemble" if args.self_ensemble else "") if s)
    md = (f"# {label} x{scale}\n\nPSNR (dB) / SSIM on the Y channel, {scale} border pixels "
          "cropped; splits: " + ", ".join(f"{n} `{sp}`" for n, sp in wanted)
          + f"; {extras}.\n\n{table}\n")
    with atomic_output(out / "results.md") as temp:
        temp.write_text(md)
    print(f"\nwrote {shown(out / 'results.json')} and {shown(out / 'results.md')}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    folders = [(folder, flag) for folder, flag in (
        (args.output, "--output"), (args.save_images, "--save-images")) if folder is not None]
    try:  # the datasets' names and the output folders first: before the checkpoint
        wanted = parse_datasets(args.datasets, args.dataset_split)
        for folder, flag in folders:
            prepare_folder(folder, flag, make=False)
        model = load_checkpoint(args.checkpoint, args.dtype, args.verbose, args.which)
        split = inference.OFFICIAL_SPLIT if args.official_split else None
        upscaler = inference.Upscaler(model, tile=args.tile, overlap=args.tile_overlap,
                                      self_ensemble=args.self_ensemble,
                                      tile_batch=args.tile_batch, split=split)
    except (model_dir.CheckpointError, FileNotFoundError, ValueError) as e:
        error(e, args.verbose)
        return 2
    if args.scale is not None and args.scale != upscaler.scale:
        error(f"the checkpoint upscales x{upscaler.scale}, not x{args.scale}")
        return 2
    sources, problems = open_datasets(wanted, upscaler.scale, args.data_dir)
    for message in problems:
        error(message)
    if problems:
        return 1
    try:
        for folder, flag in folders:
            prepare_folder(folder, flag)
    except ValueError as e:
        error(e, args.verbose)
        return 2
    print(f"protocol: {describe_protocol(upscaler)}", flush=True)
    results = score_datasets(upscaler, sources, args)
    if results is None:
        return 1
    label = shown(Path(args.checkpoint).name or "model")
    table = markdown_table(results, upscaler.scale, label)
    print()
    print(shown(table, keep_newlines=True))
    if args.output is not None:
        write_results(Path(args.output), label, upscaler, wanted, results, table, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
