"""flows.datasets' node cache with a real DVC-layout remote on disk: a damaged hit is downloaded
again (sizes always, md5 when asked); partials carry host, pid and a random suffix, stale ones
are swept under the lock and live ones kept; a rename that loses a race uses the copy that
landed first; the first bad object stops the download and nothing partial is left."""

import json
import multiprocessing
import os
import re
import shutil
import socket
import subprocess
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from flows import datasets
from flows.datasets import DatasetUnavailable, Remote, obtain
from diffusion.prepare import dataset_version, file_md5


@pytest.fixture
def pushed(tmp_path):
    """A dataset directory of 30 files and its DVC remote layout (``files/md5/<ab>/<cd...>``
    and the ``.dir`` listing), as ``dvc push`` writes them."""
    source = tmp_path / "source"
    rng = np.random.default_rng(0)
    for i in range(30):
        path = source / ("manifest.csv" if i == 0 else f"sub/part-{i:02d}.bin")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.integers(0, 256, int(rng.integers(1, 5000)), dtype=np.uint8).tobytes())
    remote = tmp_path / "remote"
    entries = sorted(({"md5": file_md5(p), "relpath": p.relative_to(source).as_posix()}
                      for p in source.rglob("*") if p.is_file()), key=lambda e: e["relpath"])
    for e in entries:
        obj = remote / "files" / "md5" / e["md5"][:2] / e["md5"][2:]
        obj.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / e["relpath"], obj)
    version = dataset_version(source)
    listing = remote / "files" / "md5" / version[:2] / version[2:]
    listing.parent.mkdir(parents=True, exist_ok=True)
    listing.write_text(json.dumps(entries, sort_keys=True))
    return {"source": source, "remote": Remote(str(remote)), "version": version, "entries": entries,
            "cache": tmp_path / "cache", "absent": tmp_path / "absent"}


def get(pushed, **kw):
    return obtain(pushed["version"], pushed["absent"], pushed["remote"], cache=pushed["cache"], **kw)


def same_files(a: Path, b: Path) -> bool:
    return sorted(p.relative_to(a) for p in a.rglob("*")) == sorted(p.relative_to(b) for p in b.rglob("*")) \
        and all(p.read_bytes() == (b / p.relative_to(a)).read_bytes() for p in a.rglob("*") if p.is_file())


def log_lines(pushed) -> list[dict]:
    return [json.loads(line) for line in (pushed["cache"] / "downloads.log").read_text().splitlines()]


def test_a_damaged_cache_hit_is_downloaded_again(pushed, monkeypatch):
    version, cache = pushed["version"], pushed["cache"]
    copy = cache / version
    assert get(pushed).how == "downloaded" and get(pushed).how == "node cache"
    assert same_files(copy, pushed["source"])

    part = copy / "sub" / "part-03.bin"
    size = part.stat().st_size
    os.truncate(part, size - 1)
    assert get(pushed).how == "downloaded" and same_files(copy, pushed["source"])
    assert log_lines(pushed)[-1]["replaced"] == f"sub/part-03.bin is {size - 1} bytes, expected {size} bytes"
    part.unlink()
    assert get(pushed).how == "downloaded" and same_files(copy, pushed["source"])
    assert log_lines(pushed)[-1]["replaced"] == f"sub/part-03.bin is missing, expected {size} bytes"

    good = part.read_bytes()
    part.write_bytes(bytes([good[0] ^ 1]) + good[1:])       # same size, other content
    assert get(pushed).how == "node cache"                   # sizes only, by default
    monkeypatch.setenv("DDPM_DATASET_VERIFY", "md5")
    assert get(pushed).how == "downloaded" and part.read_bytes() == good
    assert log_lines(pushed)[-1]["replaced"] == f"sub/part-03.bin does not match its md5 {file_md5(part)}"
    assert get(pushed).how == "node cache"
    with pytest.raises(DatasetUnavailable, match=r"DDPM_DATASET_VERIFY / verify = 'sha1': expected one of"):
        get(pushed, verify="sha1")

    (cache / f"{version}.files.json").unlink()               # a copy made before sizes were recorded
    assert get(pushed, verify="size").how == "node cache"    # hashed whole, then recorded
    assert (cache / f"{version}.files.json").is_file()
    (cache / f"{version}.files.json").write_text("{}")
    os.truncate(part, 10)
    assert get(pushed, verify="size").how == "downloaded" and same_files(copy, pushed["source"])

    part.write_bytes(b"")
    with pytest.raises(DatasetUnavailable, match=re.escape(f"the copy in {copy} is damaged) and the "
                                                           "project has no DVC remote")):
        obtain(version, pushed["absent"], None, cache=cache)
    assert len(log_lines(pushed)) == 5


def _obtain_how(pushed) -> str:
    return get(pushed).how


def test_concurrent_workers_of_a_node_download_once(pushed, monkeypatch, tmp_path):
    """Four processes at once on one cache: one downloads every object once, the others wait on
    the lock and find its copy; nothing partial is left."""
    real, fetched = datasets._Reader.fetch, tmp_path / "fetched"

    def counted(self, md5, target):                  # observes, across processes; the real fetch works
        with open(fetched, "a") as f:
            f.write(md5 + "\n")
        return real(self, md5, target)

    monkeypatch.setattr(datasets._Reader, "fetch", counted)
    with ProcessPoolExecutor(4, mp_context=multiprocessing.get_context("fork")) as pool:
        hows = list(pool.map(_obtain_how, [pushed] * 4))
    assert sorted(hows) == ["downloaded"] + ["node cache"] * 3
    assert sorted(fetched.read_text().split()) == sorted(e["md5"] for e in pushed["entries"])
    assert len(log_lines(pushed)) == 1 and same_files(pushed["cache"] / pushed["version"], pushed["source"])
    assert sorted(p.name for p in pushed["cache"].iterdir()) == sorted(
        [pushed["version"], f"{pushed['version']}.lock", f"{pushed['version']}.files.json", "downloads.log"])


def test_stale_partials_are_swept_under_the_lock_and_live_ones_kept(pushed):
    version, cache = pushed["version"], pushed["cache"]
    host = socket.gethostname()
    assert re.fullmatch(r"[\w.-]+", host)
    finished = subprocess.Popen(["true"])
    finished.wait()
    dead = finished.pid
    day_ago = time.time() - 25 * 3600
    partials = {                                     # name -> swept?
        f".{version}.partial-{host}-{dead}-0a0a0a0a": True,         # a killed worker of this host
        f".{version}.partial-{host}-{os.getpid()}-0b0b0b0b": False,  # a live one
        f".{version}.partial-other-host-{dead}-0c0c0c0c": False,    # another host's, recent
        f".{version}.partial-other-host-{dead}-0d0d0d0d": True,     # another host's, a day old
        f".{version}.{dead}.partial": True,                         # pid-only name, a day old
        f".0123456789abcdef0123456789abcdef.dir.partial-{host}-{dead}-0e0e0e0e": False,  # other version
    }
    for name in partials:
        (cache / name / "sub").mkdir(parents=True)
        (cache / name / "sub" / "x.bin").write_bytes(b"x")
        if "0d0d" in name or name.endswith(f".{dead}.partial"):
            for p in (cache / name / "sub" / "x.bin", cache / name / "sub", cache / name):
                os.utime(p, (day_ago, day_ago))
    assert get(pushed).how == "downloaded"
    swept = sorted(n for n, gone in partials.items() if gone)
    assert sorted(log_lines(pushed)[-1]["swept"]) == swept
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        [version, f"{version}.lock", f"{version}.files.json", "downloads.log",
         *(n for n, gone in partials.items() if not gone)])


def test_a_rename_that_loses_a_race_uses_the_copy_that_landed(pushed, monkeypatch):
    """Another host on a shared cache renames its copy in while this one downloads (the race
    is injected: the real download, then the other host's copy lands)."""
    version, cache = pushed["version"], pushed["cache"]
    real, partials, landing = datasets._download, [], {}

    def download_then_another_copy_lands(reader, version, partial, workers):
        partials.append(partial)
        got = real(reader, version, partial, workers)
        shutil.copytree(landing["copy"], cache / version)
        return got

    monkeypatch.setattr(datasets, "_download", download_then_another_copy_lands)
    landing["copy"] = pushed["source"]
    got = get(pushed)
    assert got.how == "node cache" and same_files(got.path, pushed["source"])
    assert sorted(p.name for p in cache.iterdir()) == sorted([version, f"{version}.lock",
                                                              f"{version}.files.json"])

    shutil.rmtree(cache / version)
    damaged = pushed["source"].parent / "damaged"
    shutil.copytree(pushed["source"], damaged)
    os.truncate(damaged / "manifest.csv", 0)
    landing["copy"] = damaged
    with pytest.raises(DatasetUnavailable) as refused:
        get(pushed)
    assert re.fullmatch(re.escape(f"dataset version {version}: cannot move the download {partials[-1]} "
                                  f"into place at {cache / version}: ") + "(Directory not empty|File exists)",
                        str(refused.value))
    assert not partials[-1].exists()
    pattern = re.escape(f".{version}.partial-{socket.gethostname()}-{os.getpid()}-") + "[0-9a-f]{8}"
    assert all(re.fullmatch(pattern, p.name) for p in partials) and partials[0] != partials[1]


@pytest.mark.parametrize("fault", ["corrupt", "missing"])
def test_the_first_bad_object_stops_the_download(pushed, monkeypatch, fault):
    version, cache, first = pushed["version"], pushed["cache"], pushed["entries"][0]
    obj = Path(pushed["remote"].url) / "files" / "md5" / first["md5"][:2] / first["md5"][2:]
    if fault == "corrupt":
        obj.write_bytes(obj.read_bytes() + b"!")
    else:
        obj.unlink()
    real, fetched = datasets._Reader.fetch, []

    def counted(self, md5, target):                  # observes; the real fetch does the work
        fetched.append(md5)
        return real(self, md5, target)

    monkeypatch.setattr(datasets._Reader, "fetch", counted)
    cause = (f"does not match its md5 {first['md5']} \\(found [0-9a-f]{{32}}\\)" if fault == "corrupt"
             else "could not be read from .*: no such object")
    with pytest.raises(DatasetUnavailable, match=re.escape(f"dataset version {version}: {first['relpath']}")
                       + ".*" + cause):
        get(pushed, workers=2)
    # the failing object and at most what the other worker had in hand; the rest never fetched
    assert len(fetched) <= 4 < len(pushed["entries"])
    assert sorted(p.name for p in cache.iterdir()) == [f"{version}.lock"]   # no partial left
