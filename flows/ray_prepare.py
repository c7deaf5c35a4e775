"""The prepare stage on Ray Data (``data.engine: ray``): decoding, conversion, cropping and
resizing run in ``map_batches`` tasks across the cluster's CPUs; the driver lists the source and
writes the result through the same writer as the local engine
(:func:`diffusion.prepare.write_prepared`), so the shards, manifest, statistics and rejects are
byte-identical to ``data.engine: local`` for the same source, with the same bad-file policy.

Where the bytes come from:

- ``folder``: the driver lists the folder (the same link rules as the local engine) and sends
  the encoded files through Ray's object store in chunks of ``CHUNK_BYTES``, so the workers
  need no access to the driver's filesystem and the driver holds one chunk of encoded bytes at a
  time.
- ``s3``: the driver lists the prefix; each task fetches its own objects with the node's
  standard AWS settings. Keys that would escape the target directory are refused before any
  read, as in the local engine.

The cluster is ``RAY_ADDRESS`` when set, else a local one (:func:`flows.ray_train.init_ray`).
"""

from __future__ import annotations

import functools
import json
import logging
import socket
from pathlib import Path
from typing import Iterator

import numpy as np
import PIL

from diffusion.config import ConfigError, DataConfig
from diffusion.prepare import (BadFile, DataError, FolderEntry, PreparedImage, PrepareResult, Record,
                               folder_entries, prepare_record, write_prepared)
from flows.provenance import source_digest

CHUNK_BYTES = 64 * 2**20       # encoded folder bytes per Ray Data dataset (the driver holds one)
CHUNK_KEYS = 4096               # S3 objects per Ray Data dataset
BATCH = 256                     # images per map_batches call
log = logging.getLogger(__name__)


class DecoderMismatch(ConfigError):
    """A task decoded with other code or other image libraries than the driver's, so its bytes
    could differ from the local engine's (every node needs the same image)."""


@functools.cache
def decoder_version() -> dict[str, str]:
    """What decides the prepared bytes besides the input: this code, Pillow and NumPy (computed
    once per process: it hashes the source files)."""
    return {"digest": source_digest(), "pillow": PIL.__version__, "numpy": np.__version__,
            "node": socket.gethostname()}


def check_decoders(seen: set[str], driver: dict[str, str]) -> None:
    """Every task's :func:`decoder_version` (JSON) must match the driver's, node aside."""
    mine = {k: v for k, v in driver.items() if k != "node"}
    for blob in sorted(seen):
        theirs = json.loads(blob)
        node = theirs.pop("node", "?")
        if theirs != mine:
            raise DecoderMismatch(
                f"data.engine = 'ray': node {node} decodes with code {theirs.get('digest')}, Pillow "
                f"{theirs.get('pillow')}, NumPy {theirs.get('numpy')}; the driver has "
                f"{mine['digest']}, {mine['pillow']}, {mine['numpy']}: its output could differ from "
                "the local engine's; deploy the driver's image on every node (infra/README.md)")


def _decode_batch(batch: dict[str, np.ndarray], *, resolution: int, channels: int,
                  bucket: str | None = None, prefix: str = "") -> dict[str, np.ndarray]:
    """One Ray Data batch: rows (pos, key, label, payload) of a folder chunk, or (pos, key) of S3
    keys fetched here; returns (pos, key, label, sha256, pixels, reason), reason set for a bad
    file."""
    client = None
    if bucket is not None:
        from flows.s3 import fetch_record, s3_client
        client = s3_client()
    out: dict[str, list] = {k: [] for k in ("pos", "key", "label", "sha256", "pixels", "reason")}
    version = json.dumps(decoder_version(), sort_keys=True)
    for i, pos in enumerate(batch["pos"]):
        key = str(batch["key"][i])
        if client is not None:
            record = fetch_record(client, bucket, prefix, key)
        else:
            label = str(batch["label"][i])
            record = Record(key, bytes(batch["payload"][i]), label or None)
        result = prepare_record(record, resolution, channels)
        out["pos"].append(int(pos))
        out["key"].append(result.key)
        if isinstance(result, BadFile):
            out["label"].append("")
            out["sha256"].append("")
            out["pixels"].append(b"")
            out["reason"].append(result.reason)
        else:
            out["label"].append(result.label or "")
            out["sha256"].append(result.sha256)
            out["pixels"].append(result.pixels.tobytes())
            out["reason"].append("")
    return {"pos": np.array(out["pos"], dtype=np.int64),
            "version": np.array([version] * len(out["pos"]), dtype=object),
            **{k: np.array(out[k], dtype=object) for k in ("key", "label", "sha256", "pixels", "reason")}}


def _run(rows: list[dict], fn, workers: int) -> list[tuple[int, PreparedImage | BadFile]]:
    """Decode ``rows`` on Ray Data; results by listing position, after checking that every task
    decoded with the driver's code and libraries."""
    import ray.data
    logging.getLogger("ray.data").setLevel(logging.ERROR)   # the stage prints one line; Ray's log has the rest
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ds = ray.data.from_items(rows).map_batches(
        fn, batch_size=BATCH, batch_format="numpy", num_cpus=1,
        compute=ray.data.TaskPoolStrategy(size=workers or None))
    results, versions = [], set()
    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        versions.update(str(v) for v in batch["version"])
        for i, pos in enumerate(batch["pos"]):
            key, reason = str(batch["key"][i]), str(batch["reason"][i])
            if reason:
                results.append((int(pos), BadFile(key, reason)))
            else:
                results.append((int(pos), (key, batch["pixels"][i], str(batch["label"][i]) or None,
                                           str(batch["sha256"][i]))))
    check_decoders(versions, decoder_version())
    return results


def _folder_chunks(entries: list[FolderEntry | BadFile]):
    """(rows, bad files) per chunk of at most CHUNK_BYTES of encoded files, in listing order."""
    rows, bad, size = [], [], 0
    for pos, entry in enumerate(entries):
        if isinstance(entry, BadFile):
            bad.append((pos, entry))
            continue
        payload = entry.path.read_bytes()
        rows.append({"pos": pos, "key": entry.key, "label": entry.label or "", "payload": payload})
        size += len(payload)
        if size >= CHUNK_BYTES:
            yield rows, bad
            rows, bad, size = [], [], 0
    if rows or bad:
        yield rows, bad


def ray_prepare(d: DataConfig, progress=None) -> PrepareResult:
    """The prepare stage for ``d`` with decoding on Ray Data (see the module docstring)."""
    if d.bad_files not in ("fail", "skip"):
        raise DataError(f"data.bad_files = {d.bad_files!r}: expected 'fail' or 'skip'")
    if d.source not in ("folder", "s3"):
        raise DataError(f"data.engine = 'ray': reads folder and s3 sources; data.source = "
                        f"{d.source!r} is small and packaged, use data.engine=local")
    from flows.ray_train import init_ray
    init_ray()
    shape = dict(resolution=d.resolution, channels=d.channels)

    def decoded(chunks) -> Iterator[PreparedImage | BadFile]:
        """Chunk after chunk (each bounded: CHUNK_BYTES of files, or CHUNK_KEYS objects), decoded
        on Ray Data and put back in listing order: the driver holds one chunk at a time."""
        for rows, bad, fn in chunks:
            found = bad + (_run(rows, fn, d.ray_workers) if rows else [])
            found.sort(key=lambda item: item[0])
            for _, item in found:
                if isinstance(item, BadFile):
                    yield item
                else:
                    key, pixels, label, sha = item
                    pixels = np.frombuffer(pixels, np.uint8).reshape(d.channels, d.resolution, d.resolution)
                    yield PreparedImage(key, pixels, label, sha)

    if d.source == "folder":
        entries = sorted(folder_entries(d.path), key=lambda e: e.key)      # key order
        fn = functools.partial(_decode_batch, **shape)
        chunks = ((rows, bad, fn) for rows, bad in _folder_chunks(entries))
    else:
        from flows.s3 import list_keys, parse_s3_uri
        bucket, prefix = parse_s3_uri(d.path)
        keys = list_keys(d.path)                                          # sorted
        fn = functools.partial(_decode_batch, bucket=bucket, prefix=prefix, **shape)
        chunks = (([{"pos": i, "key": k} for i, k in enumerate(keys[start:start + CHUNK_KEYS], start)], [], fn)
                  for start in range(0, len(keys), CHUNK_KEYS))
    items = decoded(chunks)
    origin = f"{d.source}:{d.path}"
    return write_prepared(items, Path(d.prepared_dir), resolution=d.resolution, channels=d.channels,
                          heldout_fraction=d.heldout_fraction, bad_files=d.bad_files, source=d.source,
                          origin=origin, progress=progress)
