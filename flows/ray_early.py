"""Starting Ray early: the pipeline begins the cluster's start (or the connection to
``RAY_ADDRESS``) in a background thread as the flow begins, so that it overlaps the stages before
training. Stdlib only: the flow's teardown (:func:`stop`) reads the lock and the flag here without
importing torch or Ray."""

from __future__ import annotations

import sys
import threading

LOCK = threading.Lock()          # one start at a time (flows.ray_train.init_ray holds it)
STOPPED = threading.Event()      # the job is being torn down: no early start after this


def start() -> threading.Thread:
    """Begin :func:`flows.ray_train.start_early` in a daemon thread. Import :mod:`flows.ray_train`
    (torch, Ray) before, in the caller's thread: two threads importing torch at once can see it
    half-initialised."""
    STOPPED.clear()                  # a new job in this process

    def run() -> None:
        from flows.ray_train import start_early
        start_early()
    thread = threading.Thread(target=run, name="ray-early-start", daemon=True)
    thread.start()
    return thread


def stop(wait_s: float = 30.0) -> None:
    """Shut Ray down for the job's teardown: no early start begins after this, and one under way
    is waited for (up to ``wait_s``, within the supervisor's grace before it kills the job)."""
    STOPPED.set()
    held = LOCK.acquire(timeout=wait_s)
    try:
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():
            ray.shutdown()
    finally:
        if held:
            LOCK.release()
