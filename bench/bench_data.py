"""Training data larger than memory (issue 16): what reading shards on demand costs and saves.

    python bench/bench_data.py rss      # peak RSS of training vs dataset size, on-demand vs in-RAM
    python bench/bench_data.py speed    # img/s of the default config, on-demand vs in-RAM, paired
    python bench/bench_data.py noise    # per-step cost of the per-sample randomness vs alternatives

``rss`` prepares synthetic 64x64 RGB datasets of 5k, 50k and 200k images (smooth seeded noise,
ten classes, through ``diffusion.prepare.prepare`` from pixel records) and trains the tiny preset
for a few steps in a fresh process per case, reporting that process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffusion import counter_rng  # noqa: E402
from diffusion.config import load_config  # noqa: E402
from diffusion.data import load_prepared  # noqa: E402
from diffusion.prepare import Record, packaged_records, prepare  # noqa: E402
from diffusion.trainer import train  # noqa: E402

CHILD = """
import json, sys
sys.path.insert(0, {root!r})
from diffusion.config import load_config
from diffusion.data import load_prepared
from diffusion.trainer import train
cfg = load_config(None, {overrides!r})
data = load_prepared(cfg.data.prepared_dir, "train", in_memory={in_memory!r})
train(cfg, data, progress=False)
# VmHWM, not ru_maxrss: after fork + exec ru_maxrss still counts the parent's resident set
hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({{"peak_mib": int(hwm.split()[1]) / 1024}}))
"""


def machine() -> str:
    flags = ""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags"))
    except (OSError, StopIteration):
        pass
    simd = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in flags]
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
            f"{'/'.join(simd) or 'no AVX2'}, torch {torch.__version__}")


def synthetic_rgb(n: int, resolution: int = 64, seed: int = 0):
    rng = np.random.default_rng(seed)
    for i in range(n):
        low = torch.from_numpy(rng.integers(0, 256, (1, 3, 8, 8), dtype=np.uint8)).float()
        img = torch.nn.functional.interpolate(low, size=resolution, mode="bilinear", align_corners=False)
        yield Record(f"class{i % 10}/{i:07d}", img[0].permute(1, 2, 0).round().byte().numpy(),
                     f"class{i % 10}")


def bench_rss(args) -> list[dict]:
    rows = []
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-data-"))
    for n in args.sizes:
        prepared = work / f"rgb{n}"
        if not (prepared / "manifest.csv").is_file():
            t = time.perf_counter()
            prepare(synthetic_rgb(n), prepared, resolution=64, channels=3, heldout_fraction=0.01)
            print(f"prepared {n} images in {time.perf_counter() - t:.0f} s", flush=True)
        size_mb = sum(p.stat().st_size for p in prepared.glob("train-*.npy")) / 2**20
        for in_memory in (False, True):
            shutil.rmtree(work / "runs", ignore_errors=True)     # a fresh run, never a resume
            overrides = [f"data.prepared_dir={prepared}", "data.resolution=64", "data.channels=3",
                         "model.preset=tiny", "train.steps=20", "train.batch_size=16",
                         "train.budget_minutes=0", "train.precision=fp32",
                         f"train.out_dir={work / 'runs' / f'{n}-{in_memory}'}", "train.checkpoint_every=1000000"]
            out = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT), overrides=overrides,
                                                                     in_memory=in_memory)],
                                 capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(out.stderr[-3000:])
            peak = json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]
            rows.append({"part": "rss", "images": n, "train_mib": round(size_mb), "in_memory": in_memory,
                         "peak_rss_mib": round(peak)})
            print(rows[-1], flush=True)
    return rows


def bench_speed(args) -> list[dict]:
    """The default config's single-process training loop, on-demand reader vs in-RAM tensor,
    alternating runs (so machine drift hits both alike); median logged img/s per run."""
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-data-"))
    prepared = work / "mnist"
    if not (prepared / "manifest.csv").is_file():
        prepare(packaged_records("mnist"), prepared, resolution=28, channels=1, heldout_fraction=0.1)
    rates: dict[str, list[float]] = {"reader": [], "in_memory": []}
    for r in range(args.rounds):
        for mode in (("reader", "in_memory") if r % 2 == 0 else ("in_memory", "reader")):
            shutil.rmtree(work / "runs", ignore_errors=True)     # a fresh run, never a resume
            cfg = load_config(ROOT / "params.yaml", [
                f"data.prepared_dir={prepared}", f"train.steps={args.steps}", "train.budget_minutes=0",
                "train.log_every=10", "train.checkpoint_every=1000000",
                f"train.out_dir={work / 'runs' / f'{mode}-{r}'}"])
            data = load_prepared(prepared, "train", in_memory=mode == "in_memory")
            result = train(cfg, data, progress=False)
            per_run = sorted(h["img_per_s"] for h in result.history[1:])
            rates[mode].append(per_run[len(per_run) // 2])
            print(mode, round(rates[mode][-1], 1), flush=True)
    med = {m: statistics.median(v) for m, v in rates.items()}
    return [{"part": "speed", "config": "params.yaml defaults (mnist_fast, batch 32, 1 process)",
             "reader_img_per_s": round(med["reader"], 1), "in_memory_img_per_s": round(med["in_memory"], 1),
             "ratio": round(med["reader"] / med["in_memory"], 3), "runs_each": args.rounds,
             "steps_per_run": args.steps, "threads": torch.get_num_threads()}]


def bench_noise(args) -> list[dict]:
    """Per rank and step: today's draw (the whole global batch from one seeded generator, for 2
    ranks), the counter hash for the rank's own samples, and one seeded generator per sample."""
    rows = []
    for shape, b in (((1, 28, 28), 32), ((3, 32, 32), 64), ((3, 64, 64), 32)):
        positions = torch.arange(b)

        def global_draw():
            g = torch.Generator().manual_seed(5)
            torch.randint(0, 1000, (2 * b,), generator=g)
            torch.randn((2 * b, *shape), generator=g)
            torch.rand(2 * b, generator=g)

        def counter_hash():
            counter_rng.randint(0, 5, counter_rng.STREAM_TIMESTEP, positions, 1000)
            counter_rng.normal(0, 5, counter_rng.STREAM_NOISE, positions, shape)
            counter_rng.uniform(0, 5, counter_rng.STREAM_DROPOUT, positions)

        def per_sample_generators():
            for i in range(b):
                g = torch.Generator().manual_seed(counter_rng.stream_key(0, 5, i) >> 1)
                torch.randint(0, 1000, (1,), generator=g)
                torch.randn(shape, generator=g)
                torch.rand(1, generator=g)

        times = {}
        for name, fn in (("global_draw_2_ranks", global_draw), ("counter_hash", counter_hash),
                         ("per_sample_generators", per_sample_generators)):
            for _ in range(5):
                fn()
            samples = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                fn()
                samples.append(time.perf_counter() - t)
            times[name] = statistics.median(samples) * 1000
        rows.append({"part": "noise", "shape": list(shape), "local_batch": b,
                     **{f"{k}_ms": round(v, 3) for k, v in times.items()}})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=("rss", "speed", "noise"))
    p.add_argument("--sizes", type=int, nargs="+", default=[5_000, 50_000, 200_000])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--work", help="keep prepared datasets here (default: a new temporary folder)")
    p.add_argument("--json", type=Path, help="append rows as JSON lines")
    args = p.parse_args()
    rows = {"rss": bench_rss, "speed": bench_speed, "noise": bench_noise}[args.part](args)
    print(f"machine: {machine()}")
    if args.json:
        with args.json.open("a") as f:
            for r in rows:
                f.write(json.dumps({**r, "machine": machine(), "date": time.strftime("%Y-%m-%d")}) + "\n")


if __name__ == "__main__":
    main()
