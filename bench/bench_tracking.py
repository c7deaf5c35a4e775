"""MLflow logging cost per training step (issue 6 target: <= 2 % of step time).

Measures, against the embedded SQLite store and against a local `mlflow server`:
  - the trainer's metric callback with the default batching (tracking.flush_every = 50), called
    once per step with the trainer's 6 metrics (worst case: train.log_every = 1);
  - the same without batching (one log_batch call per step), for comparison;
  - one per-checkpoint sample grid (16 images, DDIM-20) of the default 1.6 M model;
and the median training step of the default config (mnist_small, batch 64) on this machine.

    python bench/bench_tracking.py [--steps 300]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from diffusion.config import load_config  # noqa: E402
from diffusion.data import ImageSet  # noqa: E402
from diffusion.trainer import train  # noqa: E402
from flows.tracking import MetricBuffer, TrainingTracker, client_for, start_training_run  # noqa: E402

METRICS = {"loss": 0.1, "lr": 1e-3, "grad_norm": 0.5, "img_per_s": 70.0}   # the trainer's keys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def time_logging(uri: str, cfg, steps: int, flush_every: int) -> float:
    _, run_id = start_training_run(cfg, run_name=f"bench-{flush_every}", snapshot_files=())
    buf = MetricBuffer(client_for(uri), run_id, flush_every)
    t = time.perf_counter()
    for step in range(1, steps + 1):
        buf.log(step, {k: v + step for k, v in METRICS.items()})
    buf.flush()
    return (time.perf_counter() - t) / steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-tracking-"))
    rows = []
    # the default config's step time, bare library loop (random data of the right shape)
    cfg = load_config(Path(__file__).resolve().parents[1] / "params.yaml",
                      ["train.batch_size=64", "train.steps=30", "train.log_every=1", "train.checkpoint_every=1000",
                       f"train.out_dir={tmp / 'run'}"])
    data = ImageSet(torch.randint(0, 256, (512, 1, 28, 28), dtype=torch.uint8), torch.arange(512) % 10, 10)
    hist = train(cfg, data, progress=False).history[5:]
    step_s = 64 / sorted(h["img_per_s"] for h in hist)[len(hist) // 2]
    rows.append({"what": "median training step, mnist_small batch 64 (bare)", "seconds": step_s})

    server = None
    backends = {"sqlite": f"sqlite:///{tmp / 'mlflow.db'}"}
    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
                               "--port", str(port), "--workers", "1",
                               "--backend-store-uri", f"sqlite:///{tmp / 'server.db'}",
                               "--artifacts-destination", str(tmp / "server-artifacts")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    backends["server"] = f"http://127.0.0.1:{port}"
    import urllib.request
    for _ in range(120):
        try:
            urllib.request.urlopen(f"{backends['server']}/health", timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    try:
        for name, uri in backends.items():
            bcfg = load_config(None, [f"tracking.tracking_uri={uri}", "tracking.experiment=bench"])
            for flush in (50, 1):
                per = time_logging(uri, bcfg, args.steps, flush)
                rows.append({"what": f"{name}: metric callback per step, flush_every={flush}",
                             "seconds": per, "percent_of_step": 100 * per / step_s})
        # one checkpoint grid of the default model (16 images, DDIM-20)
        gcfg = load_config(Path(__file__).resolve().parents[1] / "params.yaml",
                           ["train.steps=1", f"train.out_dir={tmp / 'g'}", f"tracking.tracking_uri={backends['sqlite']}",
                            "tracking.experiment=bench"])
        r = train(gcfg, data, progress=False)
        _, run_id = start_training_run(gcfg, run_name="grid", snapshot_files=())
        tracker = TrainingTracker(gcfg, backends["sqlite"], run_id)
        tracker.on_checkpoint(1, r.checkpoint)
        rows.append({"what": "sample grid per checkpoint (16 images, DDIM-20, logged)",
                     "seconds": tracker.grid_seconds,
                     "percent_of_step": 100 * tracker.grid_seconds / (step_s * gcfg.train.checkpoint_every)})
    finally:
        server.terminate()
    meta = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    for row in rows:
        print(json.dumps({**row, **meta}))


if __name__ == "__main__":
    main()
