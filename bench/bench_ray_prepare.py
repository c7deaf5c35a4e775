"""Prepare throughput of the Ray Data engine (data.engine: ray) with 1 and 2 decode tasks at a time
against the local engine, on a folder of colour JPEGs resized to 64x64 RGB. The Ray cluster's
start is timed separately (once per process); every engine's output is checked byte-identical.

    python bench/bench_ray_prepare.py [--images 4000] [--size 128]
"""

from __future__ import annotations

import argparse
import dataclasses
import filecmp
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusion.config import DataConfig  # noqa: E402
from diffusion.prepare import prepare_from_config  # noqa: E402


def make_jpegs(root: Path, n: int, size: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / f"class{i % 10}"
        d.mkdir(parents=True, exist_ok=True)
        low = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(low).resize((size, size), Image.BILINEAR).save(d / f"{i:06d}.jpg", quality=90)


def same_tree(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    match, mismatch, errors = filecmp.cmpfiles(a, b, names, shallow=False)
    return not mismatch and not errors and names == sorted(p.name for p in b.iterdir())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--images", type=int, default=4000)
    p.add_argument("--size", type=int, default=128, help="side of the source JPEGs")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    os.environ.pop("RAY_ADDRESS", None)
    tmp = Path(tempfile.mkdtemp(prefix="bench-ray-prepare-"))
    make_jpegs(tmp / "src", args.images, args.size)
    base = DataConfig(source="folder", path=str(tmp / "src"), resolution=64, channels=3,
                      prepared_dir=str(tmp / "local"))
    rows = []
    t = time.perf_counter()
    prepare_from_config(base)
    rows.append({"engine": "local", "workers": 1, "seconds": time.perf_counter() - t})

    from flows.ray_prepare import ray_prepare
    from flows.ray_train import init_ray
    t = time.perf_counter()
    init_ray()
    start = time.perf_counter() - t
    for workers in (1, 2):
        cfg = dataclasses.replace(base, engine="ray", ray_workers=workers, prepared_dir=str(tmp / f"ray{workers}"))
        t = time.perf_counter()
        ray_prepare(cfg)
        rows.append({"engine": "ray", "workers": workers, "seconds": time.perf_counter() - t,
                     "identical_to_local": same_tree(tmp / "local", tmp / f"ray{workers}")})
    print(f"Ray local cluster start: {start:.1f} s (once per process, not in the rows below)")
    for r in rows:
        r["images_per_s"] = round(args.images / r["seconds"], 1)
        r["seconds"] = round(r["seconds"], 2)
        print(r)
    print(f"machine: {os.cpu_count()} CPUs; {args.images} JPEGs {args.size}x{args.size} -> 64x64 RGB")
    if args.json:
        with args.json.open("a") as f:
            for r in rows:
                f.write(json.dumps({**r, "images": args.images, "source_size": args.size,
                                    "ray_start_s": round(start, 1), "cpus": os.cpu_count(),
                                    "date": time.strftime("%Y-%m-%d")}) + "\n")


if __name__ == "__main__":
    main()
