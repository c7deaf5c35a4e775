"""Overhead of the Ray path versus the bare library loop, same config, same machine:
fixed start-up seconds and per-step slowdown (1 Ray worker vs 1 process, and 2 workers).

    python bench/bench_ray.py [--steps 150]
    python bench/bench_ray.py --startup [--json FILE]    # seconds from ray_train() to the first step

``--startup``: a fresh process calls ``ray_train`` with the default 2 workers on the local cluster
(``ray.init`` included) and times the moment rank 0 reports its resolved hardware, just before
its first training step; then a second run in the same process (the cluster reused), and the
whole call.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusion.config import load_config  # noqa: E402
from diffusion.data import load_dataset  # noqa: E402
from diffusion.prepare import packaged_records, prepare  # noqa: E402
from diffusion.trainer import train  # noqa: E402


def step_rate(metrics_path: Path, skip_first: int = 1) -> float:
    """Median img/s over the logged intervals (the first interval holds warm-up)."""
    rows = [json.loads(x) for x in metrics_path.read_text().splitlines()][skip_first:]
    rates = sorted(r["img_per_s"] for r in rows)
    return rates[len(rates) // 2]


def startup(json_path: Path | None, stock: bool) -> None:
    from diffusion.prepare import packaged_records
    from flows import ray_local
    from flows.ray_train import init_ray, ray_train
    import importlib.util

    import ray

    from diffusion.hardware import cpu_description, cpu_flags
    # whether the environment's packages come compiled (`make env` does it; bench/RESULTS.md); where
    # Python may write bytecode, importing ray has just written this file anyway
    compiled = Path(importlib.util.cache_from_source(ray.__file__)).is_file()
    if stock:                      # the "before": Ray Train's stock start (flows/ray_local.py off)
        ray_local.local_trainer_class = lambda base: base
    t0 = time.perf_counter()
    init_ray()
    init_s = time.perf_counter() - t0
    tmp = Path(tempfile.mkdtemp())
    prepare(packaged_records("digits"), tmp / "data", resolution=8, channels=1, heldout_fraction=0.1)
    rows = []
    for attempt in ("fresh cluster", "cluster reused"):
        cfg = load_config(None, [f"data.prepared_dir={tmp / 'data'}", "data.resolution=8", "model.preset=tiny",
                                 "train.steps=2", "train.batch_size=16", f"train.out_dir={tmp / attempt}",
                                 f"ray.storage_path={tmp / 'ray'}", f"ray.run_name={attempt[:5]}"])
        first: list[float] = []
        t0 = time.perf_counter() - (init_s if attempt == "fresh cluster" else 0.0)   # the cluster's start counts
        ray_train(cfg, on_event=lambda e: first.append(time.perf_counter()) if e["kind"] == "setup" else None)
        total = time.perf_counter() - t0
        rows.append({"what": "ray_startup", "trainer": "stock" if stock else "local",
                     "attempt": attempt, "to_first_step_s": round(first[0] - t0, 2), "ray_init_s": round(init_s, 2),
                     "call_s": round(total, 2), "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
                     "bytecode_compiled": compiled, "dont_write_bytecode": sys.dont_write_bytecode,
                     "cpu": cpu_description(),
                     "flags": " ".join(sorted(f for f in cpu_flags() if f.startswith(("avx", "amx"))))})
        print(f"{attempt}: first step after {first[0] - t0:.1f} s, ray_train() returned after {total:.1f} s")
    if json_path:
        with json_path.open("a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--startup", action="store_true", help="time Ray start-up to the first step")
    p.add_argument("--json", type=Path, help="append --startup results as JSON lines")
    p.add_argument("--stock", action="store_true", help="--startup with Ray Train's stock trainer (before)")
    args = p.parse_args()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    if args.startup:
        return startup(args.json, args.stock)
    tmp = Path(tempfile.mkdtemp())
    prepare(packaged_records("mnist"), tmp / "data", resolution=28, channels=1, heldout_fraction=0.1)
    base = [f"data.prepared_dir={tmp / 'data'}", "model.preset=tiny", "model.attention_resolutions=[]",
            "model.channel_mult=[1,2]", "data.resolution=28", f"train.steps={args.steps}",
            "train.batch_size=64", "train.log_every=10", "train.checkpoint_every=50"]
    cfg = load_config(None, base + [f"train.out_dir={tmp / 'bare'}"])
    t = time.perf_counter()
    train(cfg, load_dataset(cfg.data), progress=False)
    bare_total = time.perf_counter() - t
    bare_rate = step_rate(tmp / "bare" / "metrics.jsonl")
    from flows.ray_train import ray_train
    rows = [("bare library loop", 1, bare_total, bare_rate)]
    for workers in (1, 2):                       # both use the machine's 2 CPUs
        cfg = load_config(None, base + [f"train.out_dir={tmp / f'ray{workers}'}", f"ray.num_workers={workers}",
                                        f"ray.cpus_per_worker={2 // workers}",
                                        f"ray.storage_path={tmp / 'ray'}", f"ray.run_name=w{workers}"])
        t = time.perf_counter()
        ray_train(cfg)
        rows.append((f"Ray Train, {workers} worker(s)", workers, time.perf_counter() - t,
                     step_rate(tmp / f"ray{workers}" / "metrics.jsonl")))
    print(f"{args.steps} steps of batch 64 (per worker), tiny U-Net at 28x28, {os.cpu_count()} cores")
    print("| path | workers | wall s | median img/s (all workers) | fixed overhead s | per-step slowdown |")
    print("|---|---|---|---|---|---|")
    for name, w, total, rate in rows:
        train_s = args.steps * 64 * w / rate      # rate counts the images of every worker
        print(f"| {name} | {w} | {total:.1f} | {rate:.0f} | {total - train_s:.1f} | "
              f"{(bare_rate / rate - 1) * 100:+.1f} % |")


if __name__ == "__main__":
    main()
