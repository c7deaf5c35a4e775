"""Where progress bars go. By default tqdm writes to ``sys.stderr``. An application that sends
the process's own stdout/stderr to a log file and keeps the terminal for people (the pipeline's
console, ``flows.console``) points the bars at its terminal with :func:`progress_to`. On a stream
that is not a terminal (CI logs, a pipe) bars are off: they would print thousands of lines.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator, TextIO

from tqdm.auto import tqdm

_stream: TextIO | None = None


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def progress_bar(*, total: int | None, desc: str, unit: str, enabled: bool = True, initial: int = 0,
                 leave: bool = True) -> tqdm:
    """A tqdm bar on the configured stream; disabled when ``enabled`` is false or, with a stream
    set by :func:`progress_to`, when that stream is not a terminal."""
    stream = _stream if _stream is not None else sys.stderr
    if _stream is not None and not _is_terminal(_stream):
        enabled = False
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=stream, leave=leave,
                disable=not enabled, dynamic_ncols=True)


@contextlib.contextmanager
def progress_to(stream: TextIO) -> Iterator[None]:
    """Send progress bars to ``stream`` for a block (the previous stream comes back after)."""
    global _stream
    previous, _stream = _stream, stream
    try:
        yield
    finally:
        _stream = previous
