"""Picture files for upscaling: PNG, JPEG and WebP in, upscaled files out.

`read_picture` reads a file as the model sees it (float RGB in [0, 1]) plus what is needed to
write it back (`Picture`: alpha, grayness, bit depth, format); `upscale_picture` runs an
`Upscaler` on it (alpha bicubically, `upscale_alpha`); `write_picture` writes the result with
the same bit depth, grayness and alpha. `collect_inputs` and `output_paths` find the input
files and name the outputs; `check_outputs` refuses, before anything is computed, outputs that
would overwrite an input, an existing file (unless asked to), or each other, and an output
folder that cannot be made.

Every file is written under a temporary name in its own folder and renamed when complete
(`atomic_output`): a failure or a kill mid-way never leaves a half-written file under the
output's name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
from pathlib import Path
from typing import Iterator

import numpy as np

from iet_jax.conventions.text import shown
from iet_jax.datasets.images import (check_pixels, exif_orientation, open_image, png_header,
                                     upright)
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


def read_picture(path: str | Path, max_pixels: int | None = None) -> Picture:
    """Read a PNG / JPEG / WebP file (8 or 16 bits, gray or color, with or without alpha).

    Read as the dataset builders read images (``datasets.images``): the size is checked
    against the pixel limit (``max_pixels``, default ``images.MAX_PIXELS``) from the header,
    before decoding, and the picture is turned upright as its EXIF orientation says.
    """
    path = Path(path)
    with open(path, "rb") as f:
        header = png_header(f.read(29))
    if header is not None and header[2] == 16:
        check_pixels(header[0], header[1], path, max_pixels)
        pic = _read_png16(path)
        turn = exif_orientation(path, max_pixels=max_pixels)
        if turn != 1:
            alpha = None if pic.alpha is None else np.ascontiguousarray(upright(pic.alpha, turn))
            pic = dataclasses.replace(pic, rgb=np.ascontiguousarray(upright(pic.rgb, turn)),
                                      alpha=alpha)
        return pic
    with open_image(path, max_pixels=max_pixels) as im:  # size checked, decoded, upright
        fmt = im.format if im.format in SAVE_OPTIONS else "PNG"
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


@contextlib.contextmanager
def atomic_output(path: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path in `path`'s folder to write to; rename it to `path` on success.

    On an exception the temporary file is removed and `path` is untouched. With
    `overwrite=False` an existing `path` (even one that appeared meanwhile) is never replaced:
    FileExistsError.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        temp = path.parent / f".{path.name[:100]}.{secrets.token_hex(4)}.part"
        try:
            open(temp, "xb").close()  # reserve the name (permissions as for any new file)
            break
        except FileExistsError:
            continue
    try:
        yield temp
        if overwrite:
            os.replace(temp, path)
        else:
            _publish_new(temp, path)
    finally:
        if os.path.lexists(temp):
            os.unlink(temp)


def _publish_new(temp: Path, path: Path) -> None:
    """Give `temp` the name `path` unless `path` exists."""
    exists = FileExistsError(f"{shown(path)} exists; not replaced (--overwrite replaces it)")
    try:
        os.link(temp, path)  # fails if `path` exists: nothing is ever replaced
    except FileExistsError:
        raise exists from None
    except OSError:  # a file system without hard links
        if os.path.lexists(path):
            raise exists from None
        os.replace(temp, path)


def write_picture(path: str | Path, pic: Picture, fmt: str = "PNG", overwrite: bool = True
                  ) -> None:
    """Write `pic` (values clipped to [0, 1]) with its bit depth, grayness and alpha, through
    a temporary file (`atomic_output`; `overwrite=False`: an existing file is kept)."""
    from PIL import Image

    color = np.clip(pic.rgb, 0.0, 1.0)
    if pic.gray:
        color = color.mean(axis=-1, keepdims=True)
    planes = [color] if pic.alpha is None else [color, np.clip(pic.alpha, 0, 1)[..., None]]
    data = np.concatenate(planes, axis=-1)
    with atomic_output(path, overwrite) as temp:
        if pic.bits == 16 and fmt == "PNG":
            import png

            values = np.round(data * 65535.0).astype(np.uint16)
            h, w, c = values.shape
            writer = png.Writer(w, h, greyscale=pic.gray, alpha=pic.alpha is not None,
                                bitdepth=16)
            with open(temp, "wb") as f:
                writer.write(f, values.reshape(h, w * c))
            return
        values = np.round(data * 255.0).astype(np.uint8)
        if fmt == "JPEG" and pic.alpha is not None:  # JPEG has no alpha
            values = values[..., :-1]
        if values.shape[-1] == 1:
            values = values[..., 0]
        Image.fromarray(values).save(temp, format=fmt, **SAVE_OPTIONS[fmt])


def upscale_picture(upscaler: inference.Upscaler, pic: Picture) -> Picture:
    sr = upscaler(pic.rgb)
    alpha = None if pic.alpha is None else upscale_alpha(pic.alpha, upscaler.scale)
    return dataclasses.replace(pic, rgb=sr, alpha=alpha)


def _identity(path: Path) -> tuple[int, int]:
    """The file itself (device, inode): the same for every path, link or hard link to it."""
    st = os.stat(path)
    return st.st_dev, st.st_ino


def collect_inputs(inputs: list[str], recursive: bool) -> tuple[list[tuple[Path, Path]], list[str]]:
    """(file, path relative to the output folder without suffix) pairs, and missing inputs.

    A file named twice with the same relative path (a folder and a file in it) is kept once.
    """
    found, missing, seen = [], [], set()
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            pattern = "**/*" if recursive else "*"
            files = sorted(p for p in path.glob(pattern)
                           if p.is_file() and p.suffix.lower() in EXTENSIONS)
            pairs = [(p, p.relative_to(path).with_suffix("")) for p in files]
        elif path.is_file():
            pairs = [(path, Path(path.stem))]
        else:
            missing.append(item)
            continue
        for src, rel in pairs:
            key = (_identity(src), rel)
            if key not in seen:
                seen.add(key)
                found.append((src, rel))
    return found, missing


def output_paths(jobs: list[tuple[Path, Path]], out_dir: Path, keep_format: bool) -> list[Path]:
    """Where each input goes. Inputs of different formats that would share a name get their
    source suffix added (`x.png`, `x.jpg` -> `x_png.png`, `x_jpg.png`); `check_outputs`
    refuses what still clashes (`a/x.png` and `b/x.png` into one folder)."""
    def name(src: Path, rel: Path, with_ext: bool) -> Path:
        suffix = src.suffix.lower() if keep_format and src.suffix.lower() in EXTENSIONS else ".png"
        stem = rel.name + (f"_{src.suffix.lstrip('.').lower()}" if with_ext else "")
        return out_dir / rel.parent / (stem + suffix)

    first = [name(src, rel, False) for src, rel in jobs]
    formats: dict[Path, set[str]] = {}
    for p, (src, _) in zip(first, jobs):
        formats.setdefault(p, set()).add(src.suffix.lower())
    return [p if len(formats[p]) == 1 else name(src, rel, True)
            for p, (src, rel) in zip(first, jobs)]


def file_in_the_way(folder: Path) -> Path | None:
    """The first of `folder` and its parents that exists, if it is not a folder."""
    for path in (folder, *folder.parents):
        if os.path.lexists(path):
            return None if path.is_dir() else path
    return None


def prepare_folder(folder: str | Path, flag: str = "--output", make: bool = True) -> Path:
    """Check that `folder` can be a folder and make it (with its parents) when `make`, before
    anything is computed; ValueError, one line naming the problem and the fix (for the option
    `flag`), if it cannot be made or written."""
    folder = Path(folder)
    blocker = file_in_the_way(folder)
    if blocker is not None:
        where = "" if blocker == folder else f" (inside {shown(blocker)}, a file)"
        raise ValueError(f"{flag} {shown(folder)} is not a folder{where}: give a folder (it is "
                         f"made if missing)")
    if not make:
        return folder
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot make the folder {flag} {shown(folder)}: {e.strerror}; give a "
                         f"folder you can write to") from e
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write into {flag} {shown(folder)}; give a folder you can "
                         f"write to")
    return folder


def check_outputs(jobs: list[tuple[Path, Path]], targets: list[Path], out_dir: Path,
                  overwrite: bool = False) -> None:
    """Refuse, before anything is computed, a run that would lose or destroy something.

    ValueError, one line naming the problem and the fix, when the output folder (or a
    subfolder) cannot be made because a file is in the way, when two inputs would be written
    to one output, when an output is an input file (refused even with `overwrite`), or when
    an output exists and `overwrite` is False.
    """
    prepare_folder(out_dir, "--output", make=False)
    for folder in sorted({t.parent for t in targets}):
        blocker = file_in_the_way(folder)
        if blocker is not None:
            raise ValueError(f"cannot make the folder {shown(folder)}: {shown(blocker)} is a "
                             f"file; give another --output folder")
    by_target: dict[Path, list[Path]] = {}
    for (src, _), target in zip(jobs, targets):
        by_target.setdefault(target, []).append(src)
    clashes = [(t, srcs) for t, srcs in by_target.items() if len(srcs) > 1]
    if clashes:
        target, (a, b, *_) = clashes[0]
        more = f" (and {len(clashes) - 1} more outputs named twice)" if len(clashes) > 1 else ""
        raise ValueError(f"{shown(a)} and {shown(b)} would both be written to {shown(target)}"
                         f"{more}: upscale them into different --output folders")
    inputs = {}
    for src, _ in jobs:
        with contextlib.suppress(OSError):  # gone meanwhile: reported when it is read
            inputs.setdefault(_identity(src), src)
    existing = []
    for target in targets:
        if not os.path.lexists(target):
            continue
        if os.path.exists(target) and _identity(target) in inputs:
            raise ValueError(
                f"{shown(target)} is the input {shown(inputs[_identity(target)])}: it would be "
                f"written over (even with --overwrite, inputs are never replaced); give an "
                f"--output folder that holds none of the inputs")
        if target.is_dir():
            raise ValueError(f"the output {shown(target)} is a folder; give another --output "
                             f"folder")
        existing.append(target)
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise ValueError(f"{shown(existing[0])} exists{more}; pass --overwrite to replace "
                         f"existing outputs, or give another --output folder")
