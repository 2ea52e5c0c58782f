"""Reading folder layouts: which image files make which HR/LR pairs.

Layouts are what people download or arrange by hand; each reader returns `Item`s (an HR
`Source`, and an LR one when the layout has it) for the builders (`builders.py`) to turn into
examples:

* ``pair_folders``: an HR folder with an optional LR folder, LR files matched by name
  (``0001.png``, ``0001x4.png``, ``img_HR.png``/``img_LR.png`` ...).
* Benchmarks: the official ``TestDataSR`` layout (``find_official_root``, ``official_items``),
  or a benchmark's own folder in one of the usual layouts (``find_benchmark_dir``,
  ``benchmark_layout``); ``benchmarks_in`` lists the benchmarks a folder holds.
* ``archive_images``: the PNG images of a zip archive or its extracted folder (DIV2K).
"""

from __future__ import annotations

import dataclasses
import os
import re
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np

from iet_jax.conventions.text import printable
from iet_jax.datasets import images
from iet_jax.datasets.catalog import BENCHMARKS

# Folder names people use for each benchmark (compared lower-case, without - and _).
BENCHMARK_ALIASES = {
    "set5": ("set5",),
    "set14": ("set14",),
    "b100": ("b100", "bsd100", "bsds100", "bsd100sr"),
    "urban100": ("urban100",),
    "manga109": ("manga109",),
}


@dataclasses.dataclass(frozen=True)
class Source:
    """Where one image's bytes come from: a file, or a member of a zip archive.

    ``stamp`` identifies the content for a build's fingerprint of its sources: a file's
    absolute path, size and modification time; a zip member's archive, name, size and CRC.
    """

    name: str                       # shown in messages
    read: Callable[[], bytes]
    stamp: tuple = ()

    @classmethod
    def file(cls, path: Path) -> "Source":
        path = Path(path)
        try:
            st = path.stat()
            stamp = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
        except OSError:  # reading it will say what is wrong
            stamp = (os.path.abspath(path),)
        return cls(str(path), path.read_bytes, stamp)

    @classmethod
    def zip_member(cls, zip_path: Path, member: str, info: zipfile.ZipInfo | None = None
                   ) -> "Source":
        def read() -> bytes:
            with zipfile.ZipFile(zip_path) as zf:
                found = zf.getinfo(member)
                # An image under the pixel limit needs at most 8 bytes a pixel (16-bit RGBA).
                most = 8 * images.pixel_limit() + (1 << 20)
                if found.file_size > most:
                    raise images.BadImageError(
                        f"{zip_path}:{member}", f"{found.file_size} bytes, more than any image "
                        "under the pixel limit needs")
                with zf.open(found) as f:
                    return f.read(found.file_size)  # inflated no further than declared
        stamp = (os.path.abspath(zip_path), member)
        if info is not None:
            stamp += (info.file_size, info.CRC)
        return cls(f"{zip_path}:{member}", read, stamp)

    @classmethod
    def array(cls, name: str, fn: Callable[[], np.ndarray]) -> "Source":
        return cls(name, lambda: images.encode_png(np.asarray(fn(), np.uint8), 1), (name,))


@dataclasses.dataclass(frozen=True)
class Item:
    """One example to build: HR, and LR if the dataset provides it."""

    name: str
    hr: Source
    lr: Source | None = None


def _missing(message: str) -> FileNotFoundError:
    """A FileNotFoundError whose message quotes file names safely (``printable``)."""
    return FileNotFoundError(printable(message, 2000))


# --------------------------------------------------------------------------- folders

def _lr_candidates(hr_stem: str, scale: int) -> list[str]:
    """LR file stems that commonly go with an HR stem."""
    c = [hr_stem, f"{hr_stem}x{scale}", f"{hr_stem}X{scale}", f"{hr_stem}_x{scale}",
         f"{hr_stem}_LR", f"{hr_stem}_lr"]
    for hr_tag, lr_tag in (("HR", "LR"), ("hr", "lr"), ("GT", "LR")):
        if hr_tag in hr_stem:
            c.append(hr_stem.replace(hr_tag, lr_tag))
            c.append(hr_stem.replace(hr_tag, lr_tag) + f"x{scale}")
    return c


def pair_folders(hr_dir, lr_dir, scale: int, *, strict_lr: bool = True) -> list[Item]:
    """Items for an HR folder and an optional LR folder, matching LR files by name.

    An HR image without an LR counterpart is an error when ``lr_dir`` is given (unless
    ``strict_lr`` is False, when its LR is generated).
    """
    hr_files = images.list_images(hr_dir)
    if not hr_files:
        raise _missing(f"no images in {hr_dir}")
    lr_by_stem = {}
    if lr_dir is not None:
        for p in images.list_images(lr_dir):
            lr_by_stem.setdefault(p.stem, p)
    items = []
    for p in hr_files:
        lr = None
        if lr_dir is not None:
            for cand in _lr_candidates(p.stem, scale):
                if cand in lr_by_stem:
                    lr = lr_by_stem[cand]
                    break
            if lr is None and strict_lr:
                raise _missing(
                    f"no LR image for {p} in {lr_dir} (looked for "
                    f"{', '.join(_lr_candidates(p.stem, scale)[:3])}, ... with any image "
                    "extension)")
        items.append(Item(p.stem, Source.file(p), Source.file(lr) if lr else None))
    return items


# --------------------------------------------------------------------------- benchmarks

def _norm(s: str) -> str:
    return re.sub(r"[-_ ]", "", s.lower())


def _manual_root(manual_dir) -> Path:
    root = Path(manual_dir)
    if not root.is_dir():
        raise _missing(f"manual_dir {root} is not a folder")
    return root


def _named_benchmark_dir(root: Path, bench: str) -> Path | None:
    """The folder named after ``bench``: ``root`` itself or a child (any depth ≤ 2), or None."""
    aliases = BENCHMARK_ALIASES[bench]
    if _norm(root.name) in aliases:
        return root
    for depth_glob in ("*", "*/*"):
        for p in sorted(root.glob(depth_glob)):
            if p.is_dir() and _norm(p.name) in aliases:
                return p
    return None


def find_benchmark_dir(manual_dir, bench: str) -> Path:
    """The folder of ``bench`` in ``manual_dir``: manual_dir itself or a child (any depth ≤ 2)."""
    root = _manual_root(manual_dir)
    # No folder named after the benchmark: manual_dir is the benchmark's own folder.
    return _named_benchmark_dir(root, bench) or root


def benchmarks_in(manual_dir) -> list[str]:
    """The benchmarks in ``manual_dir``, in ``BENCHMARKS`` order: the sets of the official
    layout, or else the benchmarks that have a folder named after them."""
    root = _manual_root(manual_dir)
    official = find_official_root(root)
    if official is not None:
        return list(official_sets(official))
    return [b for b in BENCHMARKS if _named_benchmark_dir(root, b) is not None]


# The official layout, read by every options/test/*.yml of IET:
#   TestDataSR/HR/<Set>/x{s}/<file>  with  TestDataSR/LR/LRBI/<Set>/x{s}/<file>,
# <Set> one of Set5, Set14, B100, Urban100, Manga109, and each LR file named exactly as its
# HR file (the option files set no filename template).

def _subdirs(folder: Path) -> dict[str, Path]:
    """The subfolders of ``folder`` by lower-case name."""
    return {p.name.lower(): p for p in sorted(folder.iterdir()) if p.is_dir()}


def _official_parts(folder: Path) -> tuple[Path, Path] | None:
    """``(HR/, LR/LRBI/)`` if ``folder`` is laid out as the official TestDataSR, else None."""
    hr, lrbi = folder / "HR", folder / "LR" / "LRBI"
    return (hr, lrbi) if hr.is_dir() and lrbi.is_dir() else None


def find_official_root(manual_dir) -> Path | None:
    """The folder in the official layout (with ``HR/`` and ``LR/LRBI/``): ``manual_dir`` or
    a folder up to two levels below it; None if there is none."""
    root = _manual_root(manual_dir)
    for p in [root] + sorted(root.glob("*")) + sorted(root.glob("*/*")):
        if p.is_dir() and _official_parts(p) is not None:
            return p
    return None


def official_sets(root: Path) -> dict[str, Path]:
    """The benchmarks under ``root/HR/`` (official layout): benchmark -> its HR folder."""
    hr_root, _ = _official_parts(root)
    found = {}
    for p in _subdirs(hr_root).values():
        for bench in BENCHMARKS:
            if _norm(p.name) in BENCHMARK_ALIASES[bench]:
                found.setdefault(bench, p)
    return {b: found[b] for b in BENCHMARKS if b in found}


def official_items(root: Path, bench: str, scale: int) -> tuple[Path, str, list[Item]]:
    """The items of one benchmark in the official layout; returns (HR folder, layout, items).

    Raises FileNotFoundError naming what is missing and what to do for a set without LR
    folder, a missing ``x{s}`` folder, or a file without its pair.
    """
    hr_root, lr_root = _official_parts(root)
    hr_sets = official_sets(root)
    if bench not in hr_sets:
        have = ", ".join(hr_sets) or "none"
        raise _missing(
            f"{hr_root} has no folder for {bench} (official layout: {hr_root}/<Set>/x{scale}/; "
            f"benchmarks there: {have}): add it, or build one of those")
    hr_set = hr_sets[bench]
    lr_set = next((p for p in _subdirs(lr_root).values()
                   if _norm(p.name) in BENCHMARK_ALIASES[bench]), None)
    if lr_set is None:
        raise _missing(
            f"{hr_set} has no LR folder {lr_root / hr_set.name}: put the x{scale} bicubic LR "
            f"images in {lr_root / hr_set.name / f'x{scale}'}, named as the HR files")
    scales = sorted(n for n in _subdirs(hr_set) if re.fullmatch(r"x\d+", n))
    hr_dir = _subdirs(hr_set).get(f"x{scale}")
    if hr_dir is None:
        raise _missing(
            f"{hr_set} has no x{scale} folder (it has {', '.join(scales) or 'none'}): add "
            f"{hr_set / f'x{scale}'} and {lr_set / f'x{scale}'}, or build another --scale")
    lr_dir = _subdirs(lr_set).get(f"x{scale}")
    if lr_dir is None:
        raise _missing(
            f"{lr_set} has no x{scale} folder for {hr_dir}: add {lr_set / f'x{scale}'} with "
            f"the x{scale} bicubic LR images, named as the HR files")
    hr_files = {p.name: p for p in images.list_images(hr_dir)}
    lr_files = {p.name: p for p in images.list_images(lr_dir)}
    if not hr_files:
        raise _missing(f"no images in {hr_dir}: put the HR images of {bench} there")
    for name, p in hr_files.items():
        if name not in lr_files:
            raise _missing(
                f"no LR image for {p}: expected {lr_dir / name} (same file name); add it or "
                "remove the HR image")
    for name, p in lr_files.items():
        if name not in hr_files:
            raise _missing(
                f"LR image {p} has no HR image {hr_dir / name} (same file name); add it or "
                "remove the LR image")
    items = [Item(p.stem, Source.file(p), Source.file(lr_files[name]))
             for name, p in hr_files.items()]
    layout = f"official HR/{hr_set.name}/x{scale}/ + LR/LRBI/{lr_set.name}/x{scale}/"
    return hr_set, layout, items


def benchmark_layout(folder, scale: int) -> tuple[str, list[Item]]:
    """Detect the layout of one benchmark folder; returns (layout description, items).

    Accepted layouts (first match wins):
      * ``HR/`` + ``LR_bicubic/X{s}/`` (EDSR's benchmark.tar): ``babyx4.png``
      * ``GTmod12/`` (or ``HR``/``GT``/``original``) + ``LRbicx{s}/`` (BasicSR's zips)
      * ``image_SRF_{s}/`` with ``*_HR.*`` and ``*_LR.*`` (Huang et al.'s downloads)
      * HR only: ``HR/``, ``GTmod12/``, ``GT/``, ``original/``, ``image_SRF_*/*_HR.*``, or
        the images directly in the folder; LR is then made with the MATLAB bicubic.
    """
    folder = Path(folder)
    sub = {p.name.lower(): p for p in folder.iterdir() if p.is_dir()}
    hr_names = ("hr", "gtmod12", "gt", "original")
    hr_dir = next((sub[n] for n in hr_names if n in sub), None)
    # EDSR layout
    if hr_dir is not None and "lr_bicubic" in sub:
        lr_root = {p.name.lower(): p for p in sub["lr_bicubic"].iterdir() if p.is_dir()}
        if f"x{scale}" in lr_root:
            return ("HR/ + LR_bicubic/X%d/" % scale,
                    pair_folders(hr_dir, lr_root[f"x{scale}"], scale))
    # BasicSR layout
    if hr_dir is not None and f"lrbicx{scale}" in sub:
        return (f"{hr_dir.name}/ + {sub[f'lrbicx{scale}'].name}/",
                pair_folders(hr_dir, sub[f"lrbicx{scale}"], scale))
    # Huang et al. layout
    srf = sub.get(f"image_srf_{scale}")
    if srf is not None:
        return f"{srf.name}/ *_HR + *_LR", _srf_items(srf, scale, with_lr=True)
    if hr_dir is not None:
        return f"{hr_dir.name}/ (HR only)", pair_folders(hr_dir, None, scale)
    srf_any = sorted(p for n, p in sub.items() if n.startswith("image_srf_"))
    if srf_any:
        return f"{srf_any[0].name}/ *_HR (HR only)", _srf_items(srf_any[0], scale, with_lr=False)
    if images.list_images(folder):
        return "images in the folder (HR only)", pair_folders(folder, None, scale)
    if any(re.fullmatch(r"x\d+", n) for n in sub):
        raise _missing(
            f"{folder} holds x<s> folders, as the official TestDataSR/HR/<Set>/: give "
            "--manual-dir the TestDataSR folder (the one with HR/ and LR/LRBI/)")
    raise _missing(
        f"no benchmark images found in {folder}: expected HR/ (+ LR_bicubic/X{scale}/), "
        f"GTmod12/ (+ LRbicx{scale}/), image_SRF_{scale}/ with *_HR/*_LR files, or images "
        "directly in the folder")


def _srf_items(folder: Path, scale: int, with_lr: bool) -> list[Item]:
    files = images.list_images(folder)
    hr = {p.stem[: -len("_HR")]: p for p in files if p.stem.endswith("_HR")}
    lr = {p.stem[: -len("_LR")]: p for p in files if p.stem.endswith("_LR")}
    if not hr:
        raise _missing(f"no *_HR images in {folder}")
    items = []
    for stem in sorted(hr):
        name = re.sub(r"_SRF_\d+$", "", stem)
        lr_src = None
        if with_lr:
            if stem not in lr:
                raise _missing(f"no LR image {stem}_LR.* for {hr[stem]} in {folder}")
            lr_src = Source.file(lr[stem])
        items.append(Item(name, Source.file(hr[stem]), lr_src))
    return items


# --------------------------------------------------------------------------- archives

def archive_images(root: Path, archive: str, inner: str) -> dict[str, Source]:
    """PNG images of ``root/archive.zip`` or ``root/archive/`` (or ``root/inner/``), by stem."""
    out = {}
    zip_path = root / f"{archive}.zip"
    if zip_path.is_file():
        with zipfile.ZipFile(zip_path) as zf:
            for info in zf.infolist():
                m = info.filename
                if m.lower().endswith(".png") and not m.endswith("/"):
                    out[Path(m).stem] = Source.zip_member(zip_path, m, info)
        return out
    for folder in (root / archive, root / inner if inner else None,
                   root / archive / inner if inner else None,
                   root / archive / archive):
        if folder is not None and folder.is_dir():
            files = images.list_images(folder)
            if files:
                return {p.stem: Source.file(p) for p in files}
    return out
