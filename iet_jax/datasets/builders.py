"""TFDS builders for super-resolution data, written as ``array_record`` files.

Every builder has one config per scale (``x2``, ``x3``, ``x4``) and yields examples
``{'hr': uint8 (H, W, 3), 'lr': uint8 (H/s, W/s, 3), 'name': str}`` with ``H, W``
multiples of the scale. Missing LR images are made with the MATLAB bicubic
(``iet_jax.conventions.imresize``) after cropping HR to a multiple of the scale.

Building needs no TensorFlow: images reach TFDS as PNG bytes encoded with Pillow (TFDS
only calls ``tf.image.encode_png`` for NumPy arrays), and the ``array_record`` writer and
example serializer are TF-free.

Builders and their on-disk names (``<data_dir>/<name>/x<s>/1.0.0/``):

* ``DemoBuilder`` (``iet_demo``): photographs shipped with scikit-image; train/validation.
* ``FolderBuilder`` (``iet_<name>``): HR folders (+ optional LR folders); split ``train``.
* ``BenchmarkBuilder`` (``iet_set5``, ...): benchmark folders from ``manual_dir`` (the
  official ``TestDataSR`` layout or the usual benchmark folders); split ``test``.
* ``Div2kBuilder`` (``iet_div2k``): DIV2K's official zips (or their extracted folders) from
  ``manual_dir``; splits ``train`` and ``validation``.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import os
import re
import zipfile
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds

from iet_jax.conventions import imresize
from iet_jax.datasets import images
from iet_jax.datasets.source import BENCHMARKS

SCALES = (2, 3, 4)
VERSION = tfds.core.Version("1.0.0")
STORAGES = ("png", "raw")

# Folder names people use for each benchmark (compared lower-case, without - and _).
BENCHMARK_ALIASES = {
    "set5": ("set5",),
    "set14": ("set14",),
    "b100": ("b100", "bsd100", "bsds100", "bsd100sr"),
    "urban100": ("urban100",),
    "manga109": ("manga109",),
}


class SRConfig(tfds.core.BuilderConfig):
    """One config per scale factor."""

    def __init__(self, scale: int):
        super().__init__(name=f"x{scale}", version=VERSION,
                         description=f"x{scale}: LR is the MATLAB-bicubic 1/{scale} downscale")
        self.scale = scale


@dataclasses.dataclass(frozen=True)
class Source:
    """Where one image's bytes come from: a file, or a member of a zip archive."""

    name: str                       # shown in messages
    read: Callable[[], bytes]

    @classmethod
    def file(cls, path: Path) -> "Source":
        path = Path(path)
        return cls(str(path), path.read_bytes)

    @classmethod
    def zip_member(cls, zip_path: Path, member: str) -> "Source":
        def read() -> bytes:
            with zipfile.ZipFile(zip_path) as zf:
                return zf.read(member)
        return cls(f"{zip_path}:{member}", read)

    @classmethod
    def array(cls, name: str, fn: Callable[[], np.ndarray]) -> "Source":
        return cls(name, lambda: images.encode_png(np.asarray(fn(), np.uint8), 1))


@dataclasses.dataclass(frozen=True)
class Item:
    """One example to build: HR, and LR if the dataset provides it."""

    name: str
    hr: Source
    lr: Source | None = None


def make_pair(item: Item, scale: int) -> tuple[dict, tuple]:
    """Read and check one pair; returns (example, (lr_hw, hr_hw)).

    Raises ``images.BadImageError`` naming the file for anything unusable.
    """
    return _pair(item, scale)[0]


def make_examples(item: Item, scale: int, subimage: int | None = None,
                  subimage_step: int | None = None,
                  storage: str = "png") -> list[tuple[str, dict, tuple]]:
    """The examples of one item: the whole pair, or its sub-images (BasicSR-style).

    With ``subimage`` (an HR size, e.g. 480) the pair is cut into HR crops of that size
    every ``subimage_step`` pixels (default size/2), plus a last crop flush with the
    bottom/right edge, with the matching LR crops; sides shorter than ``subimage`` are
    kept whole. Names get a suffix ``_s001``, ``_s002``, ... Smaller images decode faster,
    which is what makes random-patch training on 2K images fast.

    ``storage='raw'`` stores uncompressed arrays instead of PNG bytes.
    """
    if storage not in STORAGES:
        raise ValueError(f"storage must be one of {STORAGES}, got {storage!r}")
    if not subimage and storage == "png":
        example, sizes = _pair(item, scale)[0]
        return [(item.name, example, sizes)]
    _, hr, lr = _pair(item, scale, encode=False)
    enc = images.encode_png if storage == "png" else np.ascontiguousarray
    if not subimage:
        return [(item.name, {"hr": enc(hr), "lr": enc(lr), "name": item.name},
                 (tuple(lr.shape[:2]), tuple(hr.shape[:2])))]
    step = subimage_step or subimage // 2
    if subimage % scale or step % scale:
        raise ValueError(f"sub-image size {subimage} and step {step} must be multiples of the "
                         f"scale {scale}")
    H, W = hr.shape[:2]

    def starts(n):
        if n <= subimage:
            return [0]
        pos = list(range(0, n - subimage + 1, step))
        if pos[-1] + subimage < n:
            pos.append(n - subimage)
        return pos

    out = []
    k = 0
    for y in starts(H):
        for x in starts(W):
            k += 1
            hr_c = hr[y:y + subimage, x:x + subimage]
            ys, xs = y // scale, x // scale
            lr_c = lr[ys:ys + hr_c.shape[0] // scale, xs:xs + hr_c.shape[1] // scale]
            name = f"{item.name}_s{k:03d}"
            out.append((name, {"hr": enc(hr_c), "lr": enc(lr_c), "name": name}, (tuple(lr_c.shape[:2]), tuple(hr_c.shape[:2]))))
    return out


def _pair(item: Item, scale: int, encode: bool = True):
    hr_bytes = _read(item.hr)
    hr = images.decode_rgb(hr_bytes, item.hr.name)
    H, W = hr.shape[:2]
    if item.lr is not None:
        lr_bytes = _read(item.lr)
        lr = images.decode_rgb(lr_bytes, item.lr.name)
        h, w = lr.shape[:2]
        # HR may exceed LR*s by less than s (HR not cropped to a multiple of s).
        if not (h * scale <= H < (h + 1) * scale and w * scale <= W < (w + 1) * scale):
            raise images.BadImageError(
                item.lr.name,
                f"LR size {h}x{w} does not match HR {item.hr.name} of size {H}x{W} at "
                f"x{scale} (expected LR {H // scale}x{W // scale})")
        hr_out = hr[: h * scale, : w * scale]
        if not encode:
            return None, hr_out, lr
        lr_png = lr_bytes if _is_plain_png(lr_bytes, lr) else images.encode_png(lr)
    else:
        if H < scale or W < scale:
            raise images.BadImageError(item.hr.name,
                                       f"image of {H}x{W} is smaller than the scale {scale}")
        hr_out = imresize.mod_crop(hr, scale)
        lr = imresize.downscale(hr_out, scale)
        if not encode:
            return None, hr_out, lr
        lr_png = images.encode_png(lr)
    untouched = hr_out.shape == hr.shape and _is_plain_png(hr_bytes, hr)
    hr_png = hr_bytes if untouched else images.encode_png(hr_out)
    example = {"hr": hr_png, "lr": lr_png, "name": item.name}
    return (example, (tuple(lr.shape[:2]), tuple(hr_out.shape[:2]))), hr_out, lr


def _read(src: Source) -> bytes:
    try:
        return src.read()
    except (OSError, KeyError, zipfile.BadZipFile) as e:
        raise images.BadImageError(src.name, f"cannot read ({e})")


def _is_plain_png(data: bytes, decoded: np.ndarray) -> bool:
    """True if ``data`` is an 8-bit RGB PNG (Pillow reads it back as exactly ``decoded``)."""
    # IHDR colour type 2 = truecolour without alpha; bit depth 8.
    return (data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 26 and data[24] == 8
            and data[25] == 2 and decoded.ndim == 3)


class SRBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of the iet-jax builders: configs per scale, bad-data handling, metadata."""

    VERSION = VERSION
    BUILDER_CONFIGS = [SRConfig(s) for s in SCALES]
    DESCRIPTION = "Super-resolution pairs."
    # TFDS derives this from the package via importlib_resources (an extra dependency);
    # giving it directly also tells TFDS there is no checksums file (nothing to download).
    code_path = Path(__file__)
    HOMEPAGE = "https://github.com/CVL-UESTC/IET"

    def __init__(self, *, skip_bad: bool = False, num_workers: int | None = None,
                 verbose: bool = True, subimage: int | None = None,
                 subimage_step: int | None = None, storage: str = "png", **kwargs):
        if storage not in STORAGES:
            raise ValueError(f"storage must be one of {STORAGES}, got {storage!r}")
        self.storage = storage
        self.skip_bad = skip_bad
        self.subimage = subimage
        self.subimage_step = subimage_step
        self.num_workers = num_workers or min(8, os.cpu_count() or 1)
        self.verbose = verbose
        self.skipped: dict[str, list[dict]] = {}
        self._sizes: dict[str, list] = {}
        super().__init__(**kwargs)

    # Subclasses: the items of each split.
    def _items(self) -> dict[str, Sequence[Item]]:
        raise NotImplementedError

    def _info(self) -> tfds.core.DatasetInfo:
        if self.storage == "raw":  # uncompressed: bigger, but no PNG decoding when read
            image = tfds.features.Tensor(shape=(None, None, 3), dtype=np.uint8,
                                         encoding=tfds.features.Encoding.BYTES)
        else:
            image = tfds.features.Image(shape=(None, None, 3), dtype=np.uint8,
                                        encoding_format="png")
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.DESCRIPTION,
            features=tfds.features.FeaturesDict(
                {"hr": image, "lr": image, "name": tfds.features.Text()}),
            homepage=self.HOMEPAGE,
            metadata=tfds.core.MetadataDict(),
            disable_shuffling=True,
        )

    @property
    def scale(self) -> int:
        return self.builder_config.scale

    def _split_generators(self, dl_manager):
        if self.subimage:
            step = self.subimage_step or self.subimage // 2
            if self.subimage % self.scale or step % self.scale:
                raise ValueError(f"sub-image size {self.subimage} and step {step} must be "
                                 f"multiples of the scale {self.scale}")
        splits = self._items()
        for split, items in splits.items():
            if not items:
                raise FileNotFoundError(f"{self.name}: no images found for split {split!r}")
        return {split: self._generate_examples(split, items) for split, items in splits.items()}

    def _generate_examples(self, split: str, items: Sequence[Item]) -> Iterator:
        skipped = self.skipped.setdefault(split, [])
        sizes = self._sizes.setdefault(split, [])
        names = set()

        def work(it):
            return _try_examples(it, self.scale, self.subimage, self.subimage_step,
                                 self.storage)

        for item, result in _ordered_map(work, items, self.num_workers):
            if isinstance(result, images.BadImageError):
                if not self.skip_bad:
                    raise images.BadImageError(
                        result.path, result.reason + "\n(build with --skip-bad / "
                        "skip_bad=True to skip bad images and count them)") from result
                skipped.append({"name": item.name, "file": result.path, "reason": result.reason})
                if self.verbose:
                    print(f"skipping {result}")
                continue
            for name, example, (lr_hw, hr_hw) in result:
                if name in names:
                    raise ValueError(f"{self.name}: two images are named {name!r} in split "
                                     f"{split!r}; image names must be unique")
                names.add(name)
                sizes.append([name, list(lr_hw), list(hr_hw)])
                yield name, example
        self._record_metadata()

    def _record_metadata(self):
        md = self.info.metadata
        md["scale"] = self.scale
        md["num_skipped"] = {s: len(v) for s, v in self.skipped.items()}
        md["skipped"] = self.skipped
        md["sizes"] = {s: v for s, v in self._sizes.items()}
        md["size_fields"] = ["name", "lr_hw", "hr_hw"]
        md["storage"] = self.storage
        if self.subimage:
            md["subimage"] = {"size": self.subimage,
                              "step": self.subimage_step or self.subimage // 2}
        total = sum(len(v) for v in self.skipped.values())
        desc = self.DESCRIPTION
        if self.subimage:
            desc += (f" Cut into HR sub-images of {self.subimage} px every "
                     f"{self.subimage_step or self.subimage // 2} px.")
        if total:
            desc += (f"\nSkipped {total} bad image(s) while building: "
                     + ", ".join(f"{d['file']} ({d['reason']})"
                                 for v in self.skipped.values() for d in v))
        self.info.as_proto.description = desc

    def download_and_prepare(self, *args, **kwargs):
        kwargs.setdefault("file_format", "array_record")
        super().download_and_prepare(*args, **kwargs)
        total = sum(len(v) for v in self.skipped.values())
        if self.verbose and self.skipped:
            print(f"{self.name}/{self.builder_config.name}: skipped {total} bad image(s)")


def _try_examples(item: Item, scale: int, subimage, subimage_step, storage):
    try:
        return make_examples(item, scale, subimage, subimage_step, storage)
    except images.BadImageError as e:
        return e


def _ordered_map(fn, items: Iterable, workers: int) -> Iterator:
    """(item, fn(item)) in input order, at most 2*workers computed ahead."""
    items = list(items)
    if workers <= 1:
        for it in items:
            yield it, fn(it)
        return
    with concurrent.futures.ThreadPoolExecutor(workers) as ex:
        pending = collections.deque()
        it = iter(items)
        for x in it:
            pending.append((x, ex.submit(fn, x)))
            if len(pending) >= 2 * workers:
                break
        while pending:
            x, fut = pending.popleft()
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt, ex.submit(fn, nxt)))
            yield x, fut.result()


def _init_name(builder_name: str) -> str:
    name = builder_name.lower()
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ValueError(f"dataset name must be lower-case letters, digits and _, "
                         f"starting with a letter; got {builder_name!r}")
    return "iet_" + name


# --------------------------------------------------------------------------- demo

# scikit-image photographs (files inside the package, no download). Validation gets two
# colour photos and one grayscale one; the rest train. Grayscale ones become RGB.
DEMO_TRAIN = ("astronaut", "rocket", "motorcycle_left", "hubble_deep_field",
              "immunohistochemistry", "camera", "brick", "grass", "gravel")
DEMO_VALIDATION = ("chelsea", "coffee", "moon")


def _skimage_photo(name: str) -> np.ndarray:
    import skimage.data

    if name == "motorcycle_left":
        img = skimage.data.stereo_motorcycle()[0]
    else:
        img = getattr(skimage.data, name)()
    img = np.asarray(img)
    if img.dtype != np.uint8:
        raise ValueError(f"skimage.data.{name} is {img.dtype}, expected uint8")
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    return img[:, :, :3]


class DemoBuilder(SRBuilder, skip_registration=True):
    """Real photographs shipped with scikit-image: builds in seconds, no download."""

    name = "iet_demo"
    DESCRIPTION = ("Demo SR data: photographs bundled with scikit-image (grayscale ones "
                   "converted to RGB); LR = MATLAB bicubic of the HR cropped to a multiple "
                   "of the scale. Train: " + ", ".join(DEMO_TRAIN) + ". Validation: "
                   + ", ".join(DEMO_VALIDATION) + ".")

    def _items(self):
        def items(names):
            return [Item(n, Source.array(f"skimage.data.{n}",
                                         lambda n=n: _skimage_photo(n))) for n in names]
        return {"train": items(DEMO_TRAIN), "validation": items(DEMO_VALIDATION)}


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
        raise FileNotFoundError(f"no images in {hr_dir}")
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
                raise FileNotFoundError(
                    f"no LR image for {p} in {lr_dir} (looked for "
                    f"{', '.join(_lr_candidates(p.stem, scale)[:3])}, ... with any image "
                    "extension)")
        items.append(Item(p.stem, Source.file(p), Source.file(lr) if lr else None))
    return items


class FolderBuilder(SRBuilder, skip_registration=True):
    """A training set from HR folders, each with an optional LR folder (split ``train``).

    ``FolderBuilder(name='df2k', hr_dirs=[DIV2K_train_HR, Flickr2K_HR], config='x4',
    data_dir=...)``. LR folders, if given, are matched to HR folders by position
    (``None`` for a folder without LR) and hold that scale's LR images named like
    the HR (``0001.png``, ``0001x4.png``, ``img_HR.png``/``img_LR.png`` ...).
    """

    name = "iet_folder"
    DESCRIPTION = "SR training pairs from image folders."

    def __init__(self, *, name: str, hr_dirs: Sequence, lr_dirs: Sequence | None = None,
                 **kwargs):
        self.name = _init_name(name)
        self.hr_dirs = [Path(d) for d in ([hr_dirs] if isinstance(hr_dirs, (str, Path))
                                          else hr_dirs)]
        if lr_dirs is None:
            lr_dirs = [None] * len(self.hr_dirs)
        elif isinstance(lr_dirs, (str, Path)):
            lr_dirs = [lr_dirs]
        if len(lr_dirs) != len(self.hr_dirs):
            raise ValueError(f"{len(lr_dirs)} LR folder(s) for {len(self.hr_dirs)} HR "
                             "folder(s): give one LR folder per HR folder, in the same order")
        self.lr_dirs = [Path(d) if d else None for d in lr_dirs]
        self.DESCRIPTION = ("SR training pairs from folders: " + "; ".join(
            f"HR {h}" + (f", LR {l}" if l else " (LR made with the MATLAB bicubic)")
            for h, l in zip(self.hr_dirs, self.lr_dirs)))
        super().__init__(**kwargs)

    def _items(self):
        items = []
        for h, l in zip(self.hr_dirs, self.lr_dirs):
            items += pair_folders(h, l, self.scale)
        return {"train": items}


# --------------------------------------------------------------------------- benchmarks

def _norm(s: str) -> str:
    return re.sub(r"[-_ ]", "", s.lower())


def _manual_root(manual_dir) -> Path:
    root = Path(manual_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"manual_dir {root} is not a folder")
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
        raise FileNotFoundError(
            f"{hr_root} has no folder for {bench} (official layout: {hr_root}/<Set>/x{scale}/; "
            f"benchmarks there: {have}): add it, or build one of those")
    hr_set = hr_sets[bench]
    lr_set = next((p for p in _subdirs(lr_root).values()
                   if _norm(p.name) in BENCHMARK_ALIASES[bench]), None)
    if lr_set is None:
        raise FileNotFoundError(
            f"{hr_set} has no LR folder {lr_root / hr_set.name}: put the x{scale} bicubic LR "
            f"images in {lr_root / hr_set.name / f'x{scale}'}, named as the HR files")
    scales = sorted(n for n in _subdirs(hr_set) if re.fullmatch(r"x\d+", n))
    hr_dir = _subdirs(hr_set).get(f"x{scale}")
    if hr_dir is None:
        raise FileNotFoundError(
            f"{hr_set} has no x{scale} folder (it has {', '.join(scales) or 'none'}): add "
            f"{hr_set / f'x{scale}'} and {lr_set / f'x{scale}'}, or build another --scale")
    lr_dir = _subdirs(lr_set).get(f"x{scale}")
    if lr_dir is None:
        raise FileNotFoundError(
            f"{lr_set} has no x{scale} folder for {hr_dir}: add {lr_set / f'x{scale}'} with "
            f"the x{scale} bicubic LR images, named as the HR files")
    hr_files = {p.name: p for p in images.list_images(hr_dir)}
    lr_files = {p.name: p for p in images.list_images(lr_dir)}
    if not hr_files:
        raise FileNotFoundError(f"no images in {hr_dir}: put the HR images of {bench} there")
    for name, p in hr_files.items():
        if name not in lr_files:
            raise FileNotFoundError(
                f"no LR image for {p}: expected {lr_dir / name} (same file name); add it or "
                "remove the HR image")
    for name, p in lr_files.items():
        if name not in hr_files:
            raise FileNotFoundError(
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
        raise FileNotFoundError(
            f"{folder} holds x<s> folders, as the official TestDataSR/HR/<Set>/: give "
            "--manual-dir the TestDataSR folder (the one with HR/ and LR/LRBI/)")
    raise FileNotFoundError(
        f"no benchmark images found in {folder}: expected HR/ (+ LR_bicubic/X{scale}/), "
        f"GTmod12/ (+ LRbicx{scale}/), image_SRF_{scale}/ with *_HR/*_LR files, or images "
        "directly in the folder")


def _srf_items(folder: Path, scale: int, with_lr: bool) -> list[Item]:
    files = images.list_images(folder)
    hr = {p.stem[: -len("_HR")]: p for p in files if p.stem.endswith("_HR")}
    lr = {p.stem[: -len("_LR")]: p for p in files if p.stem.endswith("_LR")}
    if not hr:
        raise FileNotFoundError(f"no *_HR images in {folder}")
    items = []
    for stem in sorted(hr):
        name = re.sub(r"_SRF_\d+$", "", stem)
        lr_src = None
        if with_lr:
            if stem not in lr:
                raise FileNotFoundError(f"no LR image {stem}_LR.* for {hr[stem]} in {folder}")
            lr_src = Source.file(lr[stem])
        items.append(Item(name, Source.file(hr[stem]), lr_src))
    return items


class BenchmarkBuilder(SRBuilder, skip_registration=True):
    """A benchmark test set (Set5, Set14, B100, Urban100, Manga109) from ``manual_dir``.

    ``manual_dir`` holds the official layout (``find_official_root``: ``HR/<Set>/x{s}/`` +
    ``LR/LRBI/<Set>/x{s}/``), or else the benchmark's folder in one of the layouts of
    ``benchmark_layout``.
    """

    name = "iet_benchmark"

    def __init__(self, *, name: str, manual_dir, **kwargs):
        bench = name.lower()
        if bench not in BENCHMARKS:
            raise ValueError(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}")
        self.bench = bench
        self.name = _init_name(bench)
        self.bench_manual_dir = Path(manual_dir)
        self.DESCRIPTION = f"{bench} benchmark from {manual_dir}."
        super().__init__(**kwargs)

    def _items(self):
        official = find_official_root(self.bench_manual_dir)
        if official is not None:
            folder, layout, items = official_items(official, self.bench, self.scale)
        else:
            folder = find_benchmark_dir(self.bench_manual_dir, self.bench)
            layout, items = benchmark_layout(folder, self.scale)
        self.DESCRIPTION = f"{self.bench} benchmark from {folder} (layout: {layout})."
        if self.verbose:
            print(f"{self.bench}: {len(items)} images in {folder} (layout: {layout})")
        return {"test": items}


# --------------------------------------------------------------------------- DIV2K

DIV2K_SPLITS = {"train": "train", "validation": "valid"}


class Div2kBuilder(SRBuilder, skip_registration=True):
    """DIV2K from its official zips (or their extracted folders) in ``manual_dir``.

    Needed per scale s: ``DIV2K_train_HR.zip``, ``DIV2K_valid_HR.zip``,
    ``DIV2K_train_LR_bicubic_X{s}.zip``, ``DIV2K_valid_LR_bicubic_X{s}.zip`` (the names
    of https://data.vision.ee.ethz.ch/cvl/DIV2K/), or the folders they extract to
    (``DIV2K_train_HR/``, ``DIV2K_train_LR_bicubic/X{s}/``, ...). Without the LR
    archives, LR is made with the MATLAB bicubic.
    """

    name = "iet_div2k"
    DESCRIPTION = "DIV2K (800 train / 100 validation), bicubic LR."
    HOMEPAGE = "https://data.vision.ee.ethz.ch/cvl/DIV2K/"

    def __init__(self, *, manual_dir, **kwargs):
        self.div2k_manual_dir = Path(manual_dir)
        super().__init__(**kwargs)

    def _items(self):
        return {split: self._split_items(tag) for split, tag in DIV2K_SPLITS.items()}

    def _split_items(self, tag: str) -> list[Item]:
        s = self.scale
        hr = _members(self.div2k_manual_dir, f"DIV2K_{tag}_HR", "")
        if not hr:
            raise FileNotFoundError(
                f"DIV2K {tag} HR images not found in {self.div2k_manual_dir}: expected "
                f"DIV2K_{tag}_HR.zip or the folder DIV2K_{tag}_HR/")
        lr = _members(self.div2k_manual_dir, f"DIV2K_{tag}_LR_bicubic_X{s}",
                      f"DIV2K_{tag}_LR_bicubic/X{s}")
        if not lr and self.verbose:
            print(f"DIV2K_{tag}_LR_bicubic_X{s} not found: LR made with the MATLAB bicubic")
        items = []
        for stem, src in sorted(hr.items()):
            lr_src = None
            if lr:
                lr_src = lr.get(f"{stem}x{s}") or lr.get(stem)
                if lr_src is None:
                    raise FileNotFoundError(f"no LR image {stem}x{s}.png for {src.name}")
            items.append(Item(stem, src, lr_src))
        return items


def _members(root: Path, archive: str, inner: str) -> dict[str, Source]:
    """PNG images of ``root/archive.zip`` or ``root/archive/`` (or ``root/inner/``), by stem."""
    out = {}
    zip_path = root / f"{archive}.zip"
    if zip_path.is_file():
        with zipfile.ZipFile(zip_path) as zf:
            for m in zf.namelist():
                if m.lower().endswith(".png") and not m.endswith("/"):
                    out[Path(m).stem] = Source.zip_member(zip_path, m)
        return out
    for folder in (root / archive, root / inner if inner else None,
                   root / archive / inner if inner else None,
                   root / archive / archive):
        if folder is not None and folder.is_dir():
            files = images.list_images(folder)
            if files:
                return {p.stem: Source.file(p) for p in files}
    return out
