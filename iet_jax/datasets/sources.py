"""Opening built datasets: ``open_source`` and the random-access ``PairedSource``.

Reading goes through ``tfds.builder_from_directory(...).as_data_source(split)``: NumPy and
Pillow only, no TensorFlow, and no need for the builder classes (the demo data, which
``open_source(..., build_demo=True)`` builds when missing, aside).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from iet_jax.conventions.text import printable
from iet_jax.datasets import builders
from iet_jax.datasets.catalog import (DatasetNotBuiltError, build_command, default_data_dir,
                                      default_split, find_build)


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
            raise ValueError(f"{printable(self.name)} has no split {split!r}; it has "
                             f"{', '.join(splits)}")
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
        build = builders.build("demo", scale, data_dir=data_dir, verbose=False)
    if build is None:
        raise DatasetNotBuiltError(build_command(name, scale, data_dir))
    return PairedSource(build, split, scale, name=name.lower())
