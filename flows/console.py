"""The pipeline's console: what a person running ``make pipeline`` sees.

A healthy run prints where its log file is, one line per stage as it starts and one as it ends
(with its time), the resolved hardware choices, one training progress display and the summary.
Everything else the process and its children write - Prefect's, Ray's and MLflow's logs, Ray
workers' output, Python warnings - goes to the log file: :func:`quiet_console` points file
descriptors 1 and 2 at it, so even output of C extensions and subprocesses lands there. A failing
stage still prints its cause on the console, with the log file for the details.

Without :func:`quiet_console` (a served deployment, tests) the console is plain ``print``, which
Prefect records in the flow run's logs.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, TextIO

from tqdm.auto import tqdm

from diffusion.progress import progress_bar, progress_to
from flows import interrupts
from flows.interrupts import Interrupted

PROGRESS_LINE_SECONDS = 30.0      # on a non-terminal console: one training line per this many s


class Console:
    def __init__(self, out: TextIO | None = None, err: TextIO | None = None,
                 log_path: Path | None = None) -> None:
        self._out, self._err, self.log_path = out, err, log_path

    @property
    def out(self) -> TextIO:
        return self._out if self._out is not None else sys.stdout

    @property
    def err(self) -> TextIO:
        return self._err if self._err is not None else sys.stderr

    @property
    def interactive(self) -> bool:
        """A person's terminal, where progress bars redraw in place: one that reports a width
        (a terminal of 0 columns, as some CI runners and consoles report, gets lines)."""
        try:
            return self.log_path is not None and self.out.isatty() and _columns(self.out) > 0
        except (AttributeError, ValueError):
            return False

    def line(self, text: str) -> None:
        self._write(self.out, text)

    def warning(self, text: str) -> None:
        self._write(self.out, f"warning: {text}")

    def error(self, text: str) -> None:
        where = f"\n  details: {self.log_path}" if self.log_path else ""
        self._write(self.err, f"error: {text}{where}")

    @staticmethod
    def _write(stream: TextIO, text: str) -> None:
        """One line; a progress bar on the same terminal is cleared first and redrawn below it
        (no stale bar frame between lines). A terminal that is gone (hung up) is not an error:
        the job still stops in order."""
        try:
            tqdm.write(text, file=stream)
            stream.flush()
        except (OSError, ValueError):
            pass

    def hardware(self, what: str, setup: dict) -> None:
        """One line for the resolved choices of a stage, and the warning, if any, once."""
        device = setup.get("device_description")
        workers = setup.get("workers") or setup.get("world_size", 1)
        if device and (setup.get("workers") or workers > 1):      # Ray workers, or DDP ranks
            device = f"{workers} worker{'s' if workers != 1 else ''}, each {device}"
        self.line(f"  {what}: " + (f"{device}; " if device else "")
                  + f"precision {setup['precision']} ({setup['precision_reason']})"
                  + (f"; memory format {setup['memory_format']} ({setup['memory_format_reason']})"
                     if setup.get("memory_format") else ""))
        if setup.get("precision_warning"):
            self.warning(setup["precision_warning"])

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[dict]:
        """``[name] started`` ... ``[name] done in 12.3 s (detail)``; the block may put a
        ``detail`` (and ``cached``) into the yielded dict. A failure prints the cause and re-raises."""
        self.line(f"[{name}] started")
        info: dict = {}
        started = time.perf_counter()
        try:
            yield info
        except Interrupted as exc:
            where = f" at step {exc.step}; checkpoint kept" if exc.step else ""
            self.line(f"interrupted during [{name}]{where}")
            exc.reported = True
            raise
        except BaseException as exc:
            self.line(f"[{name}] failed after {time.perf_counter() - started:.1f} s")
            self.error(str(exc))
            raise
        took = time.perf_counter() - started
        state = "cached (unchanged inputs)" if info.get("cached") else f"done in {took:.1f} s"
        detail = f": {info['detail']}" if info.get("detail") else ""
        self.line(f"[{name}] {state}{detail}")


_current = Console()


def console() -> Console:
    return _current


@contextlib.contextmanager
def quiet_console(log_path: str | Path, restore: bool = True) -> Iterator[Console]:
    """Send everything this process (and every child it starts) writes to stdout and stderr into
    ``log_path``; the yielded console writes to the terminal the process started on. With
    ``restore=False`` the log keeps the process's output after the block too (a command about
    to exit: what libraries print while shutting down still goes to the log)."""
    global _current
    log_path = Path(log_path).absolute()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    out = os.fdopen(os.dup(1), "w", buffering=1)
    err = os.fdopen(os.dup(2), "w", buffering=1)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    previous, _current = _current, Console(out, err, log_path)
    try:
        with progress_to(out):
            yield _current
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        if restore:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            _current = previous
            out.close()
            err.close()
        for fd in saved:
            os.close(fd)


def run_command(title: str, log_dir: str | Path, verbose: bool, body: Callable[[], int],
                interrupted: Callable[[Interrupted], None]) -> int:
    """A command's job (``python -m flows.pipeline``, ``python -m flows.sweep``): ``body`` runs
    with SIGINT, SIGTERM and SIGHUP raising :class:`Interrupted` and, unless ``verbose``, behind
    :func:`quiet_console` with a dated log file under ``log_dir`` whose path is the console's first
    line. An interrupt that escapes ``body`` goes to ``interrupted`` and ends the command with its
    exit code (130 for Ctrl-C)."""
    with interrupts.handled():
        try:
            if verbose:
                return body()
            log_path = Path(log_dir) / f"{title.removeprefix('ddpm-')}-{time.strftime('%Y%m%d-%H%M%S')}.log"
            with quiet_console(log_path, restore=False) as out:
                out.line(f"{title}: library output goes to {log_path}")
                return body()
        except Interrupted as exc:
            interrupted(exc)
            return exc.exit_code


def _columns(stream: TextIO) -> int:
    """The width the terminal behind ``stream`` reports (0 when it reports none)."""
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, ValueError, OSError):
        return 0


def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}:{seconds % 60:02d}"


class TrainingProgress:
    """One training progress display, fed by rank 0's metrics (directly, or relayed from Ray
    workers): a bar that redraws in place on a terminal, else one line every
    ``PROGRESS_LINE_SECONDS``. Shows step, loss, img/s and the time left in the budget. The bar
    is drawn at the first report, so the lines of training's set-up (the hardware, the step it
    resumes from) come before it."""

    def __init__(self, out: Console, steps: int, budget_minutes: float) -> None:
        self.console, self.steps, self.budget = out, steps, budget_minutes * 60.0
        self.bar = None
        self.interactive = out.interactive
        self.last_line = float("-inf")        # the first report shows at once
        self.last: tuple[int, dict] | None = None
        self.shown_step = -1

    def text(self, step: int, metrics: dict) -> str:
        parts = [f"step {step}" + ("" if self.budget > 0 else f"/{self.steps}"),
                 f"loss {metrics['loss']:.4f}", f"{metrics['img_per_s']:.0f} img/s"]
        if self.budget > 0 and "train_loop_seconds" in metrics:
            parts.append(f"{_clock(self.budget - metrics['train_loop_seconds'])} left of the "
                         f"{self.budget / 60:g}-min budget")
        return ", ".join(parts)

    def update(self, step: int, metrics: dict) -> None:
        self.last = (step, metrics)
        if self.interactive and self.bar is None:
            total = int(self.budget) if self.budget > 0 else self.steps
            self.bar = progress_bar(total=total, desc="  train", unit="s" if self.budget > 0 else "step")
            self.bar.bar_format = "{desc} {percentage:3.0f}%|{bar:24}| {postfix}"
        if self.bar is not None:
            done = metrics.get("train_loop_seconds", 0.0) if self.budget > 0 else step
            self.bar.n = min(int(done), self.bar.total)
            self.bar.set_postfix_str(self.text(step, metrics))
            return
        now = time.monotonic()
        if now - self.last_line >= PROGRESS_LINE_SECONDS:
            self._show(step, metrics)

    def _show(self, step: int, metrics: dict) -> None:
        self.last_line, self.shown_step = time.monotonic(), step
        self.console.line(f"  train: {self.text(step, metrics)}")

    def close(self) -> None:
        """The final state, once (a bar leaves its last frame; lines add the last step if new)."""
        if self.bar is not None:
            self.bar.close()
        elif self.last is not None and self.last[0] != self.shown_step:
            self._show(*self.last)
