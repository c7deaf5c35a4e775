"""A Ray Train callback that passes each report of a run, with its persisted checkpoint, to the
run's :class:`flows.ray_channel.RunChannel`: how a sweep trial that trains with several Ray Train
workers (``sweep.workers_per_trial`` > 1) hands rank 0's quick FID and the checkpoint to Ray Tune.
It runs in Ray Train's controller process, which unpickles it from here: this module imports only
Ray Train's callback interface (no torch, no trainer)."""

from __future__ import annotations

from ray.train.v2.api.callback import UserCallback


class ReportsToChannel(UserCallback):
    """After all workers reported: ``{"kind": "report", "metrics": rank 0's metrics, "checkpoint":
    the checkpoint Ray Train persisted (or None)}`` into ``channel``."""

    def __init__(self, channel) -> None:
        self.channel = channel

    def after_report(self, run_context, metrics, checkpoint) -> None:
        import ray
        ray.get(self.channel.put.remote({"kind": "report", "metrics": dict(metrics[0]),
                                         "checkpoint": checkpoint}), timeout=60)
