"""Opening built datasets: ``open_source`` and the random-access ``PairedSource``.

Reading goes through ``tfds.builder_from_directory(...).as_data_source(split)``: NumPy and
Pillow only, no TensorFlow, and no need for the builder classes.
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path
from typing import Sequence

import numpy as np

TRAINING_SETS = ("demo", "div2k", "df2k")
BENCHMARKS = ("set5", "set14", "b100", "urban100", "manga109")


class DatasetNotBuiltError(FileNotFoundError):
    """The dataset is not built; the message is the command that builds it."""

    def __init__(self, command: str):
        self.command = command
        super().__init__(command)

    def __str__(self) -> str:
        return self.command


def default_data_dir() -> Path:
    """``$IET_DATA_DIR`` if set, else ``~/tensorflow_datasets``."""
    env = os.environ.get("IET_DATA_DIR")
    return Path(env).expanduser() if env else Path("~/tensorflow_datasets").expanduser()


def default_split(name: str) -> str:
    return "test" if name.lower() in BENCHMARKS else "train"


def build_command(name: str, scale: int, data_dir) -> str:
    """The command that builds ``name`` at ``scale`` into ``data_dir``."""
    name = name.lower()
    dd = shlex.quote(str(data_dir))
    base = "python -m iet_jax.datasets.build"
    if name == "demo":
        return f"{base} --dataset demo --scale {scale} --data-dir {dd}"
    if name == "div2k":
        return (f"{base} --dataset div2k --scale {scale} --manual-dir <folder with the DIV2K "
                f"zips> --data-dir {dd}")
    if name in BENCHMARKS:
        return (f"{base} --dataset benchmark --name {name} --scale {scale} --manual-dir "
                f"<folder with {name}> --data-dir {dd}")
    if name == "df2k":
        return (f"{base} --dataset paired --name df2k --scale {scale} --hr-dir "
                f"<DIV2K_train_HR> --hr-dir <Flickr2K_HR> --data-dir {dd}")
    return (f"{base} --dataset paired --name {name} --scale {scale} --hr-dir <HR folder> "
            f"[--lr-dir <LR x{scale} folder>] --data-dir {dd}")


def _latest_version(config_dir: Path) -> Path | None:
    if not config_dir.is_dir():
        return None
    versions = []
    for p in config_dir.iterdir():
        if (p / "dataset_info.json").is_file():
            try:
                versions.append((tuple(int(x) for x in p.name.split(".")), p))
            except ValueError:
                continue
    return max(versions)[1] if versions else None


def find_build(name: str, scale: int, data_dir=None) -> Path | None:
    """The directory of a finished build of ``name`` at ``scale``, or None.

    Looks for iet-jax's build ``<data_dir>/iet_<name>/x<s>/<version>/`` and, for
    ``div2k``, also TFDS's own ``<data_dir>/div2k/bicubic_x<s>/<version>/``.
    """
    data_dir = Path(data_dir).expanduser() if data_dir else default_data_dir()
    name = name.lower()
    candidates = [data_dir / f"iet_{name}" / f"x{scale}"]
    if name == "div2k":
        candidates.append(data_dir / "div2k" / f"bicubic_x{scale}")
    for c in candidates:
        v = _latest_version(c)
        if v is not None:
            return v
    return None


class PairedSource(Sequence):
    """Random access to one split: ``src[i] -> {'hr', 'lr', 'name'}``.

    ``lr_sizes()`` gives every example's LR (h, w) without decoding images when the build
    recorded them (iet-jax builds do; TFDS's own div2k does not: None).
    """

    def __init__(self, build_dir, split: str, scale: int, name: str = ""):
        import tensorflow_datasets as tfds

        self.build_dir = Path(build_dir)
        self.split = split
        self.scale = scale
        self.name = name or self.build_dir.parent.parent.name
        builder = tfds.builder_from_directory(str(self.build_dir))
        splits = list(builder.info.splits.keys())
        if split not in splits:
            raise ValueError(f"{self.name} has no split {split!r}; it has {', '.join(splits)}")
        self._ds = builder.as_data_source(split=split)
        self._has_name = "name" in builder.info.features.keys()
        self.description = builder.info.description
        md_file = self.build_dir / "metadata.json"
        self.metadata = json.loads(md_file.read_text()) if md_file.is_file() else {}

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        ex = self._ds[i]
        name = ex["name"] if self._has_name else f"{self.split}_{i:04d}"
        if isinstance(name, bytes):
            name = name.decode("utf-8")
        hr, lr = np.asarray(ex["hr"]), np.asarray(ex["lr"])
        h, w = lr.shape[:2]
        s = self.scale
        if hr.shape[:2] != (h * s, w * s) and (h * s <= hr.shape[0] < (h + 1) * s
                                                and w * s <= hr.shape[1] < (w + 1) * s):
            # TFDS's own div2k keeps HR uncropped; crop it to LR*s as our builds do.
            hr = hr[: h * s, : w * s]
        return {"hr": hr, "lr": lr, "name": str(name)}

    def __getstate__(self):
        return {"build_dir": self.build_dir, "split": self.split, "scale": self.scale,
                "name": self.name}

    def __setstate__(self, state):
        self.__init__(**state)

    def lr_sizes(self) -> list[tuple[int, int]] | None:
        sizes = self.metadata.get("sizes", {}).get(self.split)
        if sizes is None or len(sizes) != len(self):
            return None
        return [tuple(s[1]) for s in sizes]

    def names(self) -> list[str] | None:
        sizes = self.metadata.get("sizes", {}).get(self.split)
        if sizes is None or len(sizes) != len(self):
            return None
        return [s[0] for s in sizes]

    def __repr__(self):
        return f"PairedSource({self.name!r}, split={self.split!r}, x{self.scale}, n={len(self)})"


def open_source(name: str, split: str | None = None, scale: int = 4,
                data_dir=None, *, build_demo: bool = False) -> PairedSource:
    """Open a built dataset split as a random-access sequence of dicts.

    Args:
      name: 'demo', 'div2k', 'df2k', 'set5', 'set14', 'b100', 'urban100', 'manga109', or
        the name given to a folder build (``--dataset paired --name NAME``).
      split: 'train' / 'validation' (demo, div2k) / 'test' (benchmarks); None picks
        'test' for benchmarks and 'train' otherwise.
      scale: 2, 3 or 4.
      data_dir: where builds live; default ``$IET_DATA_DIR`` or ``~/tensorflow_datasets``.
      build_demo: build the demo dataset (seconds, no download) if it is missing.

    Raises:
      DatasetNotBuiltError: not built; ``str(err)`` is the command that builds it.
    """
    data_dir = Path(data_dir).expanduser() if data_dir else default_data_dir()
    split = split or default_split(name)
    build = find_build(name, scale, data_dir)
    if build is None and build_demo and name.lower() == "demo":
        from iet_jax.datasets import build as build_mod
        build = build_mod.build("demo", scale, data_dir=data_dir, verbose=False)
    if build is None:
        raise DatasetNotBuiltError(build_command(name, scale, data_dir))
    return PairedSource(build, split, scale, name=name.lower())
