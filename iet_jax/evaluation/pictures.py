"""Picture files for upscaling: PNG, JPEG and WebP in, upscaled files out.

`read_picture` reads a file as the model sees it (float RGB in [0, 1]) plus what is needed to
write it back (`Picture`: alpha, grayness, bit depth, format); `upscale_picture` runs an
`Upscaler` on it (alpha bicubically, `upscale_alpha`); `write_picture` writes the result with
the same bit depth, grayness and alpha. `collect_inputs` and `output_paths` find the input
files and name the outputs.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from iet_jax.datasets.images import png_bit_depth
from iet_jax.evaluation import inference


EXTENSIONS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
SAVE_OPTIONS = {"PNG": {}, "JPEG": {"quality": 95}, "WEBP": {"quality": 95}}


@dataclasses.dataclass
class Picture:
    """An image file's content as the model sees it, plus what is needed to write it back."""

    rgb: np.ndarray  # float32 (H, W, 3) in [0, 1]
    alpha: np.ndarray | None = None  # float32 (H, W) in [0, 1]
    gray: bool = False
    bits: int = 8  # 8 or 16
    format: str = "PNG"  # PNG, JPEG, WEBP


def _read_png16(path: Path) -> Picture:
    import png  # pypng: Pillow reads 16-bit RGB PNGs as 8-bit

    width, height, rows, info = png.Reader(filename=str(path)).asDirect()
    planes = info["planes"]
    data = np.vstack([np.asarray(row, np.uint16) for row in rows])
    data = data.reshape(height, width, planes).astype(np.float32) / 65535.0
    gray = bool(info["greyscale"])
    color = data[..., :1 if gray else 3]
    alpha = data[..., -1] if info["alpha"] else None
    rgb = np.repeat(color, 3, axis=-1) if gray else color
    return Picture(np.ascontiguousarray(rgb), alpha, gray, 16, "PNG")


def read_picture(path: str | Path) -> Picture:
    """Read a PNG / JPEG / WebP file (8 or 16 bits, gray or color, with or without alpha)."""
    from PIL import Image, ImageOps

    path = Path(path)
    with open(path, "rb") as f:
        if png_bit_depth(f.read(29)) == 16:
            return _read_png16(path)
    with Image.open(path) as im:
        im.load()
        fmt = im.format if im.format in SAVE_OPTIONS else "PNG"
        im = ImageOps.exif_transpose(im)
        mode = im.mode
        if mode == "P":
            im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        elif mode == "PA":
            im = im.convert("RGBA")
        elif mode == "1":
            im = im.convert("L")
        elif mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit gray
            values = np.asarray(im).astype(np.float32) / 65535.0
            return Picture(np.repeat(np.clip(values, 0, 1)[..., None], 3, -1), None, True, 16, fmt)
        elif mode not in ("L", "LA", "RGB", "RGBA"):
            im = im.convert("RGBA" if "A" in mode else "RGB")
        data = np.asarray(im).astype(np.float32) / 255.0
    if data.ndim == 2:
        data = data[..., None]
    gray = data.shape[-1] in (1, 2)
    color = data[..., :1] if gray else data[..., :3]
    alpha = data[..., -1] if data.shape[-1] in (2, 4) else None
    rgb = np.repeat(color, 3, axis=-1) if gray else color
    return Picture(np.ascontiguousarray(rgb), alpha, gray, 8, fmt)


def upscale_alpha(alpha: np.ndarray, scale: int) -> np.ndarray:
    """Bicubic (Pillow, float) upscaling of an alpha channel, clipped to [0, 1]."""
    from PIL import Image

    h, w = alpha.shape
    img = Image.fromarray(np.ascontiguousarray(alpha, np.float32))  # mode F
    return np.clip(np.asarray(img.resize((w * scale, h * scale), Image.BICUBIC)), 0.0, 1.0)


def write_picture(path: str | Path, pic: Picture, fmt: str = "PNG") -> None:
    """Write `pic` (values clipped to [0, 1]) with its bit depth, grayness and alpha."""
    from PIL import Image

    color = np.clip(pic.rgb, 0.0, 1.0)
    if pic.gray:
        color = color.mean(axis=-1, keepdims=True)
    planes = [color] if pic.alpha is None else [color, np.clip(pic.alpha, 0, 1)[..., None]]
    data = np.concatenate(planes, axis=-1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if pic.bits == 16 and fmt == "PNG":
        import png

        values = np.round(data * 65535.0).astype(np.uint16)
        h, w, c = values.shape
        writer = png.Writer(w, h, greyscale=pic.gray, alpha=pic.alpha is not None, bitdepth=16)
        with open(path, "wb") as f:
            writer.write(f, values.reshape(h, w * c))
        return
    values = np.round(data * 255.0).astype(np.uint8)
    if fmt == "JPEG" and pic.alpha is not None:  # JPEG has no alpha
        values = values[..., :-1]
    if values.shape[-1] == 1:
        values = values[..., 0]
    Image.fromarray(values).save(path, format=fmt, **SAVE_OPTIONS[fmt])


def upscale_picture(upscaler: inference.Upscaler, pic: Picture) -> Picture:
    sr = upscaler(pic.rgb)
    alpha = None if pic.alpha is None else upscale_alpha(pic.alpha, upscaler.scale)
    return dataclasses.replace(pic, rgb=sr, alpha=alpha)


def collect_inputs(inputs: list[str], recursive: bool) -> tuple[list[tuple[Path, Path]], list[str]]:
    """(file, path relative to the output folder without suffix) pairs, and missing inputs."""
    found, missing = [], []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            pattern = "**/*" if recursive else "*"
            files = sorted(p for p in path.glob(pattern)
                           if p.is_file() and p.suffix.lower() in EXTENSIONS)
            found += [(p, p.relative_to(path).with_suffix("")) for p in files]
        elif path.is_file():
            found.append((path, Path(path.stem)))
        else:
            missing.append(item)
    return found, missing


def output_paths(jobs: list[tuple[Path, Path]], out_dir: Path, keep_format: bool) -> list[Path]:
    """Where each input goes; a name that two inputs share gets its source suffix added."""
    def name(src: Path, rel: Path, with_ext: bool) -> Path:
        suffix = src.suffix.lower() if keep_format and src.suffix.lower() in EXTENSIONS else ".png"
        stem = rel.name + (f"_{src.suffix.lstrip('.').lower()}" if with_ext else "")
        return out_dir / rel.parent / (stem + suffix)

    first = [name(src, rel, False) for src, rel in jobs]
    counts: dict[Path, int] = {}
    for p in first:
        counts[p] = counts.get(p, 0) + 1
    return [p if counts[p] == 1 else name(src, rel, True)
            for p, (src, rel) in zip(first, jobs)]
