"""The pipeline's console: library output to the log file (even from C code and children), one
line per stage, one training progress display, and errors that still show."""

import subprocess
import sys
import textwrap

import pytest

from flows import console as console_module
from flows.console import Console, TrainingProgress


class Lines:
    def __init__(self):
        self.text = ""

    def write(self, s):
        self.text += s

    def flush(self):
        pass

    def isatty(self):
        return False


def test_quiet_console_sends_library_output_to_the_log(tmp_path):
    """In a separate process: print, logging, warnings, a child process and the C library's own
    stdout all land in the log file; only the console's lines reach the terminal."""
    script = textwrap.dedent(f"""
        import ctypes, logging, os, subprocess, sys, warnings
        from flows.console import quiet_console
        with quiet_console({str(tmp_path / "run.log")!r}) as out:
            out.line("stage line for people")
            print("library chatter")
            logging.getLogger("ray").warning("Failed to query Ray Train Controller actor state.")
            warnings.warn("a deprecation nobody asked for")
            subprocess.run(["echo", "child process output"])
            ctypes.CDLL(None).puts(b"C library output")
            out.warning("one clear warning")
        print("after the block")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["stage line for people", "warning: one clear warning",
                                        "after the block"]
    assert done.stderr == ""
    log = (tmp_path / "run.log").read_text()
    for noise in ("library chatter", "Failed to query", "a deprecation nobody asked for",
                  "child process output", "C library output"):
        assert noise in log, noise


def test_stage_lines_and_a_failing_stage_names_its_cause(tmp_path):
    out, err = Lines(), Lines()
    c = Console(out, err, log_path=tmp_path / "x.log")
    with c.stage("prepare") as info:
        info["detail"] = "5000 images"
    with c.stage("train") as info:
        info["cached"] = True
    with pytest.raises(RuntimeError):
        with c.stage("evaluate"):
            raise RuntimeError("evaluate stage failed: CheckpointError: runs/x.pt: not found")
    lines = out.text.splitlines()
    assert lines[0] == "[prepare] started" and lines[1].startswith("[prepare] done in ")
    assert lines[1].endswith(": 5000 images")
    assert lines[3] == "[train] cached (unchanged inputs)"
    assert lines[4] == "[evaluate] started" and lines[5].startswith("[evaluate] failed after ")
    assert err.text == ("error: evaluate stage failed: CheckpointError: runs/x.pt: not found\n"
                        f"  details: {tmp_path / 'x.log'}\n")


def test_training_progress_prints_each_line_once_at_a_steady_rate(monkeypatch):
    out = Lines()
    clock = [0.0]
    monkeypatch.setattr(console_module.time, "monotonic", lambda: clock[0])
    progress = TrainingProgress(Console(out, out), steps=100000, budget_minutes=5)
    for step in range(10, 310, 10):                  # a report every 2 s for a minute
        clock[0] += 2.0
        progress.update(step, {"loss": 1.0 / step, "img_per_s": 120.0, "train_loop_seconds": clock[0]})
    progress.close()
    progress.close()
    lines = out.text.splitlines()
    assert len(lines) == len(set(lines)) == 3      # at 2 s, 32 s, 62 s... and the final step once
    assert lines[0] == "  train: step 10, loss 0.1000, 120 img/s, 4:58 left of the 5-min budget"
    assert lines[1].startswith("  train: step 160, ")
    assert lines[-1] == "  train: step 300, loss 0.0033, 120 img/s, 4:00 left of the 5-min budget"
    steps_only = Lines()
    p = TrainingProgress(Console(steps_only, steps_only), steps=40, budget_minutes=0)
    p.update(20, {"loss": 0.5, "img_per_s": 10.0})
    p.close()
    assert steps_only.text == "  train: step 20/40, loss 0.5000, 10 img/s\n"


def test_hardware_line_and_its_warning():
    out = Lines()
    Console(out, out).hardware("train", {
        "device_description": "AMD EPYC (AVX2), 1 thread(s)", "world_size": 2, "precision": "fp32",
        "precision_reason": "auto: this CPU has no native bf16 (AVX2)", "precision_warning": ""})
    Console(out, out).hardware("sampling", {"precision": "bf16", "precision_reason": "as configured",
                                            "precision_warning": "measured 9.0x slower"})
    assert out.text.splitlines() == [
        "  train: 2 workers, each AMD EPYC (AVX2), 1 thread(s); precision fp32 (auto: this CPU has "
        "no native bf16 (AVX2))",
        "  sampling: precision bf16 (as configured)",
        "warning: measured 9.0x slower"]
