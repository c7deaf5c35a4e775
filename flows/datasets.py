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
``<version>.lock``; the first downloads into a private directory
(``.<version>.partial-<host>-<pid>-<random>``) and renames it into place, the others find it
there. Under the lock, partials of dead processes of this host, and any partial untouched for
``STALE_PARTIAL_SECONDS`` (a killed worker of another host on a shared cache), are removed. A
download stops at the first object that cannot be read or does not match its md5 (the rest are
cancelled). A rename that fails because another host's copy landed first uses that copy.

A cache hit is checked before it is used: every file at the size recorded at download
(``<version>.files.json``, itself checked against the version), and with ``verify="md5"`` (or
``DDPM_DATASET_VERIFY=md5``) every file's md5; a damaged copy is downloaded again. A version that
cannot be obtained raises :class:`DatasetUnavailable` naming the version, the remote and the
cause, before any training starts.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from diffusion.hardware import CACHE_ENV
from diffusion.prepare import DataError, dataset_version, file_md5
from flows.s3 import safe_relative_key

VERIFY_ENV = "DDPM_DATASET_VERIFY"      # how a node-cache hit is checked: "size" (default) or "md5"
VERIFY_MODES = ("size", "md5")
STALE_PARTIAL_SECONDS = 24 * 3600       # a partial download untouched this long is abandoned


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
    check = _listing_md5(entries)
    if check != md5:
        raise DatasetUnavailable(f"dataset version {version} on {reader.remote}: the listing "
                                 f"hashes to {check}.dir; the remote copy is corrupt")
    for e in entries:
        if safe_relative_key(e["relpath"], "") is None:     # the S3 source's rule for keys
            raise DatasetUnavailable(f"dataset version {version} on {reader.remote}: entry "
                                     f"{e['relpath']!r} would escape the dataset directory; refused")
    return entries


def _listing_md5(entries: list[dict]) -> str:
    """The md5 of a ``.dir`` listing as DVC computes it: the version, without ``.dir``."""
    return hashlib.md5(json.dumps(sorted(entries, key=lambda e: e["relpath"]),
                                  sort_keys=True).encode()).hexdigest()


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


def _download(reader: _Reader, version: str, target: Path, workers: int) -> tuple[list[dict], list[int]]:
    """Every object of the version into ``target``: (the listing, each file's size). Stops at
    the first object that fails, cancelling those not started."""
    entries = _listing(reader, version)
    target.mkdir(parents=True)

    failed = threading.Event()        # a worker that picks up an object after a failure skips it

    def one(e: dict) -> int:
        if failed.is_set():
            raise _Skipped()
        try:
            return fetch_one(e)
        except BaseException:
            failed.set()
            raise

    def fetch_one(e: dict) -> int:
        path = target / e["relpath"]
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            reader.fetch(e["md5"], path)
        except Exception as exc:   # noqa: BLE001
            if isinstance(exc, OSError) and exc.filename == str(path):
                raise DatasetUnavailable(f"dataset version {version}: cannot write {path}: "
                                         f"{exc.strerror}") from None
            raise DatasetUnavailable(f"dataset version {version}: {e['relpath']} (md5 {e['md5']}) "
                                     f"could not be read from {reader.remote}: {_cause(exc)}") from None
        found = file_md5(path)
        if found != e["md5"]:
            raise DatasetUnavailable(f"dataset version {version}: {e['relpath']} from "
                                     f"{reader.remote} does not match its md5 {e['md5']} "
                                     f"(found {found})")
        return path.stat().st_size

    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        futures = [pool.submit(one, e) for e in entries]
        wait(futures, return_when=FIRST_EXCEPTION)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)   # the running ones finish, the rest never start
    for f in futures:
        if not f.cancelled() and f.exception() is not None and not isinstance(f.exception(), _Skipped):
            raise f.exception()
    return entries, [f.result() for f in futures]


class _Skipped(Exception):
    """An object not fetched because another one had already failed."""


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
           cache: Path | None = None, workers: int = 16, verify: str | None = None) -> Obtained:
    """The prepared dataset of ``version`` on this node (see the module docstring). ``verify``:
    how a node-cache hit is checked, "size" or "md5" (default: ``$DDPM_DATASET_VERIFY``, else
    "size")."""
    verify = verify or os.environ.get(VERIFY_ENV) or "size"
    if verify not in VERIFY_MODES:
        raise DatasetUnavailable(f"{VERIFY_ENV} / verify = {verify!r}: expected one of {VERIFY_MODES}")
    started = time.perf_counter()
    local = Path(local_path)
    if (local / "manifest.csv").is_file() and dataset_version(local) == version:
        return Obtained(local, "in place", time.perf_counter() - started)
    cache = cache or cache_root()
    target = cache / version
    if target.is_dir() and _damage(cache, version, verify) is None:
        return Obtained(target, "node cache", time.perf_counter() - started)
    if remote is None:
        raise DatasetUnavailable(
            f"dataset version {version} is not on node {socket.gethostname()} ({local} is "
            f"{'another version' if local.exists() else 'missing'}"
            f"{f', the copy in {target} is damaged' if target.exists() else ''}) and the project "
            "has no DVC remote to fetch it from; add one (dvc remote add -d) and push")
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with open(cache / f"{version}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)           # the node's other workers wait here
            damage = _damage(cache, version, verify) if target.is_dir() else None
            if target.is_dir() and damage is None:
                return Obtained(target, "node cache", time.perf_counter() - started)
            swept = _sweep(cache, version)
            size = _fill(cache, version, remote, workers, damage)
            if size is None:                           # another host's copy landed first
                return Obtained(target, "node cache", time.perf_counter() - started)
            with open(cache / "downloads.log", "a") as log:  # one line per download, for operators
                log.write(json.dumps({"version": version, "remote": remote.url, "bytes": size,
                                      "host": socket.gethostname(), "pid": os.getpid(),
                                      "seconds": round(time.perf_counter() - started, 3),
                                      **({"replaced": damage} if damage else {}),
                                      **({"swept": swept} if swept else {})}) + "\n")
    except OSError as exc:
        raise DatasetUnavailable(f"dataset version {version}: the node's dataset cache: "
                                 f"{exc.filename or cache}: {exc.strerror or exc}") from None
    return Obtained(target, "downloaded", time.perf_counter() - started, size)


# --------------------------------------------------------------------------- the node cache

def _fill(cache: Path, version: str, remote: Remote, workers: int, damage: str | None) -> int | None:
    """Download ``version`` into a private partial directory and rename it into place (called
    under the version's lock); the damaged copy, if any, is removed first. Returns the bytes
    downloaded, or None when the rename found another host's sound copy already there."""
    target = cache / version
    partial = cache / f".{version}.partial-{_host()}-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        if damage:                             # aside first: a crash leaves a partial, not a "hit"
            os.rename(target, partial)
            shutil.rmtree(partial)
        entries, sizes = _download(_Reader(remote), version, partial, workers)
        (cache / f"{version}.files.json").write_text(json.dumps({"listing": entries, "sizes": sizes}))
        try:
            os.rename(partial, target)
        except OSError as exc:
            if target.is_dir() and _damage(cache, version, "size") is None:   # md5-checked there
                return None
            raise DatasetUnavailable(f"dataset version {version}: cannot move the download "
                                     f"{partial} into place at {target}: {exc.strerror}") from None
        return sum(sizes)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _host() -> str:
    return re.sub(r"[^\w.-]", "_", socket.gethostname())


def _damage(cache: Path, version: str, verify: str) -> str | None:
    """What is wrong with the cached copy of ``version`` (None: nothing): a file missing or of
    another size than at download, or with ``verify == "md5"`` another md5. A copy without a
    valid size record (made before they were recorded) is hashed whole, and recorded if sound."""
    target, record = cache / version, cache / f"{version}.files.json"
    try:
        files = json.loads(record.read_text())
        listing, sizes = files["listing"], files["sizes"]
        valid = _listing_md5(listing) == version.removesuffix(".dir") and len(sizes) == len(listing)
    except (OSError, ValueError, KeyError, TypeError):
        valid = False
    if not valid:
        if dataset_version(target) != version:
            return f"its files do not hash to {version}"
        listing = [{"md5": file_md5(p), "relpath": p.relative_to(target).as_posix()}
                   for p in sorted(target.rglob("*")) if p.is_file()]
        with contextlib.suppress(OSError):     # a read-only cache is checked in full each time
            record.write_text(json.dumps({"listing": listing, "sizes": [
                (target / e["relpath"]).stat().st_size for e in listing]}))
        return None
    for e, size in zip(listing, sizes):
        path = target / e["relpath"]
        found = path.stat().st_size if path.is_file() else None
        if found != size:
            return f"{e['relpath']} is {'missing' if found is None else f'{found} bytes'}, expected {size} bytes"
        if verify == "md5" and file_md5(path) != e["md5"]:
            return f"{e['relpath']} does not match its md5 {e['md5']}"
    return None


def _sweep(cache: Path, version: str) -> list[str]:
    """Remove the partial downloads of ``version`` nobody is writing (called under its lock):
    those of dead processes of this host, and any untouched for ``STALE_PARTIAL_SECONDS``
    (pid-only names of earlier versions of this module included). Returns their names."""
    swept = []
    for path in cache.glob(f".{version}.*partial*"):
        host, _, pid = path.name.removeprefix(f".{version}.partial-").rpartition("-")[0].rpartition("-")
        try:
            newest = max(p.lstat().st_mtime for p in (path, *path.rglob("*")))
        except OSError:
            continue                               # going away under us: someone else's
        dead = host == _host() and pid.isdigit() and not _alive(int(pid))
        if dead or time.time() - newest > STALE_PARTIAL_SECONDS:
            shutil.rmtree(path, ignore_errors=True)
            swept.append(path.name)
    return swept


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:                        # another user's process
        pass
    return True
