"""Stopping the main job in order on SIGINT, SIGTERM or SIGHUP (Ctrl-C, ``kill``, a closed
terminal, a node being drained): the step reached is checkpointed, the MLflow run ends KILLED,
the Prefect flow run Cancelled, the Ray cluster the job started is shut down, and the command
exits with 128 + the signal's number (130, 143, 129).

Two parts, both stdlib only:

- :func:`supervise` (``python -m flows.pipeline``): the job runs as a child in a session of its
  own and this light parent forwards each signal to the job's main process only. A terminal
  signals its whole foreground process group: without the parent, Prefect's temporary API server
  and Ray's processes would get the first Ctrl-C (or the hang-up) too and die before the job
  could record anything. Once the job has exited, the parent ends whatever it left in its
  session; if the job has not exited :data:`KILL_AFTER_S` after the first signal, the parent
  kills the whole session. If the parent itself is killed, the job gets SIGTERM (Linux).
- :func:`handled` (in the job): the signals raise :class:`Interrupted` in the main thread;
  inside :func:`deferred` (around training) the first signal only sets the flag that
  :func:`requested` reads and the training loop polls after each step, so the step reached is
  checkpointed before the stage raises; a second signal raises at once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
JOB_ENV = "DDPM_SUPERVISED_JOB"     # set in the job process that supervise() starts
KILL_AFTER_S = 60.0                 # after the first signal, the job's session is killed
LEFTOVER_GRACE_S = 3.0              # SIGTERM to what the job left, then SIGKILL


class Interrupted(KeyboardInterrupt):
    """The job was asked to stop by a signal; ``step``: the training step checkpointed, when the
    signal came during training. A KeyboardInterrupt, so code that cleans up on Ctrl-C (and
    Prefect, which records a crash rather than a failure, with no retries) treats it as one."""

    def __init__(self, signum: int, step: int | None = None) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum, self.step = signum, step
        self.reported = False                # the console has said where it was interrupted

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


_requested = threading.Event()
_signum: int | None = None
_first_at = 0.0
_deferring = 0
_depth = 0
REPEAT_S = 2.0     # the same signal again within this: one stop request delivered twice, not two


def requested() -> bool:
    """A signal has asked the job to stop (what the training loop polls)."""
    return _requested.is_set()


def received() -> int | None:
    """The first signal received, or None."""
    return _signum


def record(signum: int) -> bool:
    """Mark a stop request by ``signum`` without raising, for code that stops in its own order
    (the sweep hands SIGTERM and SIGHUP to Ray Tune's stop); True if it is the first."""
    global _signum, _first_at
    if _requested.is_set():
        return False
    _signum, _first_at = signum, time.monotonic()
    _requested.set()
    return True


def _on_signal(signum: int, frame) -> None:
    first = record(signum)
    if not first and _deferring and signum == _signum and time.monotonic() - _first_at < REPEAT_S:
        return       # e.g. a group kill that also reaches the job through make or the supervisor
    if first and _deferring:
        return                             # the training loop stops after its current step
    raise Interrupted(signum)


@contextlib.contextmanager
def handled() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP raise :class:`Interrupted` during the block (in the main
    thread; elsewhere, where Python cannot install handlers, nothing changes); the previous
    handlers come back after it."""
    global _signum, _depth
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if not _depth:                         # a new job in this process: no stop asked yet
        _requested.clear()
        _signum = None
    previous = {s: signal.signal(s, _on_signal) for s in SIGNALS}
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """During the block a first signal only sets :func:`requested`: the code inside polls it
    and stops at a consistent point, then raises :class:`Interrupted` with what it knows (the
    step). If it did not, the outermost block raises it as it ends."""
    global _deferring
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
    if not _deferring and _signum is not None:
        raise Interrupted(_signum)


# ----------------------------------------------------------------------------- the supervisor

def supervise(module: str) -> None:
    """Run ``python -m <module> <this command's arguments>`` as the job and exit with its exit
    code (see the module's text). In the job itself (and off POSIX) it returns at once; there,
    until the job installs its handlers, a signal ends the process with 128 + its number."""
    if os.environ.get(JOB_ENV) or os.name != "posix":
        for s in SIGNALS:                  # during the job's imports: nothing to clean up yet
            signal.signal(s, lambda signum, frame: sys.exit(128 + signum))
        return
    die_with_parent = _parent_death_signal()
    job = subprocess.Popen([sys.executable, "-m", module, *sys.argv[1:]],
                           env={**os.environ, JOB_ENV: "1"}, start_new_session=True,
                           preexec_fn=die_with_parent)
    received: list[int] = []
    first_at: list[float] = []

    def forward(signum: int, frame) -> None:
        received.append(signum)
        first_at[:] = first_at or [time.monotonic()]
        if job.returncode is None:             # not yet reaped: the pid is still the job's
            with contextlib.suppress(ProcessLookupError):
                job.send_signal(signum)

    for s in SIGNALS:
        signal.signal(s, forward)
    killed = False
    while True:
        try:
            code = job.wait(timeout=0.5)
            break
        except subprocess.TimeoutExpired:
            if first_at and not killed and time.monotonic() - first_at[0] > KILL_AFTER_S:
                print(f"the job did not stop within {KILL_AFTER_S:.0f} s of the signal; killed it "
                      "(its MLflow run may show RUNNING)", file=sys.stderr)
                _end_session(job.pid, grace_s=0.0)
                killed = True
    _end_session(job.pid, grace_s=LEFTOVER_GRACE_S)
    if killed:
        sys.exit(137)
    if code < 0:                           # the job died of a signal
        code = 128 - code
    if received and code not in (0, 128 + received[0]):
        code = 128 + received[0]
    sys.exit(code)


def _parent_death_signal():
    """A ``preexec_fn`` that asks Linux to send the job SIGTERM when this parent dies (so a
    SIGKILLed parent still lets the job stop in order); None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
    return preexec


def _live_processes(field: int, value: int) -> list[int]:
    """The live (not zombie) processes whose /proc stat ``field`` (1 ppid, 3 session) is
    ``value``, from Linux's /proc (elsewhere none)."""
    pids = []
    with contextlib.suppress(OSError):
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rpartition(")")[2].split()
            except OSError:
                continue
            if fields[0] != "Z" and int(fields[field]) == value:   # state, ppid, pgrp, session
                pids.append(int(entry))
    return pids


def session_processes(sid: int) -> list[int]:
    """The live processes of session ``sid``."""
    return _live_processes(3, sid)


def stop_children(grace_s: float) -> None:
    """SIGTERM this process's children and wait up to ``grace_s`` for them to exit (each stops
    in order on it: :func:`handled`); a served deployment does this before it exits."""
    children = _live_processes(1, os.getpid())
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while children and time.monotonic() < deadline:
        time.sleep(0.2)
        children = [pid for pid in children if pid in _live_processes(1, os.getpid())]


def _end_session(sid: int, grace_s: float) -> None:
    """SIGTERM every process left in the job's session, SIGKILL what remains after ``grace_s``."""
    for sig in ((signal.SIGTERM, signal.SIGKILL) if grace_s > 0 else (signal.SIGKILL,)):
        left = session_processes(sid)
        if not left:
            return
        for pid in left:
            with contextlib.suppress(OSError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and session_processes(sid):
            time.sleep(0.1)
