"""The recipe tests/test_multihost.py trains with `python -m iet_jax.train`: the tiny
float64 model of `tiny.tiny_training_config` on the demo photographs (x2, LR patch 8), global
batch 4, 6 steps, a checkpoint every 2. Needs JAX_ENABLE_X64=1.

With $IET_TEST_ROWS set, loading this recipe also installs the test's recorder: every
training process appends, for each batch its loader hands to the train step, one JSON line
to $IET_TEST_ROWS.<process index>: the step, the process index and count, the sample numbers
the loader read since the batch before (`LocalSample`, prefetching included; the recipe reads
in-process, with no worker processes) and a digest of each row (LR and HR patch) of the batch.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).absolute().parent))

from tiny import tiny_training_config  # noqa: E402


def get_config():
    cfg = tiny_training_config(batch=4, steps=6, dtype="float64")
    cfg.name = "multihost_test"
    cfg.data.dataset = "demo"
    cfg.checkpoint_every = 2
    return cfg


def row_digest(lr, hr) -> str:
    import hashlib

    import numpy as np

    return hashlib.sha256(np.ascontiguousarray(lr, np.float32).tobytes() +
                          np.ascontiguousarray(hr, np.float32).tobytes()).hexdigest()[:16]


def _install_recorder(path: str) -> None:
    import json
    import threading

    from iet_jax.datasets import loader as loader_lib

    cls = loader_lib.PairedPatchLoader
    if getattr(cls, "_test_recorder", False):
        return
    lock = threading.Lock()
    read_since_last = []  # global sample numbers (one loader per training process)
    local_sample, next_batch = loader_lib.LocalSample.__call__, cls.__next__

    def recording_sample(self, j):
        with lock:
            read_since_last.append(self.sample_id(j))
        return local_sample(self, j)

    def recording_next(self):
        step = self.step
        batch = next_batch(self)
        with lock:
            read = sorted(read_since_last)
            read_since_last.clear()
        record = {"step": step, "process": self.process_index, "count": self.process_count,
                  "read": read, "rows": [row_digest(lr, hr)
                                         for lr, hr in zip(batch["lr"], batch["hr"])]}
        with open(f"{path}.{self.process_index}", "a") as f:
            f.write(json.dumps(record) + "\n")
        return batch

    loader_lib.LocalSample.__call__ = recording_sample
    cls.__next__, cls._test_recorder = recording_next, True


if os.environ.get("IET_TEST_ROWS"):
    _install_recorder(os.environ["IET_TEST_ROWS"])
