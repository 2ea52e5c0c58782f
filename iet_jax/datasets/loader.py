"""Training input: random paired LR/HR patches with flips and 90-degree rotations.

``PairedPatchLoader`` reads any random-access source of ``{'hr', 'lr', 'name'}`` dicts
(``iet_jax.datasets.open_source``) through a grain pipeline (``MapDataset`` -> ``map`` ->
``batch`` -> threads and, optionally, worker processes); the per-sample work is NumPy only.

Determinism: the global batch of step ``t`` is made of the samples ``k = t*B .. t*B+B-1``
(B the global batch size). Sample ``k`` takes image ``perm_e[k mod n]`` where ``perm_e`` is
a seeded permutation of the ``n`` images for epoch ``e = k // n`` (every image once per
epoch), and its crop position and augmentation come from a generator seeded with
``(seed, k)`` (``PatchSampler``). So a batch is a pure function of (seed, step, process):
resuming from ``get_state()`` reproduces exactly what an uninterrupted run sees, threads
and worker processes only change the speed, and process ``p`` of ``P`` gets rows
``p*B/P .. (p+1)*B/P - 1`` of the same global batch, whatever the number of processes.
"""

from __future__ import annotations

import functools
import os
import threading
import time
import warnings
from typing import Any

import numpy as np

from iet_jax.conventions.text import printable

STATE_VERSION = 1
SMALL_IMAGES = ("error", "skip")
_PERM_TAG = 0x5EED_0001
_SAMPLE_TAG = 0x5EED_0002
_LAST_STEP = 1 << 40  # the pipeline's end: never reached
# A per-row field of the pipeline's batches, taken out before they are handed on: how many
# images smaller than the patch the row passed over, so that the main process counts the
# ones found in worker processes too.
PASSED = "small_images_passed"


class SmallImageError(ValueError):
    """A training image smaller than the patch (small_images='error')."""


class SmallImagesSkipped(UserWarning):
    """Images smaller than the patch were left out (small_images='skip')."""


def find_small_images(source, patch_size: int) -> tuple[list[tuple[str, tuple[int, int]]], int] | None:
    """([(name, (LR h, LR w)) of every image with an LR side under `patch_size`], number of
    images), from the sizes the source records (``source.lr_sizes()``); None if it records
    none (such images are then found when they are read)."""
    sizes = source.lr_sizes() if hasattr(source, "lr_sizes") else None
    if sizes is None:
        return None
    names = source.names() if hasattr(source, "names") else None
    small = [(names[i] if names else str(i), (int(h), int(w)))
             for i, (h, w) in enumerate(sizes) if h < patch_size or w < patch_size]
    return small, len(sizes)


class PatchSampler:
    """The per-sample function: global sample ``k`` -> (LR patch, HR patch), uint8, a pure
    function of (seed, k). Picklable: a worker process gets the source and the settings, and
    fills its own cache (the cache and the permutations are never pickled)."""

    def __init__(self, source, *, scale: int, patch_size: int, seed: int, augment: bool,
                 small_images: str, indices: np.ndarray, cache: bool):
        self.source = source
        self.scale = scale
        self.patch_size = patch_size
        self.seed = seed
        self.augment = augment
        self.small_images = small_images
        self.indices = indices
        self.num_examples = len(indices)
        self.cache = cache
        self._setup()

    def _setup(self) -> None:
        self._cache: dict[int, tuple[np.ndarray, np.ndarray, str]] = {}
        self._perms: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()
        self.small: set[int] = set()  # found when read (sources without recorded sizes)
        self.small_names: list[str] = []

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items()
                if k not in ("_cache", "_perms", "_lock", "small", "small_names")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._setup()

    def _permutation(self, epoch: int) -> np.ndarray:
        with self._lock:  # threads share this small cache
            perm = self._perms.get(epoch)
            if perm is None:
                rng = np.random.default_rng([self.seed, _PERM_TAG, epoch])
                perm = rng.permutation(self.num_examples)
                if len(self._perms) >= 4:
                    self._perms.pop(next(iter(self._perms)))
                self._perms[epoch] = perm
            return perm

    def _image(self, idx: int) -> tuple[np.ndarray, np.ndarray, str]:
        if idx in self._cache:
            return self._cache[idx]
        ex = self.source[idx]
        hr, lr = np.asarray(ex["hr"]), np.asarray(ex["lr"])
        name = printable(str(ex.get("name", idx)))
        if hr.dtype != np.uint8 or lr.dtype != np.uint8 or hr.ndim != 3 or lr.ndim != 3:
            raise ValueError(f"image {name}: expected uint8 (H, W, 3) arrays, got hr "
                             f"{hr.dtype}{hr.shape} lr {lr.dtype}{lr.shape}")
        h, w = lr.shape[:2]
        if hr.shape[:2] != (h * self.scale, w * self.scale):
            raise ValueError(f"image {name}: HR {hr.shape[0]}x{hr.shape[1]} is not x{self.scale} "
                             f"of LR {h}x{w}")
        if h < self.patch_size or w < self.patch_size:
            p, s = self.patch_size, self.scale
            error = SmallImageError(
                f"image {name}: LR {h}x{w} (HR {h * s}x{w * s}) is smaller than the patch "
                f"{p}x{p} (HR {p * s}x{p * s}) (the source did not record image sizes, so this "
                "was found only now); use a smaller patch_size or small_images='skip'")
            error.image_name = name
            raise error
        if self.cache:
            self._cache[idx] = (hr, lr, name)
        return hr, lr, name

    def __call__(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Global sample ``k``: (LR patch, HR patch), uint8."""
        lr_p, hr_p, _ = self.patch(k)
        return lr_p, hr_p

    def patch(self, k: int) -> tuple[np.ndarray, np.ndarray, int]:
        """(LR patch, HR patch, how many images smaller than the patch were passed over to
        reach one large enough) of global sample ``k``."""
        epoch, r = divmod(int(k), self.num_examples)
        hr, lr, passed = self._large_enough(self._permutation(epoch), r)
        rng = np.random.default_rng([self.seed, _SAMPLE_TAG, int(k)])
        p, s = self.patch_size, self.scale
        h, w = lr.shape[:2]
        y = int(rng.integers(0, h - p + 1))
        x = int(rng.integers(0, w - p + 1))
        lr_p = lr[y:y + p, x:x + p]
        hr_p = hr[y * s:(y + p) * s, x * s:(x + p) * s]
        if self.augment:
            hflip, vflip, rot = (bool(b) for b in rng.random(3) < 0.5)
            return _augment(lr_p, hflip, vflip, rot), _augment(hr_p, hflip, vflip, rot), passed
        return np.ascontiguousarray(lr_p), np.ascontiguousarray(hr_p), passed

    def _large_enough(self, perm: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray, int]:
        """(HR, LR, j) of image ``perm[r + j]``: with small_images='skip', the first image
        from ``perm[r]`` on (cyclically) that is not smaller than the patch."""
        for j in range(self.num_examples):
            idx = self._image_at(perm, r + j)
            if idx in self.small:
                continue
            try:
                hr, lr, _ = self._image(idx)
            except SmallImageError as e:
                if self.small_images != "skip":
                    raise
                self._add_small(idx, getattr(e, "image_name", str(idx)))
                continue
            return hr, lr, j
        raise SmallImageError(f"every image is smaller than the LR patch "
                              f"{self.patch_size}x{self.patch_size}")

    def _image_at(self, perm: np.ndarray, position: int) -> int:
        """The source index of the image at ``position`` (cyclically) of an epoch's order:
        the one rule `_large_enough` walks by and `note_passed` walks again."""
        return int(self.indices[perm[position % self.num_examples]])

    def _add_small(self, idx: int, name: str) -> None:
        with self._lock:
            if idx not in self.small:
                self.small.add(idx)
                self.small_names.append(name)

    def note_passed(self, k: int, passed: int) -> None:
        """Record the images that sample ``k`` passed over as smaller than the patch when
        another process (a grain worker) made it: they are the ``passed`` images of the
        epoch's permutation from sample k's own position on."""
        epoch, r = divmod(int(k), self.num_examples)
        perm = self._permutation(epoch)
        new = [idx for idx in (self._image_at(perm, r + j) for j in range(int(passed)))
               if idx not in self.small]
        if new:
            names = self.source.names() if hasattr(self.source, "names") else None
            for idx in new:  # without names, read the (small) image once for its name
                name = names[idx] if names else self.source[idx].get("name", idx)
                self._add_small(idx, printable(str(name)))


class LocalSample:
    """Position ``j`` of this process's stream of samples -> ``{'lr', 'hr'}`` float32 in
    [0, 1]: row ``j % b`` of the local batch of step ``j // b`` (b the local batch size), which
    is global sample ``step*B + process_index*b + row``. What the grain pipeline maps."""

    def __init__(self, sampler: PatchSampler, global_batch_size: int, local_batch_size: int,
                 process_index: int):
        self.sampler = sampler
        self.global_batch_size = global_batch_size
        self.local_batch_size = local_batch_size
        self.process_index = process_index

    def sample_id(self, j: int) -> int:
        step, row = divmod(int(j), self.local_batch_size)
        return (step * self.global_batch_size + self.process_index * self.local_batch_size
                + row)

    def __call__(self, j: int) -> dict:
        lr_p, hr_p, passed = self.sampler.patch(self.sample_id(j))
        return {"lr": np.divide(lr_p, np.float32(255), dtype=np.float32),
                "hr": np.divide(hr_p, np.float32(255), dtype=np.float32),
                PASSED: np.int32(passed)}


class PairedPatchLoader:
    """Infinite iterator of patch batches ``{'lr': (b, p, p, 3), 'hr': (b, p*s, p*s, 3)}``,
    float32 in [0, 1], read by a grain pipeline.

    Args:
      source: random-access sequence of dicts with uint8 'hr' (H, W, 3), 'lr' (H/s, W/s, 3)
        and optionally 'name'. ``source.lr_sizes()`` (if present) lets images smaller than
        the patch be found without decoding. With ``num_workers > 0`` it must be picklable
        (``PairedSource`` pickles as its build directory and reopens it in each worker).
      scale: SR factor s.
      patch_size: LR patch size p (the HR patch is p*s).
      global_batch_size: batch size over all processes.
      seed: any non-negative int.
      process_index, process_count: this host's share: rows
        ``[process_index*b, (process_index+1)*b)`` of each global batch, b = B / count.
      augment: random horizontal/vertical flips and transposition (90-degree rotations),
        the same on LR and HR.
      small_images: 'error' (default) refuses at construction an image with an LR side
        shorter than the patch, naming it; 'skip' leaves such images out and counts them
        (``num_skipped``, ``skipped_names``; warning ``SmallImagesSkipped``). A source that
        records no image sizes shows such an image only when it is read: 'error' then raises
        ``SmallImageError``, 'skip' takes the next image of the epoch's permutation that is
        large enough instead (still a pure function of seed and sample index; counted when
        its batch is handed out, also when a worker process read it).
      num_workers: worker processes (grain's ``mp_prefetch``, started with spawn) that
        decode and crop whole batches; 0 (default): in this process. Worker ``i`` of ``W``
        makes the batches of steps ``i, i+W, ...`` and grain hands them out in step order,
        so the batches do not depend on ``W``.
      num_threads: threads per process computing batches ahead (default: 1 in each worker
        process; min(8, cpu count) without workers).
      prefetch: batches prepared ahead per process.
      cache: keep decoded images in memory (in each worker process); default: when the
        source records its image sizes and their copies (one per worker process) total
        under 1 GiB.
    """

    def __init__(self, source, *, scale: int, patch_size: int, global_batch_size: int,
                 seed: int, process_index: int = 0, process_count: int = 1,
                 augment: bool = True, small_images: str = "error",
                 num_workers: int = 0, num_threads: int | None = None, prefetch: int = 2,
                 cache: bool | None = None):
        if process_count < 1 or not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
        if global_batch_size < 1 or global_batch_size % process_count:
            raise ValueError(
                f"global_batch_size {global_batch_size} is not divisible by process_count "
                f"{process_count}: every process must get the same number of samples; use a "
                f"multiple of {process_count}")
        if patch_size < 1 or scale < 1:
            raise ValueError(f"patch_size and scale must be positive, got {patch_size}, {scale}")
        if small_images not in SMALL_IMAGES:
            raise ValueError(f"small_images must be 'error' or 'skip', got {small_images!r}")
        if int(seed) < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be an integer >= 0 (0: no worker processes), "
                             f"got {num_workers!r}")
        if num_threads is not None and (not isinstance(num_threads, int) or num_threads < 1):
            raise ValueError(f"num_threads must be a positive integer, got {num_threads!r}")
        src_scale = getattr(source, "scale", None)
        if src_scale is not None and src_scale != scale:
            raise ValueError(f"the source is built for x{src_scale} but the loader is x{scale}")
        self.source = source
        self.scale = int(scale)
        self.patch_size = int(patch_size)
        self.global_batch_size = int(global_batch_size)
        self.local_batch_size = self.global_batch_size // process_count
        self.seed = int(seed)
        self.process_index = int(process_index)
        self.process_count = int(process_count)
        self.augment = bool(augment)
        self.num_workers = num_workers
        self.num_threads = num_threads or (1 if num_workers else min(8, os.cpu_count() or 1))
        self.prefetch = max(1, int(prefetch))

        n_total = len(source)
        if n_total == 0:
            raise ValueError("the source is empty")
        sizes = source.lr_sizes() if hasattr(source, "lr_sizes") else None
        names = source.names() if hasattr(source, "names") else None
        indices = list(range(n_total))
        self._skipped_at_start: list[str] = []
        if sizes is not None:
            p = self.patch_size
            small = [i for i, (h, w) in enumerate(sizes) if h < p or w < p]
            if small:
                desc = [f"{printable(names[i]) if names else i} (LR {sizes[i][0]}x{sizes[i][1]})"
                        for i in small]
                if small_images == "error":
                    shown = ", ".join(desc[:10]) + (" ..." if len(desc) > 10 else "")
                    raise SmallImageError(
                        f"{len(small)} of {n_total} images are smaller than the LR patch "
                        f"{p}x{p}: {shown}. Use a smaller patch_size, remove them, or pass "
                        "small_images='skip' to leave them out")
                self._skipped_at_start = [names[i] if names else str(i) for i in small]
                bad = set(small)
                indices = [i for i in indices if i not in bad]
                warnings.warn(f"PairedPatchLoader: skipping {len(small)} of {n_total} images "
                              f"smaller than the LR patch {p}x{p}: {', '.join(desc[:10])}",
                              SmallImagesSkipped)
                if not indices:
                    raise SmallImageError(f"every image is smaller than the LR patch {p}x{p}")
        self.small_images = small_images
        self.num_examples = len(indices)
        if cache is None:
            cache = False
            if sizes is not None:
                s2 = self.scale * self.scale
                nbytes = sum(h * w * 3 * (1 + s2) for h, w in sizes)
                cache = nbytes * max(1, num_workers) < (1 << 30)
        self.cache = bool(cache)
        self.sampler = PatchSampler(
            source, scale=self.scale, patch_size=self.patch_size, seed=self.seed,
            augment=self.augment, small_images=small_images,
            indices=np.asarray(indices, np.int64), cache=self.cache)
        self._local = LocalSample(self.sampler, self.global_batch_size, self.local_batch_size,
                                  self.process_index)
        self._step = 0
        self._iterator = None  # made at the first __next__, from self._step

    @property
    def skipped_names(self) -> list[str]:
        """Images left out as smaller than the patch: those the source's sizes show, and
        those found when read so far (here or in a worker process)."""
        return self._skipped_at_start + self.sampler.small_names

    @property
    def num_skipped(self) -> int:
        return len(self.skipped_names)

    def sample(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Global sample ``k``: (LR patch, HR patch), uint8. A pure function of (seed, k)."""
        return self.sampler(k)

    # ------------------------------------------------------------------ the pipeline

    def dataset(self, start_step: int = 0):
        """The grain pipeline of this process's batches from step ``start_step`` on:
        positions ``j`` of the local sample stream, mapped by ``LocalSample``, batched by
        the local batch size, read ahead by threads and, with ``num_workers``, by worker
        processes. Its batches also hold the per-row count ``PASSED``, which ``__next__``
        takes out."""
        import grain

        b = self.local_batch_size
        ds = (grain.MapDataset.range(start_step * b, _LAST_STEP * b)
              .map(self._local)
              .batch(b, drop_remainder=True))
        read = grain.ReadOptions(num_threads=self.num_threads,
                                 prefetch_buffer_size=max(self.prefetch, self.num_threads))
        it = ds.to_iter_dataset(read)
        if self.num_workers:
            _absl_flags_parsed()
            it = it.mp_prefetch(grain.MultiprocessingOptions(
                num_workers=self.num_workers, per_worker_buffer_size=self.prefetch),
                worker_init_fn=functools.partial(_exit_with_parent, os.getpid()))
        return it

    # ------------------------------------------------------------------ iteration

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._iterator is None:
            self._iterator = iter(self.dataset(self._step))
        try:
            batch = next(self._iterator)
        except BaseException:
            self._close_iterator()  # a retry starts a new pipeline at the same step
            raise
        self._note_passed(self._step, batch.pop(PASSED))
        self._step += 1
        return batch

    def _note_passed(self, step: int, passed: np.ndarray) -> None:
        for row in np.flatnonzero(passed):
            self.sampler.note_passed(self._local.sample_id(step * self.local_batch_size + row),
                                     passed[row])

    def batch(self, step: int) -> dict:
        """The local batch of ``step`` computed directly, in this process (does not move
        the iterator): what the pipeline yields for ``step``."""
        rows = [self._local(step * self.local_batch_size + row)
                for row in range(self.local_batch_size)]
        return {key: np.stack([r[key] for r in rows]) for key in ("lr", "hr")}

    @property
    def step(self) -> int:
        """Index of the next batch ``__next__`` returns."""
        return self._step

    def get_state(self) -> dict[str, Any]:
        """The input position, JSON-serialisable. The batches are a pure function of the
        step, so the step is the whole state; the settings are there to refuse resuming
        with others. It does not depend on num_workers or num_threads."""
        return {"version": STATE_VERSION, "step": self._step, "seed": self.seed,
                "global_batch_size": self.global_batch_size,
                "num_examples": self.num_examples, "patch_size": self.patch_size,
                "scale": self.scale}

    def set_state(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unknown loader state version {state.get('version')!r}")
        mine = self.get_state()
        diff = [k for k in ("seed", "global_batch_size", "num_examples", "patch_size", "scale")
                if state.get(k) != mine[k]]
        if diff:
            raise ValueError("the saved loader state was made with different settings, so "
                             "resuming would not continue the same sequence: " + ", ".join(
                                 f"{k} {state.get(k)} (saved) vs {mine[k]} (now)" for k in diff))
        step = int(state["step"])
        if step < 0:
            raise ValueError(f"negative step {step}")
        self._close_iterator()
        self._step = step

    def _close_iterator(self) -> None:
        it, self._iterator = self._iterator, None
        if it is not None and hasattr(it, "close"):
            it.close()

    def close(self):
        self._close_iterator()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def _absl_flags_parsed() -> None:
    """grain 0.2's worker processes read an absl flag of theirs
    (--grain_enable_multiprocess_worker_profiling), which fails before absl has parsed the
    command line, as in a program that does not use absl: take the flags' defaults then."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _exit_with_parent(parent_pid: int, worker_index: int, worker_count: int) -> None:
    """In a worker process: end it within a second of the training process's end, even a
    SIGKILL (grain's workers would otherwise live on, holding the parent's output open)."""
    del worker_index, worker_count

    def watch():
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _augment(img: np.ndarray, hflip: bool, vflip: bool, rot: bool) -> np.ndarray:
    """BasicSR's augmentation: horizontal flip, vertical flip, transpose (H, W); a copy.

    Same result as ``img[:, ::-1][::-1].transpose(1, 0, 2)`` (each step if chosen), done as
    one gather with a cached index: NumPy copies strided 3-channel pixels slowly.
    """
    img = np.ascontiguousarray(img)
    if not (hflip or vflip or rot):
        return img
    h, w, c = img.shape
    return img.reshape(-1)[_dihedral_index(h, w, c, hflip, vflip, rot)].reshape(
        (w, h, c) if rot else (h, w, c))


@functools.lru_cache(maxsize=64)
def _dihedral_index(h: int, w: int, c: int, hflip: bool, vflip: bool, rot: bool) -> np.ndarray:
    pix = np.arange(h * w).reshape(h, w)
    if hflip:
        pix = pix[:, ::-1]
    if vflip:
        pix = pix[::-1]
    if rot:
        pix = pix.T
    return (pix.reshape(-1, 1) * c + np.arange(c)).reshape(-1)
