"""Super-resolution datasets as TFDS ``array_record`` builds, read without TensorFlow.

Build with ``python -m iet_jax.datasets.build`` (see ``build.py``); read with
``open_source(name, split, scale)``, which returns a random-access sequence of
``{'hr': uint8 (H, W, 3), 'lr': uint8 (H/s, W/s, 3), 'name': str}``.

- ``catalog``: names and paths (the benchmarks, the data dir, where a build lives, the
  command that builds a missing one).
- ``sources``: ``open_source`` and ``PairedSource``, reading a build.
- ``layouts``: which files of a downloaded or hand-made folder make which HR/LR pairs.
- ``builders``: the TFDS builders and ``build``.
- ``images``: strict, bounded image reading (a pixel limit checked from the header, EXIF
  orientation honoured) and encoding; ``open_image`` is also upscale's reader.
- ``loader``: random training patches from a source (``PairedPatchLoader``).
"""

from iet_jax.datasets.catalog import (DatasetNotBuiltError, build_command, default_data_dir,
                                      default_split)
from iet_jax.datasets.images import BadImageError
from iet_jax.datasets.sources import PairedSource, open_source

__all__ = ["open_source", "PairedSource", "DatasetNotBuiltError", "BadImageError",
           "build_command", "default_data_dir", "default_split"]
