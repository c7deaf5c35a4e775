"""Prepare throughput: a folder of 10,000 small PNGs, and an S3 prefix of 2,000 objects on moto's
standalone server (real HTTP, real boto3). Reports images/s and the worker count.

    python bench/bench_prepare.py [--folder-images 10000] [--s3-objects 2000] [--workers 16]
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusion.prepare import folder_records, prepare  # noqa: E402


def make_pngs(root: Path, n: int) -> None:
    """n random 28x28 grey PNGs in 10 class folders (MNIST-sized)."""
    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / str(i % 10)
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(d / f"{i:06d}.png")


def timed(label: str, fn) -> float:
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    n = sum(result.counts.values())
    print(f"{label}: {n} images in {seconds:.2f} s = {n / seconds:,.0f} images/s")
    return n / seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--folder-images", type=int, default=10_000)
    p.add_argument("--s3-objects", type=int, default=2_000)
    p.add_argument("--workers", type=int, default=16, help="concurrent S3 downloads")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "pngs"
        make_pngs(root, args.folder_images)
        timed(f"folder, {os.cpu_count()} cores, 1 process",
              lambda: prepare(folder_records(root), Path(tmp) / "out-folder", resolution=28,
                              channels=1, heldout_fraction=0.1))

        import boto3
        from moto.server import ThreadedMotoServer

        from flows.s3 import s3_records
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                          AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
        try:
            s3 = boto3.client("s3")
            s3.create_bucket(Bucket="bench")
            files = sorted(root.rglob("*.png"))[: args.s3_objects]
            for f in files:
                s3.put_object(Bucket="bench", Key=f"set/{f.relative_to(root).as_posix()}",
                              Body=f.read_bytes())
            timed(f"s3 (moto on loopback), {args.workers} download threads",
                  lambda: prepare(s3_records("s3://bench/set", workers=args.workers),
                                  Path(tmp) / "out-s3", resolution=28, channels=1,
                                  heldout_fraction=0.1))
        finally:
            server.stop()


if __name__ == "__main__":
    main()
