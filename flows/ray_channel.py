"""The actor between a Ray training run's driver and its workers. Apart, and stdlib only, so the
actor's process imports neither torch nor the trainer."""

from __future__ import annotations


class RunChannel:
    """A Ray actor between the driver and the workers of one run (reachable from any node):
    events up (rank 0's hardware, metrics and grids, every rank's data report), a stop request
    down (the driver got a signal: the workers checkpoint the step they reached and return)."""

    def __init__(self) -> None:
        self.events: list[dict] = []
        self.stop = False

    def put(self, event: dict) -> None:
        self.events.append(event)

    def take(self) -> list[dict]:
        events, self.events = self.events, []
        return events

    def request_stop(self) -> None:
        self.stop = True

    def stop_requested(self) -> bool:
        return self.stop
