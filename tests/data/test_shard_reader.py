"""diffusion.data.ShardReader on real prepared shards: reads that cross shard boundaries equal
``np.load`` of the shard files; a bounded number of open files; short reads retried; the
version pinned (a shard replaced under a reader, or of another version than the manifest, is an
error naming it)."""

import os
import pickle
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from diffusion import prepare as prep_mod
from diffusion.config import ConfigError
from diffusion.data import MAX_OPEN_SHARDS, ShardReader, load_prepared
from diffusion.prepare import KeyOrdered, Record, prepare, shard_images


def records(n: int, seed: int) -> KeyOrdered:
    rng = np.random.default_rng(seed)
    return KeyOrdered(Record(f"{i:05d}", rng.integers(0, 256, (6, 6, 3), dtype=np.uint8),
                             "ab"[i % 2]) for i in range(n))


@pytest.fixture
def prepared(tmp_path, monkeypatch):
    """300 6x6 RGB images, 7 to a shard: about 35 train shards and 8 held-out ones."""
    monkeypatch.setattr(prep_mod, "SHARD_BYTES", 7 * 108)
    assert shard_images(6, 3) == 7
    out = tmp_path / "prepared"
    prepare(records(300, seed=0), out, resolution=6, channels=3, heldout_fraction=0.2)
    return out


def reference(directory: Path, split: str) -> np.ndarray:
    """The split as np.load reads it: its shard files in name order, concatenated."""
    return np.concatenate([np.load(p) for p in sorted(directory.glob(f"{split}-*.npy"))])


def manifest_reader(directory: Path, split: str, **kw) -> ShardReader:
    """A reader built from the manifest as load_prepared builds it, with other options."""
    rows = pd.read_csv(directory / "manifest.csv", dtype={"sha256": str})
    rows = rows[rows["split"] == split].sort_values(["shard", "index"]).groupby("shard")
    return ShardReader([directory / f"{split}-{s:05d}.npy" for s in rows.size().index],
                       rows.size().tolist(), first_sha256=rows["sha256"].first().tolist(), **kw)


def open_fds(under: Path) -> int:
    """This process's open files under ``under`` (other tests' clients may open files too)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith(str(under))
        except OSError:
            pass
    return count


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_reads_across_shard_boundaries_equal_np_load(prepared, split):
    images = load_prepared(prepared, split).images
    ref = reference(prepared, split)
    assert len(images.paths) > 5 and images.shape == ref.shape
    assert np.array_equal(images[:].numpy(), ref)
    assert np.array_equal(load_prepared(prepared, split, in_memory=True).images.numpy(), ref)
    assert np.array_equal(pickle.loads(pickle.dumps(images))[::-1].numpy(), ref[::-1])   # reopens
    rng = np.random.default_rng(1)
    n = len(ref)
    for _ in range(50):
        a, b = sorted(rng.integers(0, n + 1, 2))
        step = int(rng.choice([1, 1, 2, 5, -1, -3]))
        assert np.array_equal(images[a:b:step].numpy(), ref[a:b:step]), (a, b, step)
        index = rng.integers(-n, n, int(rng.integers(0, 40)))        # repeats, negatives
        assert np.array_equal(images[index].numpy(), ref[index])
        assert np.array_equal(images[torch.from_numpy(index)].numpy(), ref[index])
        i = int(rng.integers(-n, n))
        assert np.array_equal(images[i].numpy(), ref[i])
    with pytest.raises(IndexError, match="out of range"):
        images[np.array([0, n])]


def test_open_shards_stay_bounded(tmp_path):
    """Far more shards than may be open: the reader keeps at most ``max_open`` (default 64,
    well under `ulimit -n`) and closes them all when dropped."""
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (int(rng.integers(1, 4)), 1, 2, 2), dtype=np.uint8) for _ in range(200)]
    paths = []
    for i, a in enumerate(arrays):
        paths.append(tmp_path / f"train-{i:05d}.npy")
        np.save(paths[-1], a)
    ref = np.concatenate(arrays)
    before = open_fds(tmp_path)
    for max_open, kw in ((MAX_OPEN_SHARDS, {}), (3, {"max_open": 3})):
        reader = ShardReader(paths, [len(a) for a in arrays], **kw)
        index = rng.permutation(len(ref))
        assert np.array_equal(reader[index].numpy(), ref[index])
        assert np.array_equal(reader[:].numpy(), ref)
        assert open_fds(tmp_path) - before == max_open
        del reader
        assert open_fds(tmp_path) == before
    assert MAX_OPEN_SHARDS <= 128


def test_short_reads_are_retried(prepared, monkeypatch):
    """A filesystem that returns at most 5 bytes a call (NFS, FUSE and Lustre may return fewer
    than asked): the reader asks again until it has them all."""
    real, calls = os.preadv, []

    def short_preadv(fd, buffers, offset):
        calls.append(offset)
        return real(fd, [memoryview(buffers[0])[:5]], offset)

    monkeypatch.setattr(os, "preadv", short_preadv)
    images = load_prepared(prepared, "train").images
    ref = reference(prepared, "train")
    assert np.array_equal(images[3:40].numpy(), ref[3:40])
    assert np.array_equal(images[[50, 2, 50]].numpy(), ref[[50, 2, 50]])
    assert len(calls) > 37 * 108 // 5                  # every read really came in pieces


def test_a_file_that_ends_early_is_reported_with_its_offsets(prepared):
    images = load_prepared(prepared, "train").images
    shard = images.paths[1]
    size = shard.stat().st_size
    os.truncate(shard, size - 100)                      # under the open file: reads reach EOF
    first = int(images.starts[1])
    with pytest.raises(ConfigError, match=re.escape(f"{shard}: truncated: the file ends at byte "
                                                    f"{size - 100}, images {first}..{first + 6} need "
                                                    f"bytes {size - 7 * 108}..{size}; prepare again")):
        images[first:first + 7]


def test_a_prepare_rerun_under_a_reader_is_an_error_not_a_mix(prepared):
    reader = manifest_reader(prepared, "train", max_open=2)
    old = reference(prepared, "train")
    assert np.array_equal(reader[:].numpy(), old)       # the last two shards stay open
    prepare(records(300, seed=1), prepared, resolution=6, channels=3, heldout_fraction=0.2)
    last = len(reader) - 1
    assert np.array_equal(reader[last].numpy(), old[last])    # still open: the old file, whole
    with pytest.raises(ConfigError, match=re.escape(f"{reader.paths[0]}: not the file this job "
                                                    "opened") + ".*prepare ran again"):
        reader[0]                                       # closed since: reopening finds another file


def test_a_shard_of_another_version_than_the_manifest_is_refused(prepared):
    shard = prepared / "train-00002.npy"
    pixels = np.load(shard)
    np.save(shard, pixels[::-1].copy())                  # same size, other images
    with pytest.raises(ConfigError, match=re.escape(f"{shard}: its first image has sha256 ") +
                       ".*the manifest lists .*another version than the manifest"):
        load_prepared(prepared, "train")
    np.save(shard, np.concatenate([pixels, pixels[:1]]))
    with pytest.raises(ConfigError, match=re.escape(f"{shard}: holds 8 images, the manifest lists 7")):
        load_prepared(prepared, "train")
    with open(shard, "ab") as f:                         # bytes past the end of the array
        f.write(b"\0")
    with pytest.raises(ConfigError, match=re.escape(f"{shard}: ") + r"\d+ bytes, its header says "
                       r"\d+ .*\(trailing bytes\)"):
        ShardReader([shard], [8])
