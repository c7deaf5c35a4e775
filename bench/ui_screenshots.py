"""Screenshots of what a user sees in the MLflow UI: the experiment's runs table, a run page, the
compare view of the two newest runs and the registered model, in headless Chromium (Debian's
``chromium`` package: ``apt-get install chromium``).

    python bench/ui_screenshots.py --store mlflow/mlflow.db --out docs/ui        # starts `mlflow ui`
    python bench/ui_screenshots.py --tracking-uri http://127.0.0.1:5000 --out /tmp/ui

With ``--store`` it starts ``mlflow ui`` on that SQLite store (in its own process group, stopped
at the end); with ``--tracking-uri`` it uses a running server. Writes ``runs.png``, ``run.png``,
``compare.png`` and ``model.png``; with ``--sweep``, the newest sweep's ``sweep-runs.png`` (its
trials grouped under the parent run) and ``sweep-compare.png`` (the trials side by side).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

from mlflow import MlflowClient

CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s")


def pages(uri: str, experiment: str, model: str) -> dict[str, str]:
    """The UI addresses (hash routes) of the four views, for the experiment's two newest runs."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"error: experiment {experiment!r} not found at {uri}")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=2)
    if not runs:
        raise SystemExit(f"error: experiment {experiment!r} has no runs")
    ids = [r.info.run_id for r in runs]
    compare = urllib.parse.urlencode({"runs": json.dumps(ids), "experiments": json.dumps([exp.experiment_id])})
    base = uri.rstrip("/")
    # MLflow 3's UI keeps a per-browser GenAI / model-training switch that starts on GenAI; the
    # workflowType parameter opens the model-training views whatever the browser remembers
    training = "workflowType=machine_learning"
    return {"runs": f"{base}/#/experiments/{exp.experiment_id}/runs?{training}",
            "run": f"{base}/#/experiments/{exp.experiment_id}/runs/{ids[0]}?{training}",
            "compare": f"{base}/#/compare-runs?{compare}&{training}",
            "model": f"{base}/#/models/{urllib.parse.quote(model)}?{training}"}


def sweep_pages(uri: str, experiment: str) -> dict[str, str]:
    """The newest sweep's views: the runs table with its trials grouped under the parent run, and
    the compare view of all its trials (params against quick FID)."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    parents = client.search_runs([exp.experiment_id], "tags.sweep != ''",
                                 order_by=["attributes.start_time DESC"], max_results=1) if exp else []
    if not parents:
        raise SystemExit(f"error: experiment {experiment!r} has no sweep parent run at {uri}")
    parent = parents[0].info.run_id
    trials = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")
    compare = urllib.parse.urlencode({"runs": json.dumps([r.info.run_id for r in trials]),
                                      "experiments": json.dumps([exp.experiment_id])})
    base, training = uri.rstrip("/"), "workflowType=machine_learning"
    return {"sweep-runs": f"{base}/#/experiments/{exp.experiment_id}/runs?{training}",
            "sweep-compare": f"{base}/#/compare-runs?{compare}&{training}"}


def screenshot(url: str, out: Path, *, wait_ms: int = 12000, size: str = "1500,1000") -> Path:
    browser = chromium()
    if browser is None:
        raise SystemExit("error: chromium not found; install Debian's package: apt-get install chromium")
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                               f"--window-size={size}", f"--virtual-time-budget={wait_ms}",
                               f"--screenshot={out}", url], capture_output=True, text=True, timeout=180)
    if done.returncode or not out.is_file():
        raise RuntimeError(f"chromium could not capture {url}: {done.stderr[-500:]}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--store", type=Path, help="SQLite store to open with `mlflow ui`")
    where.add_argument("--tracking-uri", help="a running MLflow server, e.g. http://127.0.0.1:5000")
    p.add_argument("--experiment", default="ddpm-mnist")
    p.add_argument("--model", default="ddpm-mnist")
    p.add_argument("--out", type=Path, default=Path("runs/ui"))
    p.add_argument("--wait-ms", type=int, default=12000, help="page rendering time per screenshot")
    p.add_argument("--sweep", action="store_true",
                   help="the newest sweep's views (sweep-runs.png, sweep-compare.png) instead of the four")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    ui = None
    uri = args.tracking_uri
    if args.store is not None:
        if not args.store.is_file():
            raise SystemExit(f"error: {args.store}: no such MLflow store")
        port = _free_port()
        uri = f"http://127.0.0.1:{port}"
        ui = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "ui", "--host", "127.0.0.1",
                               "--port", str(port), "--backend-store-uri",
                               f"sqlite:///{args.store.absolute()}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                              env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    try:
        _wait(f"{uri}/health")
        views = sweep_pages(uri, args.experiment) if args.sweep else pages(uri, args.experiment, args.model)
        for name, url in views.items():
            print(screenshot(url, args.out / f"{name}.png", wait_ms=args.wait_ms))
    finally:
        if ui is not None:                        # mlflow ui starts workers: stop the whole group
            os.killpg(ui.pid, signal.SIGTERM)
            try:
                ui.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(ui.pid, signal.SIGKILL)
    return 0


if __name__ == "__main__":
    sys.exit(main())
