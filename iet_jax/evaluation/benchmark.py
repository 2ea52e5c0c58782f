"""Benchmark evaluation of a model: PSNR / SSIM on Y over datasets, as SR papers report them.

`evaluate_source(model, source, scale)` upscales every LR image of a sequence of
`{'hr', 'lr', 'name'}` and compares it with its HR image by `iet_jax.conventions.metrics`
(uint8, `scale` pixels cropped per border, BT.601 Y), with MATLAB-bicubic upscaling of the same
LR image as the reference row (`iet_jax.conventions.imresize.bicubic_upscale`).
`markdown_table` lays results out as the papers' tables; `parse_datasets` reads
`--datasets`; `describe_protocol` says how images reached the model (whole, tiled or the
official split test; see `iet_jax.evaluation.inference`).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from iet_jax.conventions import metrics
from iet_jax.conventions.text import shown
from iet_jax.conventions.imresize import bicubic_upscale
from iet_jax.datasets.catalog import BENCHMARKS
from iet_jax.evaluation import inference
from iet_jax.evaluation.pictures import atomic_output

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
            f"{shown(name)}: HR {hr.shape[0]}x{hr.shape[1]} and LR {h}x{w} are a x{ratio:g} "
            f"pair, but the model upscales x{scale}: evaluate on the dataset built for x{scale}")
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
    its 'patches' grid). `save_dir` receives each output as `<name>.png` (written under a
    temporary name and renamed when complete).
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
            raise ValueError(f"{shown(name)}: expected uint8 RGB images, got {lr.dtype} "
                             f"{lr.shape}")
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

            with atomic_output(save_dir / f"{_safe_name(name)}.png") as temp:
                Image.fromarray(sr).save(temp, format="PNG")
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


def format_scores(psnr: float, ssim: float) -> str:
    """'PSNR / SSIM' as the tables print them."""
    return f"{psnr:.2f} / {ssim:.4f}"


def markdown_table(results: dict[str, dict], scale: int, label: str) -> str:
    """Rows: bicubic and the model; columns: the datasets (PSNR / SSIM on Y)."""
    names = list(results)
    head = "| method | scale | " + " | ".join(DISPLAY_NAMES.get(n, n) for n in names) + " |"
    rule = "|---|---|" + "---|" * len(names)
    lines = [head, rule]
    if all("bicubic_psnr" in r for r in results.values()):
        lines.append(f"| bicubic | x{scale} | " + " | ".join(
            format_scores(r["bicubic_psnr"], r["bicubic_ssim"]) for r in results.values()) + " |")
    lines.append(f"| {label} | x{scale} | " + " | ".join(
        format_scores(r["psnr"], r["ssim"]) for r in results.values()) + " |")
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
