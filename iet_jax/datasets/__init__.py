"""Super-resolution datasets as TFDS ``array_record`` builds, read without TensorFlow.

Build with ``python -m iet_jax.datasets.build`` (see ``build.py``); read with
``open_source(name, split, scale)``, which returns a random-access sequence of
``{'hr': uint8 (H, W, 3), 'lr': uint8 (H/s, W/s, 3), 'name': str}``.
"""

from iet_jax.datasets.source import (DatasetNotBuiltError, PairedSource, build_command,
                                     default_data_dir, default_split, open_source)
from iet_jax.datasets.images import BadImageError

__all__ = ["open_source", "PairedSource", "DatasetNotBuiltError", "BadImageError",
           "build_command", "default_data_dir", "default_split"]
