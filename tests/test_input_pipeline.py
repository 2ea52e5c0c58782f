"""PairedPatchLoader: alignment, augmentation, determinism, resuming, per-host split, and
worker processes that change nothing but the speed."""

import json

import numpy as np
import pytest

from iet_jax.conventions import imresize
from iet_jax.datasets import builders
from iet_jax.datasets import open_source
from iet_jax.datasets.loader import PairedPatchLoader


def _image(rng, h, w):
    # Random noise: every patch position is unique, so a patch can be located in its image.
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


class ListSource:
    """The minimal source: a list of dicts (no recorded sizes)."""

    def __init__(self, items, sizes=True):
        self.items = items
        self._sizes = sizes

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]

    def lr_sizes(self):
        return [tuple(x["lr"].shape[:2]) for x in self.items] if self._sizes else None

    def names(self):
        return [x["name"] for x in self.items]


def make_source(scale, n=5, seed=0, sizes=((24, 30), (20, 20), (33, 21), (18, 26), (40, 19))):
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        hr = _image(rng, h * scale, w * scale)
        items.append({"hr": hr, "lr": imresize.downscale(hr, scale), "name": f"im{i}"})
    return ListSource(items)


DIHEDRAL = [(h, v, r) for h in (0, 1) for v in (0, 1) for r in (0, 1)]


def _aug(img, h, v, r):
    if h:
        img = img[:, ::-1]
    if v:
        img = img[::-1]
    if r:
        img = img.transpose(1, 0, 2)
    return img


def locate(patch, images, p):
    """(image, y, x, transform) such that transform(lr[y:y+p, x:x+p]) == patch."""
    found = []
    for n, lr in enumerate(images):
        for t in DIHEDRAL:
            # undo the transform on the patch, then search for it
            inv = patch
            h, v, r = t
            if r:
                inv = inv.transpose(1, 0, 2)
            if v:
                inv = inv[::-1]
            if h:
                inv = inv[:, ::-1]
            H, W = lr.shape[:2]
            if H < p or W < p:
                continue
            win = np.lib.stride_tricks.sliding_window_view(lr, (p, p, 3))[..., 0, :, :, :]
            hits = np.argwhere((win == inv).all(axis=(2, 3, 4)))
            found += [(n, int(y), int(x), t) for y, x in hits]
    return found


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_crops_align_and_augmentation_is_shared(scale):
    src = make_source(scale)
    p = 8
    loader = PairedPatchLoader(src, scale=scale, patch_size=p, global_batch_size=6, seed=1,
                               num_threads=2)
    lrs = [x["lr"] for x in src.items]
    transforms = set()
    for _ in range(3):
        b = next(loader)
        assert b["lr"].shape == (6, p, p, 3) and b["hr"].shape == (6, p * scale, p * scale, 3)
        assert b["lr"].dtype == np.float32 and b["hr"].dtype == np.float32
        assert 0 <= b["lr"].min() and b["hr"].max() <= 1
        for lr_p, hr_p in zip(b["lr"], b["hr"]):
            lr_u8 = np.round(lr_p * 255).astype(np.uint8)
            hr_u8 = np.round(hr_p * 255).astype(np.uint8)
            hits = locate(lr_u8, lrs, p)
            assert len(hits) >= 1
            n, y, x, t = hits[0]
            transforms.add(t)
            hr_full = src.items[n]["hr"]
            expected_hr = _aug(hr_full[y * scale:(y + p) * scale, x * scale:(x + p) * scale], *t)
            np.testing.assert_array_equal(hr_u8, expected_hr)
            # The LR patch is the bicubic of its HR patch away from the patch border.
            m = 3
            down = imresize.downscale(hr_u8, scale)
            np.testing.assert_allclose(down[m:-m, m:-m].astype(int),
                                       lr_u8[m:-m, m:-m].astype(int), atol=0 if scale != 3 else 1)
    assert len(transforms) > 3  # several flips/rotations were used


def test_no_augmentation_keeps_orientation():
    src = make_source(2)
    loader = PairedPatchLoader(src, scale=2, patch_size=6, global_batch_size=4, seed=3,
                               augment=False, num_threads=1)
    b = next(loader)
    for lr_p in b["lr"]:
        hits = locate(np.round(lr_p * 255).astype(np.uint8), [x["lr"] for x in src.items], 6)
        assert hits and hits[0][3] == (0, 0, 0)


def test_deterministic_for_a_seed_and_threads_do_not_matter():
    src = make_source(4)
    kw = dict(scale=4, patch_size=8, global_batch_size=4)
    a = PairedPatchLoader(src, seed=7, num_threads=1, prefetch=1, **kw)
    b = PairedPatchLoader(src, seed=7, num_threads=4, prefetch=3, **kw)
    c = PairedPatchLoader(src, seed=8, **kw)
    for _ in range(4):
        x, y, z = next(a), next(b), next(c)
        np.testing.assert_array_equal(x["lr"], y["lr"])
        np.testing.assert_array_equal(x["hr"], y["hr"])
    assert not np.array_equal(x["hr"], z["hr"])


def test_state_round_trip_reproduces_the_continuation():
    src = make_source(2)
    kw = dict(scale=2, patch_size=8, global_batch_size=4, seed=11)
    run = PairedPatchLoader(src, **kw)
    batches = []
    state = None
    for i in range(6):
        if i == 3:
            state = json.loads(json.dumps(run.get_state()))  # JSON-serialisable
        batches.append(next(run))
    assert state["step"] == 3
    resumed = PairedPatchLoader(src, **kw)
    next(resumed)  # a fresh loader that already moved: set_state must override it
    resumed.set_state(state)
    for i in range(3, 6):
        b = next(resumed)
        np.testing.assert_array_equal(b["lr"], batches[i]["lr"])
        np.testing.assert_array_equal(b["hr"], batches[i]["hr"])
    np.testing.assert_array_equal(run.batch(4)["hr"], batches[4]["hr"])
    other = PairedPatchLoader(src, **{**kw, "seed": 12})
    with pytest.raises(ValueError, match="seed"):
        other.set_state(state)


def _assert_same(batch, expected, what):
    for key in ("lr", "hr"):
        assert batch[key].shape == expected[key].shape, what
        np.testing.assert_array_equal(batch[key], expected[key], err_msg=f"{what} {key}")


def test_worker_processes_give_the_batches_of_the_process_itself():
    """0 against 2 worker processes (this host being process 1 of 2): the same batches, step
    by step, as `batch(step)` computes in this process; and after `set_state` moves a loader
    with workers back, the same batches again (its workers start afresh at that step)."""
    src = make_source(3, n=4)
    kw = dict(scale=3, patch_size=6, global_batch_size=6, seed=21, process_index=1,
              process_count=2)
    inline = PairedPatchLoader(src, num_workers=0, **kw)
    workers = PairedPatchLoader(src, num_workers=2, **kw)
    try:
        expected = [inline.batch(step) for step in range(6)]
        assert not np.array_equal(expected[0]["hr"], expected[1]["hr"])
        for step in range(6):
            _assert_same(next(inline), expected[step], f"0 workers, step {step}")
            _assert_same(next(workers), expected[step], f"2 workers, step {step}")
        state = json.loads(json.dumps(workers.get_state()))
        assert state == inline.get_state() and state["step"] == 6
        workers.set_state({**state, "step": 2})
        for step in range(2, 5):
            _assert_same(next(workers), expected[step], f"2 workers resumed, step {step}")
        assert workers.step == 5
    finally:
        workers.close()


def test_worker_and_thread_counts_are_checked():
    src = make_source(2)
    kw = dict(scale=2, patch_size=4, global_batch_size=4, seed=0)
    with pytest.raises(ValueError, match="num_workers must be an integer >= 0"):
        PairedPatchLoader(src, num_workers=-1, **kw)
    with pytest.raises(ValueError, match="num_threads must be a positive integer"):
        PairedPatchLoader(src, num_threads=0, **kw)


def test_per_host_parts_are_disjoint_rows_of_the_global_batch():
    src = make_source(3)
    kw = dict(scale=3, patch_size=5, global_batch_size=8, seed=5)
    whole = PairedPatchLoader(src, **kw)
    hosts = [PairedPatchLoader(src, process_index=i, process_count=4, **kw) for i in range(4)]
    for _ in range(3):
        g = next(whole)
        parts = [next(h) for h in hosts]
        assert all(p["lr"].shape[0] == 2 for p in parts)
        np.testing.assert_array_equal(np.concatenate([p["lr"] for p in parts]), g["lr"])
        np.testing.assert_array_equal(np.concatenate([p["hr"] for p in parts]), g["hr"])
    # resuming with a different host count continues the same global sequence
    state = whole.get_state()
    two = [PairedPatchLoader(src, process_index=i, process_count=2, **kw) for i in range(2)]
    for h in two:
        h.set_state(state)
    g = next(whole)
    np.testing.assert_array_equal(np.concatenate([next(h)["hr"] for h in two]), g["hr"])


def test_every_image_once_per_epoch():
    src = make_source(2, n=5)
    loader = PairedPatchLoader(src, scale=2, patch_size=4, global_batch_size=5, seed=0,
                               augment=False)
    lrs = [x["lr"] for x in src.items]
    for _ in range(2):
        b = next(loader)
        seen = sorted(locate(np.round(p * 255).astype(np.uint8), lrs, 4)[0][0] for p in b["lr"])
        assert seen == [0, 1, 2, 3, 4]


def test_bad_arguments():
    src = make_source(2)
    with pytest.raises(ValueError, match="not divisible by process_count 3"):
        PairedPatchLoader(src, scale=2, patch_size=4, global_batch_size=8, seed=0,
                          process_count=3)
    with pytest.raises(ValueError, match="process_index"):
        PairedPatchLoader(src, scale=2, patch_size=4, global_batch_size=8, seed=0,
                          process_index=2, process_count=2)


def test_images_smaller_than_the_patch():
    src = make_source(2)  # LR sizes include 18x26 (im3) and 40x19 (im4)
    with pytest.raises(ValueError, match=r"2 of 5 images are smaller .* im3 \(LR 18x26\), "
                                         r"im4 \(LR 40x19\)"):
        PairedPatchLoader(src, scale=2, patch_size=20, global_batch_size=2, seed=0)
    with pytest.warns(UserWarning, match="skipping 2 of 5"):
        loader = PairedPatchLoader(src, scale=2, patch_size=20, global_batch_size=2, seed=0,
                                   small_images="skip")
    assert loader.num_skipped == 2 and loader.skipped_names == ["im3", "im4"]
    assert loader.num_examples == 3
    next(loader)
    # a source without recorded sizes: refused when the image is met, with its name
    lazy = ListSource(src.items, sizes=False)
    loader = PairedPatchLoader(lazy, scale=2, patch_size=20, global_batch_size=5, seed=0)
    with pytest.raises(ValueError, match="image im[34]: LR .* smaller than the patch"):
        next(loader)


def test_wrong_scale_pairs_are_refused():
    src = make_source(2)
    with pytest.raises(ValueError, match="is not x4 of LR"):
        next(PairedPatchLoader(src, scale=4, patch_size=4, global_batch_size=2, seed=0))


def test_loader_on_a_built_dataset(tmp_path):
    rng = np.random.default_rng(9)
    hr_dir = tmp_path / "HR"
    hr_dir.mkdir()
    from PIL import Image
    for i in range(3):
        Image.fromarray(_image(rng, 48 + 4 * i, 40)).save(hr_dir / f"{i}.png")
    builders.build("paired", 4, data_dir=tmp_path / "d", name="tiny", hr_dirs=[hr_dir],
                    verbose=False, num_workers=1)
    src = open_source("tiny", "train", 4, data_dir=tmp_path / "d")
    loader = PairedPatchLoader(src, scale=4, patch_size=8, global_batch_size=4, seed=0)
    b = next(loader)
    assert b["hr"].shape == (4, 32, 32, 3)
    with pytest.raises(ValueError, match="built for x4"):
        PairedPatchLoader(src, scale=2, patch_size=8, global_batch_size=4, seed=0)
    with pytest.raises(ValueError, match=r"0 \(LR 12x10\)"):
        PairedPatchLoader(src, scale=4, patch_size=11, global_batch_size=4, seed=0)
