"""The pipeline's console: library output to the log file (even from C code and children), one
line per stage, one training progress display, and errors that still show."""

import re
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


def _pty_console(tmp_path, columns):
    """A console on a real pseudo-terminal of ``columns`` columns (0: one that reports no width,
    as a fresh pty does), and a function returning the rows a person would see on it."""
    import fcntl
    import os
    import pty
    import struct
    import termios
    master, slave = pty.openpty()
    attrs = termios.tcgetattr(slave)
    attrs[1] &= ~termios.OPOST                   # the bytes as written, no "\n" -> "\r\n"
    termios.tcsetattr(slave, termios.TCSANOW, attrs)
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    out = os.fdopen(slave, "w", buffering=1)
    os.set_blocking(master, False)
    written = bytearray()

    def rows():
        while True:
            try:
                chunk = os.read(master, 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            written.extend(chunk)
        # a row shows what follows its last carriage return (tqdm redraws in place with "\r")
        text = written.decode().replace("\x1b[A", "")
        return [row.rsplit("\r", 1)[-1].rstrip() for row in text.split("\n")]
    return Console(out, out, log_path=tmp_path / "x.log"), rows


HARDWARE = {"device_description": "Intel Xeon (AVX512), 1 thread(s)", "workers": 2, "precision": "fp32",
            "precision_reason": "as configured"}


def test_on_a_terminal_the_hardware_line_comes_before_the_bar_and_no_bar_frame_is_left(tmp_path):
    # the order of the train stage: the display is made, the workers report their hardware,
    # then metrics; a line printed while the bar is up (a rank's download) clears it first
    from diffusion.progress import progress_to
    c, rows = _pty_console(tmp_path, columns=100)
    assert c.interactive
    with progress_to(c.out):                     # as quiet_console does
        display = TrainingProgress(c, steps=300, budget_minutes=0)
        c.hardware("train", HARDWARE)
        display.update(10, {"loss": 0.9, "img_per_s": 100.0})
        c.line("[train] rank 1 on node-b: dataset downloaded")
        display.update(20, {"loss": 0.8, "img_per_s": 100.0})
        display.close()
    shown = [r for r in rows() if r]
    assert shown[0].startswith("  train: 2 workers, each Intel Xeon") and "%|" not in shown[0]
    assert shown[1] == "[train] rank 1 on node-b: dataset downloaded"
    assert len(shown) == 3 and "step 20/300, loss 0.8000" in shown[2]
    assert [r for r in shown if "%|" in r] == [shown[2]]       # one bar frame left: the last
    assert not any(re.search(r"(?<!\d)0/300", r) for r in shown)   # no stale first frame


def test_a_terminal_of_zero_columns_gets_progress_lines(tmp_path, monkeypatch):
    # a terminal that reports no width would show no bar at all: it gets the lines of a log
    c, rows = _pty_console(tmp_path, columns=0)
    assert not c.interactive
    clock = [0.0]
    monkeypatch.setattr(console_module.time, "monotonic", lambda: clock[0])
    display = TrainingProgress(c, steps=300, budget_minutes=0)
    c.hardware("train", HARDWARE)
    for step in range(10, 310, 10):
        clock[0] += 2.0
        display.update(step, {"loss": 1.0, "img_per_s": 100.0})
    display.close()
    shown = [r for r in rows() if r]
    assert shown[0].startswith("  train: 2 workers")
    assert shown[1:] == ["  train: step 10/300, loss 1.0000, 100 img/s",
                         "  train: step 160/300, loss 1.0000, 100 img/s",
                         "  train: step 300/300, loss 1.0000, 100 img/s"]


def test_a_stage_interrupted_by_a_signal_says_where_and_no_error():
    from flows.interrupts import Interrupted
    out, err = Lines(), Lines()
    c = Console(out, err)
    with pytest.raises(Interrupted):
        with c.stage("train"):
            raise Interrupted(2, step=37)
    with pytest.raises(Interrupted):
        with c.stage("evaluate"):
            raise Interrupted(15)
    assert out.text.splitlines() == ["[train] started", "interrupted during [train] at step 37; checkpoint kept",
                                     "[evaluate] started", "interrupted during [evaluate]"]
    assert err.text == ""
