"""Benchmark evaluation of a model checkpoint: PSNR / SSIM on Y, as SR papers report them.

    python -m iet_jax.evaluate --checkpoint converted/iet_x4 \
        [--datasets set5,set14,b100,urban100,manga109] [--data-dir D] [--dataset-split test]
        [--self-ensemble] [--tile N --tile-overlap M | --official-split]
        [--save-images DIR] [--output DIR]

Each dataset is opened with `iet_jax.datasets.open_source(name, split, scale)` at the
checkpoint's scale; every LR image is upscaled, and the output is compared with its HR image
by `iet_jax.metrics` (uint8, `scale` pixels cropped per border, BT.601 Y). The reference row
is MATLAB-bicubic upscaling of the same LR image (`iet_jax.imresize`). Results print as a
table (PSNR/SSIM per dataset) and, with `--output`, go to `results.json` (per image too) and
`results.md`.

The protocol (how images reach the model) is recorded with the numbers: `whole` (default:
each image in one piece), `tiled` (`--tile`: blended fixed-size tiles) or `official-split`
(`--official-split`: the official IETModel test, which cuts LR images of 384 x 384 pixels or
more into patches and keeps each patch's own cell; see `iet_jax.inference`). With the split
test each image's row in `results.json` gives its patch grid (`[1, 1]`: whole).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from iet_jax import inference
from iet_jax.io import model_dir
from iet_jax.conventions import metrics
from iet_jax.conventions.imresize import bicubic_upscale
from iet_jax.datasets.catalog import BENCHMARKS

DEFAULT_DATASETS = BENCHMARKS  # the five every SR paper reports
DISPLAY_NAMES = {"set5": "Set5", "set14": "Set14", "b100": "B100", "urban100": "Urban100",
                 "manga109": "Manga109", "demo": "Demo"}


def _check_pair(hr: np.ndarray, lr: np.ndarray, scale: int, name: str) -> np.ndarray:
    """HR cropped to LR * scale (as BasicSR's paired dataset does), or a clear error."""
    h, w = lr.shape[:2]
    if hr.shape[0] < h * scale or hr.shape[1] < w * scale or (
            hr.shape[0] >= (h + 1) * scale or hr.shape[1] >= (w + 1) * scale):
        ratio = hr.shape[0] / h
        raise ValueError(
            f"{name}: HR {hr.shape[0]}x{hr.shape[1]} and LR {h}x{w} are a x{ratio:g} pair, but "
            f"the model upscales x{scale}: evaluate on the dataset built for x{scale}")
    return hr[:h * scale, :w * scale]


def evaluate_source(model, source: Sequence[dict], scale: int, *, self_ensemble: bool = False,
                    tile: int | None = None, overlap: int = inference.DEFAULT_OVERLAP,
                    save_dir: str | Path | None = None, bicubic: bool = True,
                    tile_batch: int = inference.DEFAULT_TILE_BATCH, limit: int | None = None,
                    progress: bool = False, desc: str = "", split: int | None = None) -> dict:
    """PSNR / SSIM (Y, border `scale`) of `model` over a sequence of {'hr', 'lr', 'name'}.

    `model` is an IET (or an `inference.Upscaler`, or a callable with a `scale`). Returns
    {'count', 'psnr', 'ssim', 'bicubic_psnr', 'bicubic_ssim', 'seconds', 'protocol',
    'images': [...]} with the means over the images (bicubic entries only when `bicubic`).
    `split=inference.OFFICIAL_SPLIT` runs the official split test (then each image row has
    its 'patches' grid). `save_dir` receives each output as `<name>.png`.
    """
    if isinstance(model, inference.Upscaler):
        upscaler = model
    else:
        upscaler = inference.Upscaler(model, tile=tile, overlap=overlap,
                                      self_ensemble=self_ensemble, tile_batch=tile_batch,
                                      split=split)
    if upscaler.scale != scale:
        raise ValueError(f"the checkpoint upscales x{upscaler.scale} but the dataset is x{scale}")
    source_scale = getattr(source, "scale", None)
    if source_scale is not None and source_scale != scale:
        raise ValueError(f"the dataset was opened at x{source_scale} but the model upscales "
                         f"x{scale}")
    save_dir = None if save_dir is None else Path(save_dir)
    n = len(source) if limit is None else min(limit, len(source))
    indices = range(n)
    if progress:
        from tqdm import tqdm

        indices = tqdm(indices, desc=desc or "evaluating", unit="img", leave=False)
    rows, seconds = [], 0.0
    for i in indices:
        example = source[i]
        name = str(example.get("name", f"{i:04d}"))
        lr = np.asarray(example["lr"])
        if lr.dtype != np.uint8 or lr.ndim != 3 or lr.shape[-1] != 3:
            raise ValueError(f"{name}: expected uint8 RGB images, got {lr.dtype} {lr.shape}")
        hr = _check_pair(np.asarray(example["hr"]), lr, scale, name)
        start = time.perf_counter()
        sr = metrics.to_uint8(upscaler(lr.astype(np.float32) / 255.0))
        seconds += time.perf_counter() - start
        row = {"name": name, "lr_shape": list(lr.shape[:2]),
               "psnr": metrics.psnr(sr, hr, scale), "ssim": metrics.ssim(sr, hr, scale)}
        if upscaler.split is not None:
            row["patches"] = list(inference.split_grid(*lr.shape[:2], upscaler.split))
        if bicubic:
            ref = bicubic_upscale(lr, scale)
            row["bicubic_psnr"] = metrics.psnr(ref, hr, scale)
            row["bicubic_ssim"] = metrics.ssim(ref, hr, scale)
        rows.append(row)
        if save_dir is not None:
            from PIL import Image

            save_dir.mkdir(parents=True, exist_ok=True)
            Image.fromarray(sr).save(save_dir / f"{_safe_name(name)}.png")
    result = {"count": len(rows), "seconds": seconds, "protocol": upscaler.protocol}
    keys = ["psnr", "ssim"] + (["bicubic_psnr", "bicubic_ssim"] if bicubic else [])
    for key in keys:
        result[key] = float(np.mean([r[key] for r in rows])) if rows else math.nan
    result["images"] = rows
    return result


def describe_protocol(upscaler: inference.Upscaler) -> str:
    """How the images reached the model, in words (for results.md and the printout)."""
    if upscaler.protocol == "official-split":
        size = upscaler.split
        return (f"official split test (IETModel.test: LR images of {size}x{size} pixels or "
                f"more in patches, the rest whole)")
    if upscaler.protocol == "tiled":
        return f"tiles {upscaler.tile} (overlap {upscaler.overlap})"
    return "whole images"


def _safe_name(name: str) -> str:
    name = Path(name).stem if "." in Path(name).name else Path(name).name
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "image"


def _cell(psnr: float, ssim: float) -> str:
    return f"{psnr:.2f} / {ssim:.4f}"


def markdown_table(results: dict[str, dict], scale: int, label: str) -> str:
    """Rows: bicubic and the model; columns: the datasets (PSNR / SSIM on Y)."""
    names = list(results)
    head = "| method | scale | " + " | ".join(DISPLAY_NAMES.get(n, n) for n in names) + " |"
    rule = "|---|---|" + "---|" * len(names)
    lines = [head, rule]
    if all("bicubic_psnr" in r for r in results.values()):
        lines.append(f"| bicubic | x{scale} | " + " | ".join(
            _cell(r["bicubic_psnr"], r["bicubic_ssim"]) for r in results.values()) + " |")
    lines.append(f"| {label} | x{scale} | " + " | ".join(
        _cell(r["psnr"], r["ssim"]) for r in results.values()) + " |")
    return "\n".join(lines)


def parse_datasets(spec: str, split: str | None = None) -> list[tuple[str, str]]:
    """'set5,demo:validation' -> [('set5', 'test'), ('demo', 'validation')].

    The split of a name without one is `split` if given, else 'test' for the benchmarks and
    'validation' for anything else (the demo data, DIV2K).
    """
    out = []
    for item in spec.split(","):
        item = item.strip().lower()
        if not item:
            continue
        name, _, own = item.partition(":")
        default = "test" if name in DEFAULT_DATASETS else "validation"
        out.append((name, own or split or default))
    if not out:
        raise ValueError("--datasets names no dataset")
    if len({n for n, _ in out}) != len(out):
        raise ValueError(f"--datasets names a dataset twice: {spec}")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m iet_jax.evaluate",
        description="PSNR/SSIM (Y channel, border = scale) of a checkpoint on SR benchmarks.")
    p.add_argument("--checkpoint", required=True,
                   help="model directory (config.json + params/) or what load_model accepts")
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
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        wanted = parse_datasets(args.datasets, args.dataset_split)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        model = (model_dir.load_model(args.checkpoint) if args.dtype is None
                 else model_dir.load_model(args.checkpoint, dtype=args.dtype))
        split = inference.OFFICIAL_SPLIT if args.official_split else None
        upscaler = inference.Upscaler(model, tile=args.tile, overlap=args.tile_overlap,
                                      self_ensemble=args.self_ensemble,
                                      tile_batch=args.tile_batch, split=split)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    scale = upscaler.scale
    if args.scale is not None and args.scale != scale:
        print(f"error: the checkpoint upscales x{scale}, not x{args.scale}", file=sys.stderr)
        return 2
    from iet_jax import datasets

    sources, problems = {}, []
    for name, split in wanted:  # open every dataset first: fail before any compute
        try:
            sources[name] = datasets.open_source(name, split, scale, data_dir=args.data_dir)
        except datasets.DatasetNotBuiltError as e:
            problems.append(f"dataset {name} (x{scale}) is not built; build it with:\n  {e}")
        except (FileNotFoundError, ValueError) as e:
            problems.append(f"dataset {name}: {e}")
    if problems:
        for msg in problems:
            print(f"error: {msg}", file=sys.stderr)
        return 1
    label = Path(args.checkpoint).name or "model"
    settings = {"checkpoint": str(Path(args.checkpoint).absolute()), "scale": scale,
                "splits": dict(wanted), "self_ensemble": args.self_ensemble,
                "protocol": upscaler.protocol, "split_patch": upscaler.split,
                "tile": args.tile, "tile_overlap": args.tile_overlap if args.tile else None,
                "dtype": str(model.config.dtype), "limit": args.limit,
                "metric": "PSNR (dB) / SSIM on Y (BT.601), uint8, border = scale"}
    print(f"protocol: {describe_protocol(upscaler)}", flush=True)
    results = {}
    for name, source in sources.items():
        save = None if args.save_images is None else Path(args.save_images) / name
        try:
            res = evaluate_source(upscaler, source, scale, save_dir=save,
                                  bicubic=not args.no_bicubic, limit=args.limit,
                                  progress=not args.no_progress, desc=name)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        results[name] = res
        ref = (f"  (bicubic {_cell(res['bicubic_psnr'], res['bicubic_ssim'])})"
               if "bicubic_psnr" in res else "")
        print(f"{DISPLAY_NAMES.get(name, name)}: {res['count']} images, "
              f"{_cell(res['psnr'], res['ssim'])}{ref}, {res['seconds']:.1f} s", flush=True)
    table = markdown_table(results, scale, label)
    print()
    print(table)
    if args.output is not None:
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(
            {"settings": settings, "datasets": results}, indent=1))
        extras = ", ".join(s for s in (
            describe_protocol(upscaler), "x8 self-ensemble" if args.self_ensemble else "") if s)
        md = (f"# {label} x{scale}\n\nPSNR (dB) / SSIM on the Y channel, {scale} border pixels "
              "cropped; splits: " + ", ".join(f"{n} `{sp}`" for n, sp in wanted)
              + f"; {extras}.\n\n{table}\n")
        (out / "results.md").write_text(md)
        print(f"\nwrote {out / 'results.json'} and {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
