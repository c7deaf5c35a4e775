"""Seconds to make a prepared dataset available on a fresh node (issue 15): a worker's
``flows.datasets.obtain`` with an empty node cache (download from the DVC remote, every file
md5-checked, renamed into the cache), then again (cache hit), and in place (the configured path
exists on the node: its version is hashed and compared). Datasets of 5,000 images (the packaged
MNIST digits) and 50,000 (ten shifted copies of them), pushed with real ``dvc push`` to a local
remote and to moto's S3 server over HTTP on this machine.

    python bench/bench_dataset_fetch.py                     # 5,000 and 50,000 images
    python bench/bench_dataset_fetch.py --sizes 5000 --out /tmp/fetch.jsonl
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffusion.hardware import cpu_description  # noqa: E402
from diffusion.prepare import Record, dataset_version, packaged_records, prepare  # noqa: E402
from flows.datasets import Remote, obtain  # noqa: E402


def records(n: int):
    """``n`` images: the 5,000 MNIST digits, then copies shifted by one pixel per copy."""
    base = list(packaged_records("mnist"))
    for i in range(n):
        rec = base[i % len(base)]
        copy = i // len(base)
        pixels = np.roll(rec.payload, copy, axis=1) if copy else rec.payload
        yield Record(f"{rec.key}-{copy}", pixels, rec.label)


def dvc(*args: str, cwd: Path, env: dict) -> float:
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=env, capture_output=True,
                         text=True)
    if out.returncode:
        raise SystemExit(f"dvc {' '.join(args)} failed: {out.stderr}")
    return time.perf_counter() - started


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 50000])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results_fetch_cpu.jsonl")
    args = parser.parse_args()

    import boto3
    from moto.server import ThreadedMotoServer
    port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    endpoint = f"http://127.0.0.1:{port}"
    creds = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-secret",
             "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    os.environ.update(creds)
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench-dvc")
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    machine = {"cpu": cpu_description(), "cores": os.cpu_count(), "torch": torch.__version__,
               "python": platform.python_version(), "date": datetime.date.today().isoformat()}
    rows = []
    try:
        for n in args.sizes:
            work = Path(tempfile.mkdtemp(prefix=f"fetch-{n}-"))
            started = time.perf_counter()
            result = prepare(records(n), work / "data" / "prepared", resolution=28, channels=1,
                             heldout_fraction=0.1, source="mnist")
            prepare_s = time.perf_counter() - started
            version = dataset_version(work / "data" / "prepared")
            size = sum(p.stat().st_size for p in (work / "data" / "prepared").rglob("*") if p.is_file())
            dvc("init", "--no-scm", "-q", cwd=work, env=env)
            dvc("add", "-q", "data/prepared", cwd=work, env=env)
            remotes = {"local": Remote(str(work / "remote")),
                       "s3 (moto over HTTP)": Remote(f"s3://bench-dvc/{n}", endpoint)}
            dvc("remote", "add", "local", str(work / "remote"), cwd=work, env=env)
            dvc("remote", "add", "s3", f"s3://bench-dvc/{n}", cwd=work, env=env)
            dvc("remote", "modify", "s3", "endpointurl", endpoint, cwd=work, env=env)
            for (name, remote), dvc_name in zip(remotes.items(), ("local", "s3")):
                push_s = dvc("push", "-q", "-r", dvc_name, cwd=work, env=env)
                cache = work / f"cache-{dvc_name}"
                miss = obtain(version, work / "absent", remote, cache=cache)
                hit = obtain(version, work / "absent", remote, cache=cache)
                in_place = obtain(version, work / "data" / "prepared", remote, cache=cache)
                assert (miss.how, hit.how, in_place.how) == ("downloaded", "node cache", "in place")
                row = {"images": result.counts["train"] + result.counts["heldout"], "bytes": size,
                       "remote": name, "prepare_s": round(prepare_s, 2), "dvc_push_s": round(push_s, 2),
                       "miss_s": round(miss.seconds, 3), "hit_s": round(hit.seconds, 4),
                       "in_place_s": round(in_place.seconds, 3),
                       "miss_mb_per_s": round(size / 1e6 / miss.seconds, 1), **machine}
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        moto.stop()
    with args.out.open("a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print(f"\n| images | size | remote | cache miss | cache hit | in place (hash) | dvc push |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['images']:,} | {r['bytes'] / 1e6:.1f} MB | {r['remote']} | {r['miss_s']:.2f} s "
              f"({r['miss_mb_per_s']} MB/s) | {r['hit_s'] * 1000:.1f} ms | {r['in_place_s']:.2f} s | "
              f"{r['dvc_push_s']:.1f} s |")


if __name__ == "__main__":
    main()
