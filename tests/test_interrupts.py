"""Stopping a run (flows/interrupts.py): SIGINT, SIGTERM and SIGHUP stop training after the
current step with a checkpoint of it, end the MLflow run KILLED (the real SQLite store) and
the Prefect flow run Cancelled (the real Prefect database), leave no process of the job behind,
exit 128 + the signal's number, and the next run resumes from the step reached. The main job on
a real local Ray cluster gets its Ctrl-C in tests/test_first_run.py (a first run, stopped, then
resumed to the end); here the train stage as `dvc repro` runs it, and the supervisor."""

import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from mlflow import MlflowClient

from diffusion.checkpoint import checkpoint_step
from flows.interrupts import session_processes
from tests.helpers import REPO, digits_dir

EXIT_WITHIN_S = 90          # not a speed check: the command exits (it once hung for minutes); past
                            # the supervisor's 60 s, so a forced kill shows as exit 137


def _read_until(proc, lines: list[str], pattern: str, timeout: float) -> re.Match:
    """Read the process's output lines into ``lines`` until one matches ``pattern``."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        found = re.search(pattern, line)
        if found:
            return found
    raise AssertionError(f"no line matching {pattern!r}:\n{''.join(lines)}")


def _finish(proc, lines: list[str]) -> tuple[int, float]:
    """Wait for the exit; returns (exit code, seconds from now)."""
    started = time.time()
    try:
        out, _ = proc.communicate(timeout=EXIT_WITHIN_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"still running {EXIT_WITHIN_S} s after the signal:\n{''.join(lines)}")
    lines.append(out)
    return proc.returncode, time.time() - started


def _interrupted_at(shown: str) -> int:
    found = re.search(r"^interrupted during \[train\] at step (\d+); checkpoint kept$", shown, re.M)
    assert found, shown
    return int(found[1])


def _processes_with(marker: str) -> list[str]:
    """Command lines of the processes whose environment holds ``marker`` (every process the
    job started inherits it: Ray's raylet, GCS and workers, Prefect's server)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if marker.encode() not in f.read():
                        continue
                with open(f"/proc/{entry}/stat") as f:
                    if f.read().rpartition(")")[2].split()[0] == "Z":
                        continue
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    found.append(f.read().replace(b"\0", b" ").decode(errors="replace")[:200])
            except OSError:
                pass
    return found


def test_the_supervisor_relays_a_group_signal_to_the_job_only_and_ends_what_it_left(tmp_path):
    # a terminal's hang-up reaches the command's process group; the job runs in a session of
    # its own, gets the signal from the supervisor and exits 129; its child (never signalled)
    # is ended by the supervisor once the job has exited
    (tmp_path / "job.py").write_text(textwrap.dedent("""
        import os, subprocess, sys, time
        from flows.interrupts import Interrupted, handled, supervise
        supervise("job")
        child = subprocess.Popen(["sleep", "300"])
        with handled():
            try:       # the signal may come while print() returns, once the line is written
                print(os.getpid(), child.pid, flush=True)  # the handlers are in place
                while True:
                    time.sleep(0.05)
            except Interrupted as exc:
                print("stopping on", exc.signum, flush=True)
                sys.exit(exc.exit_code)
    """))
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{tmp_path}"}
    proc = subprocess.Popen([sys.executable, "-m", "job"], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, start_new_session=True)
    job, child = map(int, proc.stdout.readline().split())
    assert job != proc.pid and os.getsid(job) == job         # the job leads its own session
    os.killpg(proc.pid, signal.SIGHUP)
    assert proc.wait(timeout=EXIT_WITHIN_S) == 129
    assert proc.stdout.read() == "stopping on 1\n"
    assert session_processes(job) == []                      # the sleep it left is gone


def _stage_train(tmp_path, *extra):
    cmd = [sys.executable, "-m", "flows.stages", "train", "--params", str(REPO / "params.yaml"),
           "data.source=digits", "data.resolution=8", f"data.prepared_dir={digits_dir()}",
           "model.preset=tiny", "train.batch_size=16", "train.precision=fp32", "train.log_every=5",
           "train.checkpoint_every=100000", "tracking.grid_images=0", "ray.enabled=false",
           f"train.out_dir={tmp_path / 'out'}", f"tracking.local_dir={tmp_path / 'mlflow'}", *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.Popen(cmd, cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_signal_stops_in_process_training_at_the_step_reached(tmp_path, sig):
    # the train stage as `dvc repro` runs it, training in-process; the signal comes off the
    # checkpoint interval (100000): the step reached is checkpointed all the same
    lines: list[str] = []
    proc = _stage_train(tmp_path, "train.steps=100000")
    _read_until(proc, lines, r"^  train: step \d+", timeout=300)
    proc.send_signal(sig)
    code, _ = _finish(proc, lines)
    shown = "".join(lines)
    assert code == 128 + sig, shown
    step = int(re.search(r"interrupted during the train stage at step (\d+); checkpoint kept", shown)[1])
    assert step >= 5 and checkpoint_step(tmp_path / "out" / "checkpoint.pt") == step
    assert "Traceback" not in shown
    store = MlflowClient(f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}")
    [run] = store.search_runs([e.experiment_id for e in store.search_experiments()])
    assert run.info.status == "KILLED"
    assert store.get_metric_history(run.info.run_id, "loss")[-1].step <= step   # flushed
    if sig == signal.SIGHUP:                  # the next run resumes there and finishes
        again = _stage_train(tmp_path, f"train.steps={step + 5}")
        shown, _ = again.communicate(timeout=600)
        code = again.returncode
        assert code == 0 and f"  train: resuming from step {step}\n" in shown, shown
        assert checkpoint_step(tmp_path / "out" / "checkpoint.pt") == step + 5
