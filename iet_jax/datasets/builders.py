"""TFDS builders for super-resolution data, written as ``array_record`` files.

Every builder has one config per scale (``x2``, ``x3``, ``x4``) and yields examples
``{'hr': uint8 (H, W, 3), 'lr': uint8 (H/s, W/s, 3), 'name': str}`` with ``H, W``
multiples of the scale. Missing LR images are made with the MATLAB bicubic
(``iet_jax.conventions.imresize``) after cropping HR to a multiple of the scale.

Building needs no TensorFlow: images reach TFDS as PNG bytes encoded with Pillow (TFDS
only calls ``tf.image.encode_png`` for NumPy arrays), and the ``array_record`` writer and
example serializer are TF-free.

Builders and their on-disk names (``<data_dir>/<name>/x<s>/1.0.0/``, ``catalog.build_name``):

* ``DemoBuilder`` (``iet_demo``): photographs shipped with scikit-image; train/validation.
* ``FolderBuilder`` (``iet_<name>``): HR folders (+ optional LR folders); split ``train``.
* ``BenchmarkBuilder`` (``iet_set5``, ...): benchmark folders from ``manual_dir`` (the
  official ``TestDataSR`` layout or the usual benchmark folders); split ``test``.
* ``Div2kBuilder`` (``iet_div2k``): DIV2K's official zips (or their extracted folders) from
  ``manual_dir``; splits ``train`` and ``validation``.

Which files make which pairs is read by ``layouts.py``. ``build(dataset, scale, ...)`` builds one
dataset at one scale (``python -m iet_jax.datasets.build`` is its command line).

A build records a fingerprint of what it was made from (``SRBuilder.sources``: every source
file's path, size and modification time, or a zip member's size and CRC, and the options that
change the examples) in its ``metadata.json``. Building again with the same sources and options
returns the build as it is; with other ones it is refused (``BuildExistsError``) unless
``overwrite=True`` (``--overwrite``), so a build never silently holds other data than asked for.
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import json
import os
import shutil
import zipfile
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds

from iet_jax.conventions import imresize
from iet_jax.conventions.text import printable
from iet_jax.datasets import images
from iet_jax.datasets.catalog import BENCHMARKS, build_name, default_data_dir, new_build_name
from iet_jax.datasets.layouts import (Item, Source, archive_images, benchmark_layout,
                                      find_benchmark_dir, find_official_root, official_items,
                                      pair_folders)

SCALES = (2, 3, 4)
VERSION = tfds.core.Version("1.0.0")
STORAGES = ("png", "raw")


class BuildExistsError(ValueError):
    """A build of the dataset exists, made from other sources or options than asked for now."""


class SRConfig(tfds.core.BuilderConfig):
    """One config per scale factor."""

    def __init__(self, scale: int):
        super().__init__(name=f"x{scale}", version=VERSION,
                         description=f"x{scale}: LR is the MATLAB-bicubic 1/{scale} downscale")
        self.scale = scale


def make_examples(item: Item, scale: int, subimage: int | None = None,
                  subimage_step: int | None = None, storage: str = "png",
                  max_pixels: int | None = None) -> list[tuple[str, dict, tuple]]:
    """The examples of one item: the whole pair, or its sub-images (BasicSR-style).

    With ``subimage`` (an HR size, e.g. 480) the pair is cut into HR crops of that size
    every ``subimage_step`` pixels (default size/2), plus a last crop flush with the
    bottom/right edge, with the matching LR crops; sides shorter than ``subimage`` are
    kept whole. Names get a suffix ``_s001``, ``_s002``, ... Smaller images decode faster,
    which is what makes random-patch training on 2K images fast.

    ``storage='raw'`` stores uncompressed arrays instead of PNG bytes. ``max_pixels`` is the
    pixel limit of the images read (default ``images.MAX_PIXELS``).
    """
    if storage not in STORAGES:
        raise ValueError(f"storage must be one of {STORAGES}, got {storage!r}")
    if not subimage and storage == "png":
        example, sizes = _pair(item, scale, max_pixels=max_pixels)[0]
        return [(item.name, example, sizes)]
    _, hr, lr = _pair(item, scale, encode=False, max_pixels=max_pixels)
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


def _pair(item: Item, scale: int, encode: bool = True, max_pixels: int | None = None):
    hr_bytes = _read(item.hr)
    hr, hr_plain = images.decode_rgb_plain(hr_bytes, item.hr.name, max_pixels)
    H, W = hr.shape[:2]
    if item.lr is not None:
        lr_bytes = _read(item.lr)
        lr, lr_plain = images.decode_rgb_plain(lr_bytes, item.lr.name, max_pixels)
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
        lr_png = lr_bytes if lr_plain else images.encode_png(lr)
    else:
        if H < scale or W < scale:
            raise images.BadImageError(item.hr.name,
                                       f"image of {H}x{W} is smaller than the scale {scale}")
        hr_out = imresize.mod_crop(hr, scale)
        lr = imresize.downscale(hr_out, scale)
        if not encode:
            return None, hr_out, lr
        lr_png = images.encode_png(lr)
    untouched = hr_out.shape == hr.shape and hr_plain
    hr_png = hr_bytes if untouched else images.encode_png(hr_out)
    example = {"hr": hr_png, "lr": lr_png, "name": item.name}
    return (example, (tuple(lr.shape[:2]), tuple(hr_out.shape[:2]))), hr_out, lr


def _read(src: Source) -> bytes:
    try:
        return src.read()
    except (OSError, KeyError, zipfile.BadZipFile) as e:
        raise images.BadImageError(src.name, f"cannot read ({e})")


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
                 subimage_step: int | None = None, storage: str = "png",
                 max_pixels: int | None = None, **kwargs):
        if storage not in STORAGES:
            raise ValueError(f"storage must be one of {STORAGES}, got {storage!r}")
        self.storage = storage
        self.max_pixels = max_pixels
        self.skip_bad = skip_bad
        self.subimage = subimage
        self.subimage_step = subimage_step
        self.num_workers = num_workers or min(8, os.cpu_count() or 1)
        self.verbose = verbose
        self.skipped: dict[str, list[dict]] = {}
        self._sizes: dict[str, list] = {}
        self._listed: dict[str, Sequence[Item]] | None = None
        self._sources: dict | None = None
        super().__init__(**kwargs)

    # Subclasses: the items of each split.
    def _items(self) -> dict[str, Sequence[Item]]:
        raise NotImplementedError

    def items(self) -> dict[str, Sequence[Item]]:
        """The items of each split, listed once."""
        if self._listed is None:
            self._listed = self._items()
        return self._listed

    def options(self) -> dict:
        """The build options that change the examples."""
        step = (self.subimage_step or self.subimage // 2) if self.subimage else None
        return {"builder": type(self).__name__, "name": self.name, "scale": self.scale,
                "version": str(self.VERSION), "storage": self.storage,
                "subimage": self.subimage or None, "subimage_step": step}

    def sources(self) -> dict:
        """The fingerprint of what the build is made from: a SHA-256 of the options and of
        every item's name and its sources' stamps (``layouts.Source.stamp``), the number of
        source files, and the options."""
        if self._sources is None:
            digest = hashlib.sha256(json.dumps(self.options(), sort_keys=True).encode())
            files = 0
            for split, items in sorted(self.items().items()):
                for it in items:
                    entry = [split, it.name, list(it.hr.stamp),
                             list(it.lr.stamp) if it.lr is not None else None]
                    digest.update(json.dumps(entry).encode() + b"\n")
                    files += 1 + (it.lr is not None)
            self._sources = {"fingerprint": digest.hexdigest(), "files": files,
                             "options": self.options()}
        return self._sources

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
        self.sources()
        splits = self.items()
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
                                 self.storage, self.max_pixels)

        for item, result in _ordered_map(work, items, self.num_workers):
            if isinstance(result, images.BadImageError):
                if not self.skip_bad:
                    raise images.BadImageError(
                        result.path, result.reason + "; build with --skip-bad (skip_bad=True) "
                        "to skip bad images and count them") from result
                skipped.append({"name": item.name, "file": result.path, "reason": result.reason})
                if self.verbose:
                    print(f"skipping {result}")
                continue
            for name, example, (lr_hw, hr_hw) in result:
                if name in names:
                    raise ValueError(f"{self.name}: two images are named {printable(name)!r} in "
                                     f"split {split!r}; image names must be unique")
                names.add(name)
                sizes.append([name, list(lr_hw), list(hr_hw)])
                yield name, example
        self._record_metadata()

    def _record_metadata(self):
        md = self.info.metadata
        md["sources"] = self.sources()
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
        desc = printable(self.DESCRIPTION, 2000)  # it quotes folder names
        if self.subimage:
            desc += (f" Cut into HR sub-images of {self.subimage} px every "
                     f"{self.subimage_step or self.subimage // 2} px.")
        if total:
            desc += (f"\nSkipped {total} bad image(s) while building: "
                     + ", ".join(printable(f"{d['file']} ({d['reason']})", 500)
                                 for v in self.skipped.values() for d in v))
        self.info.as_proto.description = desc

    def download_and_prepare(self, *args, **kwargs):
        kwargs.setdefault("file_format", "array_record")
        super().download_and_prepare(*args, **kwargs)
        total = sum(len(v) for v in self.skipped.values())
        if self.verbose and self.skipped:
            print(f"{self.name}/{self.builder_config.name}: skipped {total} bad image(s)")


def _try_examples(item: Item, scale: int, subimage, subimage_step, storage, max_pixels):
    try:
        return make_examples(item, scale, subimage, subimage_step, storage, max_pixels)
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

    name = build_name("demo")
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

class FolderBuilder(SRBuilder, skip_registration=True):
    """A training set from HR folders, each with an optional LR folder (split ``train``).

    ``FolderBuilder(name='df2k', hr_dirs=[DIV2K_train_HR, Flickr2K_HR], config='x4',
    data_dir=...)``. LR folders, if given, are matched to HR folders by position
    (``None`` for a folder without LR) and hold that scale's LR images named like
    the HR (``0001.png``, ``0001x4.png``, ``img_HR.png``/``img_LR.png`` ...).
    """

    name = build_name("folder")
    DESCRIPTION = "SR training pairs from image folders."

    def __init__(self, *, name: str, hr_dirs: Sequence, lr_dirs: Sequence | None = None,
                 **kwargs):
        self.name = new_build_name(name)
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

class BenchmarkBuilder(SRBuilder, skip_registration=True):
    """A benchmark test set (Set5, Set14, B100, Urban100, Manga109) from ``manual_dir``.

    ``manual_dir`` holds the official layout (``find_official_root``: ``HR/<Set>/x{s}/`` +
    ``LR/LRBI/<Set>/x{s}/``), or else the benchmark's folder in one of the layouts of
    ``benchmark_layout``.
    """

    name = build_name("benchmark")

    def __init__(self, *, name: str, manual_dir, **kwargs):
        bench = name.lower()
        if bench not in BENCHMARKS:
            raise ValueError(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}")
        self.bench = bench
        self.name = new_build_name(bench)
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
            print(printable(f"{self.bench}: {len(items)} images in {folder} (layout: {layout})",
                            1000))
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

    name = build_name("div2k")
    DESCRIPTION = "DIV2K (800 train / 100 validation), bicubic LR."
    HOMEPAGE = "https://data.vision.ee.ethz.ch/cvl/DIV2K/"

    def __init__(self, *, manual_dir, **kwargs):
        self.div2k_manual_dir = Path(manual_dir)
        super().__init__(**kwargs)

    def _items(self):
        return {split: self._split_items(tag) for split, tag in DIV2K_SPLITS.items()}

    def _split_items(self, tag: str) -> list[Item]:
        s = self.scale
        hr = archive_images(self.div2k_manual_dir, f"DIV2K_{tag}_HR", "")
        if not hr:
            raise FileNotFoundError(
                f"DIV2K {tag} HR images not found in {printable(self.div2k_manual_dir, 500)}: "
                f"expected DIV2K_{tag}_HR.zip or the folder DIV2K_{tag}_HR/")
        lr = archive_images(self.div2k_manual_dir, f"DIV2K_{tag}_LR_bicubic_X{s}",
                      f"DIV2K_{tag}_LR_bicubic/X{s}")
        if not lr and self.verbose:
            print(f"DIV2K_{tag}_LR_bicubic_X{s} not found: LR made with the MATLAB bicubic")
        items = []
        for stem, src in sorted(hr.items()):
            lr_src = None
            if lr:
                lr_src = lr.get(f"{stem}x{s}") or lr.get(stem)
                if lr_src is None:
                    raise FileNotFoundError(printable(f"no LR image {stem}x{s}.png for "
                                                      f"{src.name}", 1000))
            items.append(Item(stem, src, lr_src))
        return items


# --------------------------------------------------------------------------- building

def make_builder(dataset: str, scale: int, *, data_dir, name=None, hr_dirs=(), lr_dirs=(),
                 manual_dir=None, skip_bad=False, num_workers=None, verbose=True,
                 subimage=None, subimage_step=None, storage="png", max_pixels=None):
    """The builder for one dataset and scale (not yet built)."""
    if subimage and dataset not in ("paired", "div2k"):
        raise SystemExit("--subimage is for training sets (--dataset paired or div2k)")
    common = dict(config=f"x{scale}", data_dir=str(data_dir), skip_bad=skip_bad,
                  num_workers=num_workers, verbose=verbose, subimage=subimage,
                  subimage_step=subimage_step, storage=storage, max_pixels=max_pixels)
    if dataset == "demo":
        return DemoBuilder(**common)
    if dataset == "paired":
        if not name or not hr_dirs:
            raise SystemExit("--dataset paired needs --name and at least one --hr-dir")
        if lr_dirs and len(lr_dirs) != len(hr_dirs):
            raise SystemExit("give one --lr-dir per --hr-dir (same order), or none")
        lr = [None if str(d).lower() in ("none", "-", "") else d for d in lr_dirs]
        return FolderBuilder(name=name, hr_dirs=list(hr_dirs), lr_dirs=lr or None, **common)
    if dataset == "benchmark":
        if not manual_dir:
            raise SystemExit("--dataset benchmark needs --manual-dir (the folder with the "
                             "benchmarks, e.g. TestDataSR)")
        if not name:
            raise SystemExit(f"--dataset benchmark needs --name ({', '.join(BENCHMARKS)})")
        return BenchmarkBuilder(name=name, manual_dir=manual_dir, **common)
    if dataset == "div2k":
        if not manual_dir:
            raise SystemExit("--dataset div2k needs --manual-dir (the folder with the DIV2K "
                             "zips or their extracted folders)")
        return Div2kBuilder(manual_dir=manual_dir, **common)
    raise SystemExit(f"unknown --dataset {dataset!r}")


def prepare(dataset: str, scale: int, *, data_dir=None, overwrite=False,
            **kwargs) -> tuple[Path, bool]:
    """Build one dataset at one scale unless an identical build exists.

    Returns ``(build directory, built now)``. An existing build made from the same sources
    and options (``SRBuilder.sources``) is kept as it is; one made from others raises
    ``BuildExistsError`` (one line: what differs, and ``--overwrite``), or is rebuilt with
    ``overwrite=True``. ``overwrite=True`` always rebuilds.
    """
    data_dir = Path(data_dir).expanduser() if data_dir else default_data_dir()
    b = make_builder(dataset, scale, data_dir=data_dir, **kwargs)
    out = Path(b.data_dir)
    if out.exists():
        if not overwrite:
            _check_same_sources(out, b)
            return out, False
        shutil.rmtree(out)
        b = make_builder(dataset, scale, data_dir=data_dir, **kwargs)  # without the old info
    b.download_and_prepare(file_format="array_record")
    return Path(b.data_dir), True


def build(dataset: str, scale: int, *, data_dir=None, overwrite=False, **kwargs) -> Path:
    """Build one dataset at one scale (see ``prepare``); returns the build directory."""
    return prepare(dataset, scale, data_dir=data_dir, overwrite=overwrite, **kwargs)[0]


def _check_same_sources(out: Path, b: SRBuilder) -> None:
    """Raise ``BuildExistsError`` unless the build in ``out`` has ``b``'s sources."""
    where = printable(out, 500)
    fix = "add --overwrite (overwrite=True) to rebuild it, or build under another --name"
    try:
        stored = json.loads((out / "metadata.json").read_text()).get("sources")
    except (OSError, ValueError, AttributeError):
        stored = None
    if not isinstance(stored, dict) or "fingerprint" not in stored:
        raise BuildExistsError(f"{where} exists but records no fingerprint of its sources (an "
                               f"older or unfinished build), so it may hold other data: {fix}")
    now = b.sources()
    if stored["fingerprint"] == now["fingerprint"]:
        return
    then_opts, now_opts = stored.get("options") or {}, now["options"]
    changed = [f"{k} {then_opts.get(k)} then, {now_opts[k]} now" for k in now_opts
               if then_opts.get(k) != now_opts[k]]
    if changed:
        what = "other options (" + "; ".join(changed) + ")"
    else:
        what = (f"other source files ({stored.get('files')} then, {now['files']} now; added, "
                "removed, moved or modified files)")
    raise BuildExistsError(f"{where} was built from {what}: {fix}")
