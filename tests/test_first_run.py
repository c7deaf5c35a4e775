"""The main job on a machine that has never run Prefect, Ray, MLflow or DVC: an empty HOME and
PREFECT_HOME, the flow started as `python -m flows.pipeline` (what `make pipeline` runs), training
on a real local Ray cluster with two workers. What a person sees: one line per stage as it starts
and ends, the resolved hardware, each progress line once, the summary, and none of the
libraries' chatter, which is in the log file instead."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import make_project

STAGES = ("prepare", "validate", "dvc", "extractor", "train", "evaluate", "register")


@pytest.mark.slow
def test_first_run_on_an_empty_home_with_a_readable_console(tmp_path):
    root, env = make_project(tmp_path)
    home = tmp_path / "empty-home"
    home.mkdir()
    env = {**env, "HOME": str(home), "PREFECT_HOME": str(home / ".prefect"), "PYTHONPATH": str(root)}
    for key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "RAY_ADDRESS", "DDPM_CACHE_DIR",
                "XDG_CACHE_HOME", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"):
        env.pop(key, None)
    done = subprocess.run([sys.executable, "-m", "flows.pipeline", "train.steps=30", "train.log_every=5",
                           "train.checkpoint_every=30"],          # ray.*: the auto defaults
                          cwd=root, env=env, capture_output=True, text=True, timeout=900)
    shown = done.stdout + done.stderr
    assert done.returncode == 0, shown
    lines = done.stdout.splitlines()
    log = root / re.match(r"ddpm-pipeline: library output goes to (\S+)", lines[0]).group(1)

    # one line as each stage starts and one as it ends, in order
    marks = [line for line in lines if line.startswith("[")]
    expected = [m for s in STAGES for m in (f"[{s}] started", f"[{s}] done in ")]
    assert len(marks) == len(expected) and all(m.startswith(e) for m, e in zip(marks, expected)), marks
    # the resolved hardware of both the workers and the sampler, once each
    assert len([x for x in lines if x.startswith("  train: 2 workers, each ")]) == 1
    assert re.search(r"^  train: 2 workers, each .*; precision (fp32|bf16) \(auto: ", done.stdout, re.M)
    assert len([x for x in lines if x.startswith("  sampling: precision ")]) == 1
    progress = [x for x in lines if x.startswith("  train: step ")]
    assert progress and len(progress) == len(set(progress)) and progress[-1].startswith("  train: step 30, ")
    assert "ddpm-pipeline finished in" in done.stdout and "-> alias 'champion'" in done.stdout
    # the MLflow link opens the experiment's training runs (not the UI's GenAI start page)
    assert re.search(r"MLflow UI +: .*#/experiments/\d+/runs\?workflowType=machine_learning", done.stdout)
    # nothing of the libraries' own output, no tracebacks: all of it is in the log file
    for noise in ("Failed to query", "Traceback", "GetTimeoutError", "RayTrainWorker", "INFO",
                  "WARNING", "Task run", "mlflow.store", "mlflow.system_metrics", "UserWarning"):
        assert noise not in shown, noise
    text = log.read_text()
    assert "Starting temporary server" in text and "Started a local Ray instance" in text
    # the first-run paths were taken in the empty home, and nothing was written outside the project
    assert (home / ".prefect" / "prefect.db").is_file()
    assert (root / "mlflow" / "mlflow.db").is_file() and not (root / "mlflow.db").exists()
    assert os.listdir(home) and not any(p.name == "mlflow.db" for p in Path(home).rglob("*"))
