"""Training input: random paired LR/HR patches with flips and 90-degree rotations.

``PairedPatchLoader`` reads any random-access source of ``{'hr', 'lr', 'name'}`` dicts
(``iet_jax.datasets.open_source``) with NumPy only.

Determinism: the global batch of step ``t`` is made of the samples ``k = t*B .. t*B+B-1``
(B the global batch size). Sample ``k`` takes image ``perm_e[k mod n]`` where ``perm_e`` is
a seeded permutation of the ``n`` images for epoch ``e = k // n`` (every image once per
epoch), and its crop position and augmentation come from a generator seeded with
``(seed, k)``. So a batch is a pure function of (seed, step, process): resuming from
``get_state()`` reproduces exactly what an uninterrupted run sees, threads only change the
speed, and process ``p`` of ``P`` gets rows ``p*B/P .. (p+1)*B/P - 1`` of the same global
batch, whatever the number of processes.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import os
import threading
import warnings
from typing import Any

import numpy as np

from iet_jax.conventions.text import printable

STATE_VERSION = 1
SMALL_IMAGES = ("error", "skip")
_PERM_TAG = 0x5EED_0001
_SAMPLE_TAG = 0x5EED_0002


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


class PairedPatchLoader:
    """Infinite iterator of patch batches ``{'lr': (b, p, p, 3), 'hr': (b, p*s, p*s, 3)}``.

    Args:
      source: random-access sequence of dicts with uint8 'hr' (H, W, 3), 'lr' (H/s, W/s, 3)
        and optionally 'name'. ``source.lr_sizes()`` (if present) lets images smaller than
        the patch be found without decoding.
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
        large enough instead (still a pure function of seed and sample index) and counts it.
      num_workers: threads decoding and cropping (default: min(8, cpu count)).
      prefetch: batches prepared ahead in the background.
      cache: keep decoded images in memory; default: when the source records its image
        sizes and they total under 1 GiB.
    """

    def __init__(self, source, *, scale: int, patch_size: int, global_batch_size: int,
                 seed: int, process_index: int = 0, process_count: int = 1,
                 augment: bool = True, small_images: str = "error",
                 num_workers: int | None = None, prefetch: int = 2,
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
        self.prefetch = max(0, int(prefetch))

        n_total = len(source)
        if n_total == 0:
            raise ValueError("the source is empty")
        sizes = source.lr_sizes() if hasattr(source, "lr_sizes") else None
        names = source.names() if hasattr(source, "names") else None
        self._sizes_known = sizes is not None
        indices = list(range(n_total))
        self.skipped_names: list[str] = []
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
                self.skipped_names = [names[i] if names else str(i) for i in small]
                bad = set(small)
                indices = [i for i in indices if i not in bad]
                warnings.warn(f"PairedPatchLoader: skipping {len(small)} of {n_total} images "
                              f"smaller than the LR patch {p}x{p}: {', '.join(desc[:10])}",
                              SmallImagesSkipped)
                if not indices:
                    raise SmallImageError(f"every image is smaller than the LR patch {p}x{p}")
        self.small_images = small_images
        self._small: set[int] = set()  # found when read (sources without recorded sizes)
        self._indices = np.asarray(indices, np.int64)
        self.num_examples = len(indices)
        self.num_skipped = len(self.skipped_names)
        if cache is None:
            cache = False
            if sizes is not None:
                s2 = self.scale * self.scale
                nbytes = sum(h * w * 3 * (1 + s2) for h, w in sizes)
                cache = nbytes < (1 << 30)
        self._cache: dict[int, tuple[np.ndarray, np.ndarray, str]] | None = {} if cache else None
        self._step = 0
        self._perms: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()
        workers = num_workers if num_workers is not None else min(8, os.cpu_count() or 1)
        self._pool = (concurrent.futures.ThreadPoolExecutor(workers, "patch-loader")
                      if workers > 1 else None)
        self._queue: collections.deque = collections.deque()

    # ------------------------------------------------------------------ sampling

    def _permutation(self, epoch: int) -> np.ndarray:
        with self._lock:  # worker threads share this small cache
            perm = self._perms.get(epoch)
            if perm is None:
                rng = np.random.default_rng([self.seed, _PERM_TAG, epoch])
                perm = rng.permutation(self.num_examples)
                if len(self._perms) >= 4:
                    self._perms.pop(next(iter(self._perms)))
                self._perms[epoch] = perm
            return perm

    def _image(self, idx: int) -> tuple[np.ndarray, np.ndarray, str]:
        if self._cache is not None and idx in self._cache:
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
        if self._cache is not None:
            self._cache[idx] = (hr, lr, name)
        return hr, lr, name

    def sample(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Global sample ``k``: (LR patch, HR patch), uint8. A pure function of (seed, k)."""
        epoch, r = divmod(int(k), self.num_examples)
        hr, lr = self._large_enough(self._permutation(epoch), r)
        rng = np.random.default_rng([self.seed, _SAMPLE_TAG, int(k)])
        p, s = self.patch_size, self.scale
        h, w = lr.shape[:2]
        y = int(rng.integers(0, h - p + 1))
        x = int(rng.integers(0, w - p + 1))
        lr_p = lr[y:y + p, x:x + p]
        hr_p = hr[y * s:(y + p) * s, x * s:(x + p) * s]
        if self.augment:
            hflip, vflip, rot = (bool(b) for b in rng.random(3) < 0.5)
            return _augment(lr_p, hflip, vflip, rot), _augment(hr_p, hflip, vflip, rot)
        return np.ascontiguousarray(lr_p), np.ascontiguousarray(hr_p)

    def _large_enough(self, perm: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
        """(HR, LR) of image ``perm[r]``; with small_images='skip', of the first image from
        there on (cyclically) that is not smaller than the patch."""
        n = len(perm)
        for j in range(n):
            idx = int(self._indices[perm[(r + j) % n]])
            if idx in self._small:
                continue
            try:
                hr, lr, _ = self._image(idx)
            except SmallImageError as e:
                if self.small_images != "skip":
                    raise
                with self._lock:
                    if idx not in self._small:
                        self._small.add(idx)
                        self.skipped_names.append(getattr(e, "image_name", str(idx)))
                        self.num_skipped = len(self.skipped_names)
                continue
            return hr, lr
        raise SmallImageError(f"every image is smaller than the LR patch "
                              f"{self.patch_size}x{self.patch_size}")

    def _sample_ids(self, step: int) -> range:
        start = step * self.global_batch_size + self.process_index * self.local_batch_size
        return range(start, start + self.local_batch_size)

    def _new_batch(self) -> dict:
        b, p, s = self.local_batch_size, self.patch_size, self.scale
        return {"lr": np.empty((b, p, p, 3), np.float32),
                "hr": np.empty((b, p * s, p * s, 3), np.float32)}

    def _fill(self, out: dict, row: int, k: int) -> None:
        """Sample ``k`` into row ``row`` of ``out`` as float32 in [0, 1]."""
        lr_p, hr_p = self.sample(k)
        np.divide(lr_p, np.float32(255), out=out["lr"][row], dtype=np.float32)
        np.divide(hr_p, np.float32(255), out=out["hr"][row], dtype=np.float32)

    def _submit(self, step: int):
        out = self._new_batch()
        ids = self._sample_ids(step)
        if self._pool is None:
            for row, k in enumerate(ids):
                self._fill(out, row, k)
            return out, [_Done(None)]
        return out, [self._pool.submit(self._fill, out, row, k) for row, k in enumerate(ids)]

    # ------------------------------------------------------------------ iteration

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        while len(self._queue) < 1 + self.prefetch:
            nxt = self._step + len(self._queue)
            self._queue.append(self._submit(nxt))
        out, futures = self._queue.popleft()
        try:
            for f in futures:
                f.result()
        except BaseException:
            self._drain()  # later batches may hold the same error; recompute on retry
            raise
        self._step += 1
        return out

    def batch(self, step: int) -> dict:
        """The local batch of ``step`` computed directly (does not move the iterator)."""
        out = self._new_batch()
        for row, k in enumerate(self._sample_ids(step)):
            self._fill(out, row, k)
        return out

    @property
    def step(self) -> int:
        """Index of the next batch ``__next__`` returns."""
        return self._step

    def get_state(self) -> dict[str, Any]:
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
        self._drain()
        self._step = step

    def _drain(self):
        while self._queue:
            for f in self._queue.popleft()[1]:
                f.cancel()

    def close(self):
        self._drain()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


class _Done:
    def __init__(self, value):
        self._value = value

    def result(self):
        return self._value

    def cancel(self):
        return False


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
