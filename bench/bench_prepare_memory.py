"""Peak memory and throughput of the prepare stage against the dataset's size: folders of 64x64
RGB PNGs (5,000 / 60,000 / 200,000 by default) through ``python -m flows.stages prepare`` with
the local engine and the Ray engine, one fresh process per run. Peak = the process's VmHWM (its
own high-water mark, VmHWM; the Ray engine's decode tasks live in other processes and are not
counted, but the pages of Ray's shared-memory object store that the driver touches are) and the
peak of its private memory (RssAnon, sampled every 0.1 s: without the object store's pages).

    python bench/bench_prepare_memory.py [--sizes 5000 60000 200000] [--engines local ray]
        [--repo PATH]        # the code to measure (default: this checkout; another worktree
                             # gives the "before")
        [--images DIR]       # where the generated folders are kept between runs
        [--json FILE]        # append one JSON line per run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
RES = 64
LAUNCH = """
import atexit, runpy, sys, threading, time
anon = [0]
def field(name):
    return int(next(line for line in open("/proc/self/status") if line.startswith(name)).split()[1])
def sample():
    while True:
        anon[0] = max(anon[0], field("RssAnon:"))
        time.sleep(0.1)
threading.Thread(target=sample, daemon=True).start()
def report():
    print("peak_kib", field("VmHWM:"), file=sys.stderr)
    print("anon_kib", max(anon[0], field("RssAnon:")), file=sys.stderr)
atexit.register(report)
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def make_folder(root: Path, n: int) -> Path:
    """``n`` smooth-noise RGB PNGs (random 8x8 colours, upsampled) in 10 class folders, made once."""
    done = root / ".complete"
    if done.exists():
        return root
    low = np.random.default_rng(n).integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    for c in range(10):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(low[i]).resize((RES, RES), Image.BILINEAR).save(
            root / f"class{i % 10}" / f"{i:07d}.png", compress_level=1)
    done.touch()
    return root


def run(repo: Path, folder: Path, engine: str, work: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(repo), "DDPM_CACHE_DIR": str(work / "cache"),
           "GLOO_SOCKET_IFNAME": "lo"}
    args = ["flows.stages", "prepare", "--params", str(repo / "params.yaml"), "data.source=folder",
            f"data.path={folder}", f"data.resolution={RES}", "data.channels=3", f"data.engine={engine}",
            f"data.prepared_dir={work / 'prepared'}", f"data.validation_dir={work / 'validation'}",
            "model.preset=tiny"]
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", LAUNCH, *args], cwd=work, env=env, capture_output=True,
                         text=True, timeout=3600)
    seconds = time.perf_counter() - start
    if out.returncode:
        raise SystemExit(f"prepare failed:\n{out.stdout}\n{out.stderr[-3000:]}")
    peak = [line.split()[1] for line in out.stderr.splitlines() if line.startswith("peak_kib ")]
    anon = [line.split()[1] for line in out.stderr.splitlines() if line.startswith("anon_kib ")]
    summary = json.loads(out.stdout)
    n = sum(summary["counts"].values())
    return {"images": n, "seconds": round(seconds, 1), "img_per_s": round(n / seconds, 1),
            "peak_mib": round(int(peak[-1]) / 1024, 1), "anon_peak_mib": round(int(anon[-1]) / 1024, 1),
            "version": summary["dataset_version"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[5_000, 60_000, 200_000])
    p.add_argument("--engines", nargs="+", default=["local", "ray"], choices=("local", "ray"))
    p.add_argument("--repo", type=Path, default=ROOT)
    p.add_argument("--images", type=Path, default=Path(tempfile.gettempdir()) / "ddpm-bench-prepare")
    p.add_argument("--label", default="", help="a name for this code in the output (e.g. before)")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    git = subprocess.run(["git", "-C", str(args.repo), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True).stdout.strip()
    for n in args.sizes:
        folder = make_folder(args.images / f"rgb64-{n}", n)
        for engine in args.engines:
            with tempfile.TemporaryDirectory() as tmp:
                row = {"what": "prepare_memory", "label": args.label, "git": git, "engine": engine,
                       "size": n, **run(args.repo.resolve(), folder, engine, Path(tmp)),
                       "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
                       "date": time.strftime("%Y-%m-%d")}
            print(json.dumps(row), flush=True)
            if args.json:
                with args.json.open("a") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
