"""Build a super-resolution dataset as TFDS array_record files (no TensorFlow needed).

``iet-build ARGS`` is ``python -m iet_jax.datasets.build ARGS``:

  python -m iet_jax.datasets.build --dataset demo --scale 4 --data-dir DIR
  python -m iet_jax.datasets.build --dataset paired --name df2k --scale 4 \\
      --hr-dir DIV2K/DIV2K_train_HR --hr-dir Flickr2K/Flickr2K_HR --data-dir DIR
  python -m iet_jax.datasets.build --dataset benchmark --name set5 --scale 4 \\
      --manual-dir benchmarks/ --data-dir DIR
  python -m iet_jax.datasets.build --dataset benchmark --scale all --manual-dir TestDataSR
  python -m iet_jax.datasets.build --dataset div2k --scale 4 --manual-dir zips/ --data-dir DIR

Without ``--name``, ``--dataset benchmark`` builds every benchmark found in ``--manual-dir``
(the official ``TestDataSR`` layout, ``HR/<Set>/x{s}/`` + ``LR/LRBI/<Set>/x{s}/``, or folders
named after the benchmarks). ``--scale`` may be repeated (or ``all``); ``--skip-bad`` skips
unusable images, counting them (printed, and stored in the build's metadata.json and
description); ``--subimage 480`` stores training images as BasicSR-style sub-images (faster
random patches on 2K images).

Building again with the same source files and options keeps the build (it is up to date);
with other ones it is refused naming what differs, and ``--overwrite`` rebuilds it. Images
over ``--max-pixels`` (default 200 million, ``iet_jax.datasets.images.MAX_PIXELS``) are bad
images: refused from their header before decoding, or skipped with ``--skip-bad``.

TFDS's own ``div2k`` builder also works offline (it needs TensorFlow to build): put the
official zips, with their original names, in a folder and run
``tfds build div2k --config bicubic_x4 --manual_dir FOLDER --data_dir DIR
--file_format array_record``; ``open_source('div2k', ...)`` reads either build.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from iet_jax.conventions.text import command, printable
from iet_jax.datasets import builders, images, layouts
from iet_jax.datasets.catalog import BENCHMARKS, default_data_dir


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog=command("iet-build", "iet_jax.datasets.build"),
                                description=__doc__.split("\n")[0])
    p.add_argument("--dataset", required=True, choices=["demo", "paired", "benchmark", "div2k"])
    p.add_argument("--name", help="paired: the dataset's name (e.g. df2k); benchmark: "
                   + "/".join(BENCHMARKS) + " (default: every one in --manual-dir)")
    p.add_argument("--scale", action="append", default=None,
                   help="2, 3, 4 or all; repeatable (default 4)")
    p.add_argument("--hr-dir", action="append", default=[], help="paired: HR folder; repeatable")
    p.add_argument("--lr-dir", action="append", default=[],
                   help="paired: LR folder of that scale for the matching --hr-dir "
                        "('none': make that folder's LR with the bicubic)")
    p.add_argument("--manual-dir", help="benchmark/div2k: folder with the downloaded data")
    p.add_argument("--data-dir", default=None,
                   help="where builds go (default $IET_DATA_DIR or ~/tensorflow_datasets)")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip unusable images and count them instead of failing")
    p.add_argument("--overwrite", action="store_true",
                   help="rebuild an existing build (needed when its sources or options differ)")
    p.add_argument("--max-pixels", type=int, default=None,
                   help="the most pixels (width x height) an image may have; larger ones are "
                        f"bad images (default {images.MAX_PIXELS})")
    p.add_argument("--num-workers", type=int, default=None, help="decode/resize threads")
    p.add_argument("--subimage", type=int, default=None,
                   help="paired/div2k: store HR sub-images of this size (e.g. 480, as BasicSR's "
                        "extract_subimages) instead of whole images: much faster patch loading")
    p.add_argument("--subimage-step", type=int, default=None,
                   help="distance between sub-images (default: half the size)")
    p.add_argument("--storage", choices=["png", "raw"], default="png",
                   help="png (default, compact) or raw uncompressed arrays (larger on disk, "
                        "no PNG decoding when training reads them)")
    a = p.parse_args(argv)
    scales = []
    for s in a.scale or ["4"]:
        scales += [2, 3, 4] if s == "all" else [int(s)]
    for s in scales:
        if s not in (2, 3, 4):
            p.error(f"--scale must be 2, 3, 4 or all, got {s}")
    if a.max_pixels is not None and a.max_pixels < 1:
        p.error(f"--max-pixels must be positive, got {a.max_pixels}")
    if a.lr_dir and a.dataset == "paired" and len(scales) > 1:
        p.error("--lr-dir holds one scale's LR images: build one --scale at a time")
    data_dir = Path(a.data_dir).expanduser() if a.data_dir else default_data_dir()
    try:
        names = [a.name]
        if a.dataset == "benchmark" and not a.name and a.manual_dir:
            names = layouts.benchmarks_in(a.manual_dir)
            if not names:
                raise FileNotFoundError(
                    f"no benchmark found in {a.manual_dir} (neither the official HR/<Set>/x<s>/ "
                    f"+ LR/LRBI/<Set>/x<s>/ nor folders named {', '.join(BENCHMARKS)}): give "
                    "--name if it is one benchmark's folder")
        for name in names:
            for s in scales:
                t0 = time.time()
                out, built = builders.prepare(
                    a.dataset, s, data_dir=data_dir, name=name, hr_dirs=a.hr_dir,
                    lr_dirs=a.lr_dir, manual_dir=a.manual_dir, skip_bad=a.skip_bad,
                    num_workers=a.num_workers, overwrite=a.overwrite, subimage=a.subimage,
                    subimage_step=a.subimage_step, storage=a.storage, max_pixels=a.max_pixels)
                if built:
                    print(f"built {printable(out, 500)} in {time.time() - t0:.1f} s")
                else:
                    print(f"{printable(out, 500)} is up to date (same source files and options; "
                          "--overwrite rebuilds it)")
    except (FileNotFoundError, ValueError) as e:  # bad folders or images: named in e
        print("error: " + printable(str(e), 2000), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
