"""The prepared dataset on any node, by version: a training worker gets ``data.prepared_dir`` by
its DVC content hash (``<md5>.dir``, the ``dataset_version`` of every run) instead of trusting a
path of the driver's machine.

Order of preference on a worker:

1. the configured path, when it exists on this node and hashes to the version (one machine, or
   a shared filesystem): used in place, nothing is copied;
2. the node's cache, ``$DDPM_CACHE_DIR/datasets/<version>`` (default ``~/.cache/ddpm-pipeline``),
   filled once per node and reused by later runs;
3. the DVC remote the pipeline pushed to (``dvc push``; the Prefect flow pushes before it trains):
   a local directory or ``s3://`` (boto3; endpoint from the DVC remote's ``endpointurl`` or
   ``AWS_ENDPOINT_URL``, credentials from the node's standard AWS settings). DVC's remote layout
   (``files/md5/<ab>/<cdef...>``, the ``.dir`` listing) is read directly: workers need no DVC
   repository. Every file is checked against its md5 and the listing against the version.

One download per node: the workers of a node take an exclusive ``flock`` on
``<version>.lock``; the first downloads into a private directory and renames it into place, the
others find it there. A version that cannot be obtained raises :class:`DatasetUnavailable`
naming the version, the remote and the cause, before any training starts.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from diffusion.hardware import CACHE_ENV
from diffusion.prepare import DataError, dataset_version, file_md5
from flows.s3 import safe_relative_key


class DatasetUnavailable(DataError):
    """The dataset version is neither on this node nor obtainable from the remote."""


@dataclass(frozen=True)
class Remote:
    """Where ``dvc push`` put the data: a local directory or ``s3://bucket/prefix``."""
    url: str
    endpoint_url: str | None = None      # S3-compatible endpoint (DVC's ``endpointurl``)

    def __str__(self) -> str:
        return self.url + (f" (endpoint {self.endpoint_url})" if self.endpoint_url else "")


def dvc_remote(project_dir: str | Path = ".") -> Remote | None:
    """The project's default DVC remote, read from its config alone (opening a DVC ``Repo`` would
    create ``.dvc/tmp``); a relative local URL is resolved against ``.dvc/`` as DVC does."""
    dvc_dir = Path(project_dir).absolute() / ".dvc"
    if not dvc_dir.is_dir():
        return None
    from dvc.config import Config as DvcConfig
    try:
        config = DvcConfig(dvc_dir=str(dvc_dir))
        name = config["core"].get("remote")
        if not name:
            return None
        section = config["remote"][name]
    except Exception as exc:   # noqa: BLE001 - DVC's config errors have many types
        raise DatasetUnavailable(f"{dvc_dir / 'config'}: cannot read the default DVC remote: {exc}") from None
    url = str(section["url"])
    if "://" not in url:
        url = os.path.normpath(dvc_dir / url)
    return Remote(url, section.get("endpointurl"))


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "ddpm-pipeline") / "datasets"


# --------------------------------------------------------------------------- remote reading

class _Reader:
    """Objects of a DVC remote by their md5, from a directory or S3."""

    def __init__(self, remote: Remote):
        self.remote = remote
        if remote.url.startswith("s3://"):
            from flows.s3 import RETRIES, parse_s3_uri
            import boto3
            self.bucket, prefix = parse_s3_uri(remote.url)
            self.prefix = prefix.strip("/")
            self.client = boto3.session.Session().client("s3", config=RETRIES,
                                                         endpoint_url=remote.endpoint_url)
        else:
            self.base = Path(remote.url)

    def _key(self, md5: str) -> str:
        return f"files/md5/{md5[:2]}/{md5[2:]}"

    def read(self, md5: str) -> bytes:
        if hasattr(self, "base"):
            return (self.base / self._key(md5)).read_bytes()
        key = f"{self.prefix}/{self._key(md5)}" if self.prefix else self._key(md5)
        return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def fetch(self, md5: str, target: Path) -> None:
        if hasattr(self, "base"):
            shutil.copyfile(self.base / self._key(md5), target)
        else:
            target.write_bytes(self.read(md5))


def _listing(reader: _Reader, version: str) -> list[dict]:
    md5 = version.removesuffix(".dir")
    try:
        blob = reader.read(md5 + ".dir")
    except Exception as exc:   # noqa: BLE001 - missing object, no access, unreachable endpoint
        raise DatasetUnavailable(
            f"dataset version {version} is not on the DVC remote {reader.remote}: "
            f"{_cause(exc)}; push it from the machine that prepared it (dvc push, or the "
            "Prefect flow's dvc stage)") from None
    entries = json.loads(blob)
    check = hashlib.md5(json.dumps(sorted(entries, key=lambda e: e["relpath"]),
                                   sort_keys=True).encode()).hexdigest()
    if check != md5:
        raise DatasetUnavailable(f"dataset version {version} on {reader.remote}: the listing "
                                 f"hashes to {check}.dir; the remote copy is corrupt")
    for e in entries:
        if safe_relative_key(e["relpath"], "") is None:     # the S3 source's rule for keys
            raise DatasetUnavailable(f"dataset version {version} on {reader.remote}: entry "
                                     f"{e['relpath']!r} would escape the dataset directory; refused")
    return entries


def _cause(exc: Exception) -> str:
    if isinstance(exc, FileNotFoundError):
        return f"no such object ({exc.filename})"
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code", "")
        if code in ("NoSuchKey", "404"):
            return "no such object"
        if code in ("NoSuchBucket",):
            return "the bucket does not exist"
        return f"S3 error {code}"
    return f"{type(exc).__name__}: {exc}"


def _download(reader: _Reader, version: str, target: Path, workers: int) -> int:
    entries = _listing(reader, version)
    target.mkdir(parents=True)

    def one(e: dict) -> int:
        path = target / e["relpath"]
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            reader.fetch(e["md5"], path)
        except Exception as exc:   # noqa: BLE001
            raise DatasetUnavailable(f"dataset version {version}: {e['relpath']} (md5 {e['md5']}) "
                                     f"could not be read from {reader.remote}: {_cause(exc)}") from None
        if file_md5(path) != e["md5"]:
            raise DatasetUnavailable(f"dataset version {version}: {e['relpath']} from "
                                     f"{reader.remote} does not match its md5 {e['md5']}")
        return path.stat().st_size

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return sum(pool.map(one, entries))


def remote_has(version: str, remote: Remote) -> bool:
    """Whether the remote holds the version's listing (one small request)."""
    try:
        _Reader(remote).read(version.removesuffix(".dir") + ".dir")
        return True
    except Exception:   # noqa: BLE001 - missing, no access, unreachable: not obtainable
        return False


# --------------------------------------------------------------------------- the entry point

@dataclass(frozen=True)
class Obtained:
    path: Path          # the prepared directory to train from
    how: str            # "in place" | "node cache" | "downloaded"
    seconds: float
    bytes: int = 0


def obtain(version: str, local_path: str | Path, remote: Remote | None, *,
           cache: Path | None = None, workers: int = 16) -> Obtained:
    """The prepared dataset of ``version`` on this node (see the module docstring)."""
    started = time.perf_counter()
    local = Path(local_path)
    if (local / "manifest.csv").is_file() and dataset_version(local) == version:
        return Obtained(local, "in place", time.perf_counter() - started)
    cache = cache or cache_root()
    target = cache / version
    if (target / "manifest.csv").is_file():        # complete: only a whole download is renamed in
        return Obtained(target, "node cache", time.perf_counter() - started)
    if remote is None:
        raise DatasetUnavailable(
            f"dataset version {version} is not on node {socket.gethostname()} ({local} is "
            f"{'another version' if local.exists() else 'missing'}) and the project has no DVC "
            "remote to fetch it from; add one (dvc remote add -d) and push")
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f"{version}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)           # the node's other workers wait here
        if (target / "manifest.csv").is_file():
            return Obtained(target, "node cache", time.perf_counter() - started)
        partial = cache / f".{version}.{os.getpid()}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        try:
            size = _download(_Reader(remote), version, partial, workers)
            os.rename(partial, target)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        with open(cache / "downloads.log", "a") as log:  # one line per download, for operators
            log.write(json.dumps({"version": version, "remote": remote.url, "bytes": size,
                                  "host": socket.gethostname(), "pid": os.getpid(),
                                  "seconds": round(time.perf_counter() - started, 3)}) + "\n")
    return Obtained(target, "downloaded", time.perf_counter() - started, size)
