"""The main job on a machine that has never run Prefect, Ray, MLflow or DVC: an empty HOME and
PREFECT_HOME, the flow started as `python -m flows.pipeline` (what `make pipeline` runs), training
on a real local Ray cluster with two workers. The person presses Ctrl-C once training has
reported a step, then runs the same command again, which resumes there and finishes.

What they see: one line per stage as it starts and ends, the resolved hardware, each progress
line once, the summary, and none of the libraries' chatter, which is in the log file instead.
What the Ctrl-C does (flows/interrupts.py): training stops after the current step with a
checkpoint of it (off the checkpoint interval), exit 130, the MLflow run KILLED (the real SQLite
store), the Prefect flow run CANCELLED (the real Prefect database), no process of the job left
(Ray's GCS, raylet and workers, Prefect's temporary server), the signal going to the command's
whole process group as a terminal sends it. SIGTERM and SIGHUP take the same path once they
reach the job: in-process training (`flows.stages train`) in tests/test_interrupts.py, a served
deployment (in-process training) in tests/test_prefect.py; that ray.init and Ray Train leave the
job's SIGTERM and SIGINT handlers in place is checked in tests/test_ray.py. (Until 2026-12-02 a
second main job, resumed, got SIGTERM during Ray training here as well.)"""

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from mlflow import MlflowClient

from diffusion.checkpoint import checkpoint_step
from tests.helpers import make_project
from tests.test_interrupts import _finish, _interrupted_at, _processes_with, _read_until

STAGES = ("prepare", "validate", "dvc", "extractor", "train", "evaluate", "register")
NOISE = ("Failed to query", "Traceback", "GetTimeoutError", "RayTrainWorker", "INFO", "WARNING",
         "Task run", "mlflow.store", "mlflow.system_metrics", "UserWarning")


@pytest.mark.slow(minutes=5)
@pytest.mark.timeout(1800)      # two main-job runs on a loaded 2-core machine
def test_first_run_on_an_empty_home_then_ctrl_c_and_a_resumed_run(tmp_path):
    root, env = make_project(tmp_path)
    home = tmp_path / "empty-home"
    home.mkdir()
    marker = ("DDPM_TEST_JOB", uuid.uuid4().hex)        # every process the job starts inherits it
    env = {**env, "HOME": str(home), "PREFECT_HOME": str(home / ".prefect"), "PYTHONPATH": str(root),
           marker[0]: marker[1]}
    for key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "RAY_ADDRESS", "DDPM_CACHE_DIR",
                "XDG_CACHE_HOME", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"):
        env.pop(key, None)
    job = [sys.executable, "-m", "flows.pipeline", "train.log_every=5",    # ray.*: the auto defaults
           "train.checkpoint_every=100000"]         # the step reached is checkpointed all the same
    checkpoint = root / "runs" / "default" / "checkpoint.pt"

    # 1. the first run: Ctrl-C (SIGINT to the process group) once a step was reported
    lines: list[str] = []
    proc = subprocess.Popen([*job, "train.steps=100000"], cwd=root, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _read_until(proc, lines, r"^\[train\] started", timeout=600)
        _read_until(proc, lines, r"^  train: step \d+", timeout=300)
        os.killpg(proc.pid, signal.SIGINT)
        code, _ = _finish(proc, lines)
    finally:                                             # a failed step leaves nothing running
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
    shown = "".join(lines)
    assert code == 130, shown
    first = _interrupted_at(shown)
    assert checkpoint_step(checkpoint) == first and first >= 5
    assert _processes_with(f"{marker[0]}={marker[1]}") == []     # Ray, Prefect's server: all gone
    marks = [line for line in shown.splitlines() if line.startswith("[")]
    expected = [m for s in STAGES[:4] for m in (f"[{s}] started", f"[{s}] done in ")] + ["[train] started"]
    assert len(marks) == len(expected) and all(m.startswith(e) for m, e in zip(marks, expected)), marks
    assert len([x for x in shown.splitlines() if x.startswith("  train: 2 workers, each ")]) == 1
    assert "error" not in shown
    for noise in NOISE:
        assert noise not in shown, noise

    # 2. the same command again: it resumes from that step and finishes
    done = subprocess.run([*job, f"train.steps={first + 10}"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=900)
    shown = done.stdout + done.stderr
    assert done.returncode == 0, shown
    lines = done.stdout.splitlines()
    log = root / re.match(r"ddpm-pipeline: library output goes to (\S+)", lines[0]).group(1)
    # one line as each stage starts and one as it ends, in order (the extractor from the first run)
    marks = [line for line in lines if line.startswith("[")]
    expected = [m for s in STAGES for m in (f"[{s}] started", f"[{s}] cached" if s == "extractor"
                                            else f"[{s}] done in ")]
    assert len(marks) == len(expected) and all(m.startswith(e) for m, e in zip(marks, expected)), marks
    assert f"  train: resuming from step {first}" in lines
    # the resolved hardware of both the workers and the sampler, once each
    assert len([x for x in lines if x.startswith("  train: 2 workers, each ")]) == 1
    assert re.search(r"^  train: 2 workers, each .*; precision (fp32|bf16) \(auto: ", done.stdout, re.M)
    assert len([x for x in lines if x.startswith("  sampling: precision ")]) == 1
    progress = [x for x in lines if x.startswith("  train: step ")]
    assert progress and len(progress) == len(set(progress))
    assert progress[-1].startswith(f"  train: step {first + 10}, ")
    assert checkpoint_step(checkpoint) == first + 10
    assert "ddpm-pipeline finished in" in done.stdout and "-> alias 'champion'" in done.stdout
    # the MLflow link opens the experiment's training runs (not the UI's GenAI start page)
    assert re.search(r"MLflow UI +: .*#/experiments/\d+/runs\?workflowType=machine_learning", done.stdout)
    # nothing of the libraries' own output, no tracebacks: all of it is in the log file
    for noise in NOISE:
        assert noise not in shown, noise
    text = log.read_text()
    assert "Starting temporary server" in text and "Started a local Ray instance" in text

    # the interrupted run ended KILLED / CANCELLED, the resumed one FINISHED / COMPLETED
    store = MlflowClient(f"sqlite:///{root / 'mlflow' / 'mlflow.db'}")
    runs = store.search_runs([e.experiment_id for e in store.search_experiments()],
                             order_by=["attributes.start_time ASC"])
    assert runs[0].info.status == "KILLED" and runs[1:] and {r.info.status for r in runs[1:]} == {"FINISHED"}
    # the train stage's start-up and Ray's part of it (ray_train() to rank 0's first step; the
    # cluster itself was started early, while the first stages ran), recorded with the run
    info = json.loads((root / "runs" / "default" / "run.json").read_text())
    assert 0 < info["ray_seconds_to_first_step"] <= info["seconds_to_first_step"]
    trained = store.get_run(info["mlflow_run_id"]).data.metrics
    assert trained["ray_seconds_to_first_step"] == info["ray_seconds_to_first_step"]
    with sqlite3.connect(home / ".prefect" / "prefect.db") as db:
        states = [s for (s,) in db.execute("SELECT state_type FROM flow_run ORDER BY created")]
    assert states == ["CANCELLED", "COMPLETED"]
    # the first-run paths were taken in the empty home, and nothing was written outside the project
    assert (root / "mlflow" / "mlflow.db").is_file() and not (root / "mlflow.db").exists()
    assert os.listdir(home) and not any(p.name == "mlflow.db" for p in Path(home).rglob("*"))
