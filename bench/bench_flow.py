"""Orchestration overhead of the Prefect flow (issue 7 target: <= 15 s fixed + <= 5 % of training).

The same tiny configuration two ways, each in a fresh working directory and a fresh process:
  direct : the stage functions called one after another (what `dvc repro` runs, minus DVC);
  flow   : `python -m flows.pipeline --force --no-push` (Prefect ephemeral server, tasks,
           cache bookkeeping, artifacts);
  server : the same flow against an already running `prefect server start` (PREFECT_API_URL),
           as a deployment's runs are.
Both train in-process (ray.enabled=false) so the difference is Prefect's; the Ray overhead has its
own benchmark (bench_ray.py). Steps are varied to separate the fixed part from a per-step part.

    python bench/bench_flow.py [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASE = ["data.source=digits", "data.resolution=8", "model.preset=tiny", "train.batch_size=32",
        "train.log_every=50", "extractor.epochs=10", "extractor.min_accuracy=0.8",
        "evaluate.fid_samples=200", "evaluate.fid_seeds=2", "evaluate.steps=10",
        "evaluate.kid_subset_size=100", "ray.enabled=false", "tracking.grid_images=0",
        "tracking.system_metrics_every=0"]

DIRECT = """
import sys, time
from diffusion.config import load_config
from flows import stages
cfg = load_config("params.yaml", sys.argv[1:])
t = time.perf_counter()
stages.prepare_stage(cfg); stages.validate_stage(cfg); stages.extractor_stage(cfg, progress=False)
t_train = time.perf_counter()
stages.train_stage(cfg, progress=False)
train_s = time.perf_counter() - t_train
stages.evaluate_stage(cfg, progress=False); stages.register_stage(cfg)
print("RESULT", time.perf_counter() - t, train_s)
"""


def workdir() -> Path:
    d = Path(tempfile.mkdtemp(prefix="bench-flow-"))
    shutil.copy(REPO / "params.yaml", d / "params.yaml")
    return d


def run(args: list[str], cwd: Path, api: str | None = None) -> float:
    env = {**os.environ, "PREFECT_HOME": str(cwd / ".prefect"), "PYTHONPATH": str(REPO),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    if api:
        env["PREFECT_API_URL"] = api
    t = time.perf_counter()
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stdout[-3000:] + out.stderr[-3000:])
    return time.perf_counter() - t, out.stdout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    meta = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d")}
    import socket
    import urllib.request
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    home = Path(tempfile.mkdtemp(prefix="bench-prefect-"))
    server = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "server", "start",
                               "--host", "127.0.0.1", "--port", str(port)],
                              env={**os.environ, "PREFECT_HOME": str(home),
                                   "PREFECT_SERVER_ANALYTICS_ENABLED": "false"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    api = f"http://127.0.0.1:{port}/api"
    for _ in range(240):
        try:
            urllib.request.urlopen(f"{api}/health", timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    try:
        _bench(args, meta, api)
    finally:
        server.terminate()


def _bench(args, meta, api) -> None:
    for steps in (50, 400):
        cfg = BASE + [f"train.steps={steps}", f"train.checkpoint_every={steps}"]
        for _ in range(args.repeats):
            d = workdir()
            direct_wall, out = run([sys.executable, "-c", DIRECT, *cfg], d)
            train_s = float(out.split("RESULT")[1].split()[1])
            d = workdir()
            flow_wall, _ = run([sys.executable, "-m", "flows.pipeline", "--force", "--no-push", *cfg], d)
            d = workdir()
            server_wall, _ = run([sys.executable, "-m", "flows.pipeline", "--force", "--no-push", *cfg], d, api)
            print(json.dumps({"steps": steps, "direct_s": round(direct_wall, 2), "flow_s": round(flow_wall, 2),
                              "overhead_s": round(flow_wall - direct_wall, 2),
                              "server_flow_s": round(server_wall, 2),
                              "server_overhead_s": round(server_wall - direct_wall, 2),
                              "direct_train_s": round(train_s, 2), **meta}), flush=True)


if __name__ == "__main__":
    main()
