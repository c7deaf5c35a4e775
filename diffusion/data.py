"""Training data: the prepared dataset (see :mod:`diffusion.prepare`) as uint8 images.

A split is read from its ``.npy`` shards on demand (:class:`ShardReader`): each request reads
just the images it names with positioned reads through the page cache, so a process's resident
memory does not grow with the dataset, and the workers of a node share one cached copy. Only the
labels (8 bytes an image) are held in memory. ``load_prepared(..., in_memory=True)`` reads the
whole split into one tensor instead (small data, benchmarks).
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from diffusion.config import ConfigError, DataConfig
from diffusion.prepare import image_sha256

MAX_OPEN_SHARDS = 64      # open shard files per reader: well under the default `ulimit -n` of 1024


class ShardReader:
    """The uint8 (N, C, H, W) images of one split, stored in ``.npy`` shards, indexed like a
    tensor: ``reader[i]``, ``reader[a:b]`` and ``reader[index_tensor]`` return uint8 tensors (a
    copy of just those images). Picklable: a copy sent to another process reopens the files.

    At most ``max_open`` shards are open at a time (the least recently read is closed first).
    The version is pinned: each shard's size must match its header and the manifest's count,
    its first image the manifest's ``sha256`` (``first_sha256``, one per shard), and a shard
    opened again later must be the very file seen at construction (device, inode, size,
    modification time), so a ``prepare`` re-run under a running job is an error, not a mix of
    two versions."""

    dtype = torch.uint8

    def __init__(self, paths: list[Path], counts: list[int], *, first_sha256: list[str] | None = None,
                 max_open: int = MAX_OPEN_SHARDS) -> None:
        if len(paths) != len(counts) or not paths:
            raise ValueError("ShardReader needs one count per shard and at least one shard")
        if first_sha256 is not None and len(first_sha256) != len(paths):
            raise ValueError("ShardReader needs one first-image sha256 per shard")
        if max_open < 1:
            raise ValueError(f"max_open = {max_open}: expected at least 1 open shard")
        self.paths = [Path(p) for p in paths]
        self.max_open = max_open
        self.offsets: list[int] = []
        self.identities: list[tuple[int, int, int, int]] = []   # (st_dev, st_ino, st_size, st_mtime_ns)
        item: tuple[int, ...] | None = None
        for path, count in zip(self.paths, counts):
            shape, offset, identity = _npy_layout(path)
            if shape[0] != count:
                raise ConfigError(f"{path}: holds {shape[0]} images, the manifest lists {count}; "
                                  "prepare again")
            if item is not None and shape[1:] != item:
                raise ConfigError(f"{path}: images of shape {shape[1:]}, the split's first shard "
                                  f"has {item}; prepare again")
            item = shape[1:]
            self.offsets.append(offset)
            self.identities.append(identity)
        self.item_shape: tuple[int, ...] = item
        self.item_bytes = int(np.prod(item))
        self.starts = np.cumsum([0] + list(counts))          # first image of each shard
        self.shape = torch.Size((int(self.starts[-1]), *item))
        self._fds: OrderedDict[int, int] = OrderedDict()     # shard -> fd, least recently read first
        self._lock = threading.Lock()
        self._pid = os.getpid()
        for shard, digest in enumerate(first_sha256 or []):
            found = image_sha256(self[int(self.starts[shard])].numpy())
            if found != digest:
                raise ConfigError(f"{self.paths[shard]}: its first image has sha256 {found}, the "
                                  f"manifest lists {digest}; the shard is of another version than "
                                  "the manifest (prepare ran again?); prepare again")

    def __len__(self) -> int:
        return self.shape[0]

    def dim(self) -> int:
        return len(self.shape)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fds": OrderedDict(), "_lock": None, "_pid": None}

    def __del__(self) -> None:
        if getattr(self, "_pid", None) == os.getpid():
            for fd in self._fds.values():
                os.close(fd)

    def _fd(self, shard: int) -> int:
        """The open file of ``shard`` (opened, and checked against its pin, when not open);
        called under ``self._lock``."""
        if shard in self._fds:
            self._fds.move_to_end(shard)
            return self._fds[shard]
        if len(self._fds) >= self.max_open:
            os.close(self._fds.popitem(last=False)[1])
        path = self.paths[shard]
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise ConfigError(f"{path}: shard missing (the prepared data changed under this job? "
                              "prepare ran again?); restart the job") from None
        found = _identity(os.fstat(fd))
        if found != self.identities[shard]:
            os.close(fd)
            changed = ", ".join(f"{name} {a} -> {b}" for name, a, b in zip(
                ("device", "inode", "size", "mtime_ns"), self.identities[shard], found) if a != b)
            raise ConfigError(f"{path}: not the file this job opened ({changed}); the prepared data "
                              "changed under a running job (prepare ran again?); restart the job "
                              "to train on one version")
        self._fds[shard] = fd
        return fd

    def _read_run(self, out: np.ndarray, first: int, count: int) -> None:
        """Images [first, first + count) of one shard into ``out`` (contiguous)."""
        shard = int(np.searchsorted(self.starts, first, side="right")) - 1
        start = self.offsets[shard] + (first - int(self.starts[shard])) * self.item_bytes
        view = memoryview(out).cast("B")
        if self._pid != os.getpid():     # a forked or unpickled copy: the fds it holds are not its own
            self._fds, self._lock, self._pid = OrderedDict(), threading.Lock(), os.getpid()
        with self._lock:
            fd = self._fd(shard)
            done = 0
            while done < len(view):      # NFS, FUSE and Lustre may return fewer bytes than asked
                got = os.preadv(fd, [view[done:]], start + done)
                if got == 0:
                    raise ConfigError(
                        f"{self.paths[shard]}: truncated: the file ends at byte {start + done}, "
                        f"images {first}..{first + count - 1} need bytes {start}..{start + len(view)}; "
                        "prepare again")
                done += got

    def _runs(self, first: int, stop: int):
        """(first, count) pieces of [first, stop) that do not cross a shard boundary."""
        while first < stop:
            shard = int(np.searchsorted(self.starts, first, side="right")) - 1
            end = min(stop, int(self.starts[shard + 1]))
            yield first, end - first
            first = end

    def __getitem__(self, key) -> torch.Tensor:
        n = len(self)
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step == 1:
                out = np.empty((max(0, stop - start), *self.item_shape), np.uint8)
                pos = 0
                for first, count in self._runs(start, stop):
                    self._read_run(out[pos:pos + count], first, count)
                    pos += count
                return torch.from_numpy(out)
            key = np.arange(start, stop, step)
        if isinstance(key, int):
            if not -n <= key < n:
                raise IndexError(f"image {key} out of range for {n} images")
            return self[key % n:key % n + 1][0]
        index = np.asarray(key.cpu() if isinstance(key, torch.Tensor) else key, dtype=np.int64)
        if index.ndim != 1:
            raise IndexError("index images with an int, a slice or a 1-D index")
        if index.size and (index.min() < -n or index.max() >= n):
            raise IndexError(f"image index out of range for {n} images")
        index = index % n if index.size else index
        out = np.empty((index.size, *self.item_shape), np.uint8)
        for pos in np.argsort(index, kind="stable"):       # file order: sequential-ish reads
            self._read_run(out[pos:pos + 1], int(index[pos]), 1)
        return torch.from_numpy(out)

    def load(self) -> torch.Tensor:
        """The whole split as one in-memory tensor."""
        return self[:]


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _npy_layout(path: Path) -> tuple[tuple[int, ...], int, tuple[int, int, int, int]]:
    """Shape, data offset and identity (:func:`_identity`) of a C-ordered uint8 (N, C, H, W)
    ``.npy`` file, from its header and the open file."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read_header is None:
                raise ValueError(f".npy format version {version} is not supported")
            shape, fortran, dtype = read_header(f)
            offset = f.tell()
            identity = _identity(os.fstat(f.fileno()))
    except FileNotFoundError:
        raise ConfigError(f"{path}: shard missing; prepare again") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not a readable .npy shard ({exc})") from None
    if dtype != np.uint8 or fortran or len(shape) != 4:
        raise ConfigError(f"{path}: expected a C-ordered uint8 (N, C, H, W) array, found "
                          f"{dtype} {shape}{' in Fortran order' if fortran else ''}; prepare again")
    size, expected = identity[2], offset + int(np.prod(shape))
    if size != expected:
        raise ConfigError(f"{path}: {size} bytes, its header says {expected} for {shape} images "
                          f"({'truncated' if size < expected else 'trailing bytes'}); prepare again")
    return tuple(int(x) for x in shape), offset, identity


@dataclass(frozen=True)
class ImageSet:
    images: torch.Tensor | ShardReader   # (N, C, H, W) uint8, in memory or read on demand
    labels: torch.Tensor                 # (N,) int64, -1 = unlabelled
    num_classes: int

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be a uint8 (N, C, H, W) tensor, got {self.images.dtype} "
                             f"{tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels must have shape ({self.images.shape[0]},), "
                             f"got {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return self.images.shape[0]


def load_prepared(directory: str | Path, split: str = "train", *, in_memory: bool = False) -> ImageSet:
    """One split of a prepared dataset directory (shards in manifest order), read on demand from
    the shards, or wholly into memory with ``in_memory``."""
    directory = Path(directory)
    manifest_path = directory / "manifest.csv"
    if not manifest_path.is_file():
        raise ConfigError(f"data.prepared_dir = {str(directory)!r}: no manifest.csv; run the prepare "
                          "stage first (python -m diffusion prepare, or dvc repro)")
    manifest = pd.read_csv(manifest_path, usecols=["sha256", "label", "split", "shard", "index"],
                           dtype={"sha256": str})
    rows = manifest[manifest["split"] == split].sort_values(["shard", "index"])
    if rows.empty:
        raise ConfigError(f"{manifest_path}: split {split!r} is empty")
    shards = rows.groupby("shard")                      # sorted by shard, then index
    counts = shards.size()
    reader = ShardReader([directory / f"{split}-{int(s):05d}.npy" for s in counts.index],
                         [int(c) for c in counts.to_numpy()],
                         first_sha256=[str(h) for h in shards["sha256"].first()])
    classes = json.loads((directory / "stats.json").read_text()).get("classes", [])
    labels = rows["label"].to_numpy(np.int64).copy()     # pandas 3 hands out read-only arrays
    return ImageSet(reader.load() if in_memory else reader, torch.from_numpy(labels),
                    num_classes=len(classes))


def load_dataset(cfg: DataConfig, split: str = "train") -> ImageSet:
    return load_prepared(cfg.prepared_dir, split)


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]."""
    return images.float() / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255] (clipped)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
