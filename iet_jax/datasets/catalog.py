"""Names and paths of datasets: what exists, where builds live, and how to build one.

``BENCHMARKS`` are the five test sets every SR paper reports; ``default_data_dir`` is where
builds go (``$IET_DATA_DIR`` or ``~/tensorflow_datasets``); ``build_name`` is the on-disk
name of a build (``<data_dir>/iet_<name>/x<s>/<version>/``) and ``find_build`` finds a
finished one; ``build_command`` is the command that builds a dataset that is missing, which
``DatasetNotBuiltError`` carries.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

from iet_jax.conventions.text import printable

BENCHMARKS = ("set5", "set14", "b100", "urban100", "manga109")


class DatasetNotBuiltError(FileNotFoundError):
    """The dataset is not built; the message is the command that builds it."""

    def __init__(self, command: str):
        self.command = command
        super().__init__(command)

    def __str__(self) -> str:
        return printable(self.command, 2000)


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


def build_name(name: str) -> str:
    """The folder of dataset ``name``'s builds in the data dir: ``iet_<name>`` (lower case).

    A build at scale s is ``<data_dir>/iet_<name>/x<s>/<version>/``.
    """
    return "iet_" + name.lower()


def new_build_name(name: str) -> str:
    """``build_name`` for a dataset about to be built: refuses names TFDS cannot use."""
    lower = name.lower()
    if not re.fullmatch(r"[a-z][a-z0-9_]*", lower):
        raise ValueError(f"dataset name must be lower-case letters, digits and _, "
                         f"starting with a letter; got {name!r}")
    return build_name(lower)


def find_build(name: str, scale: int, data_dir=None) -> Path | None:
    """The directory of a finished build of ``name`` at ``scale``, or None.

    Looks for iet-jax's build ``<data_dir>/iet_<name>/x<s>/<version>/`` and, for
    ``div2k``, also TFDS's own ``<data_dir>/div2k/bicubic_x<s>/<version>/``.
    """
    data_dir = Path(data_dir).expanduser() if data_dir else default_data_dir()
    name = name.lower()
    candidates = [data_dir / build_name(name) / f"x{scale}"]
    if name == "div2k":
        candidates.append(data_dir / "div2k" / f"bicubic_x{scale}")
    for c in candidates:
        v = _latest_version(c)
        if v is not None:
            return v
    return None
