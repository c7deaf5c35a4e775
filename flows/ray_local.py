"""Ray Train V2 without what a run on the local, single-machine cluster does not use.

A ``TorchTrainer.fit()`` starts, besides the workers: a preemption watcher (spot nodes), Ray
Train's own metrics, a request to the autoscaling coordinator that blocks the controller for up to
5 s while that actor starts (twice when it times out, and again at shutdown), a placement-group
cleaner actor (for a controller that dies while the cluster lives on) and a dataset manager
actor (for Ray Datasets, of which this project passes none). On a 2-core machine these cost
tens of seconds before the first step. On the local cluster, which lives and dies with this
process and has no autoscaler, :func:`local_trainer_class` drops them; on a ``RAY_ADDRESS``
cluster nothing is changed.

Measured in bench/bench_ray.py (bench/RESULTS.md). This module imports only Ray: the controller
actor unpickles the scaling policy below from here.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

# Read by Ray Train when fit() starts (in the driver, and propagated to the controller actor).
LOCAL_ENV = {
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",   # no spot pre-emption on this machine
    "RAY_TRAIN_METRICS_ENABLED": "0",             # Ray's own metrics (we report ours)
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "1",     # notice the end of training sooner (default 2)
}

try:      # Ray Train V2 internals (2.60); when they move, the stock trainer runs unchanged
    from ray.train.v2._internal.callbacks import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    from ray.train.v2._internal.execution.scaling_policy import FixedScalingPolicy

    class LocalScalingPolicy(FixedScalingPolicy):
        """A fixed worker count that never asks the autoscaling coordinator for resources."""

        def after_controller_start(self, train_run_context) -> None:
            pass

        def _maybe_send_resource_request(self) -> None:
            pass

    from ray.train.v2._internal.execution.controller import placement_group_cleaner as _cleaner_module

    class GcsPlacementGroupCleaner(_cleaner_module.PlacementGroupCleaner):
        """Ray Train's detached placement-group cleaner, asking the GCS whether the controller
        lives: the stock one asks Ray's state API, which needs the dashboard that the local
        cluster here does not start, so it never sees the controller die."""

        def start_monitoring(self):
            _cleaner_module.is_actor_alive = _actor_alive    # this actor's own process only
            return super().start_monitoring()

    class GcsPlacementGroupCleanerCallback(PlacementGroupCleanerCallback):
        def after_controller_start(self, train_run_context) -> None:
            from ray.train.v2._internal.callbacks import placement_group_callback
            placement_group_callback.PlacementGroupCleaner = GcsPlacementGroupCleaner   # the controller's process
            super().after_controller_start(train_run_context)

    _INTERNALS = True
except ImportError:                                 # pragma: no cover - another Ray version
    _INTERNALS = False


def _actor_alive(actor_id: str, timeout: float | None = None) -> bool:
    """Whether the actor lives, from the GCS's actor table (no dashboard needed). When the GCS
    does not answer, alive: the cleaner asks again a second later (an error here would end its
    monitoring for good)."""
    from ray._private import state
    try:
        info = state.actors(actor_id)
    except Exception:   # noqa: BLE001 - see above
        return True
    return bool(info) and info.get("State") != "DEAD"


@contextlib.contextmanager
def local_settings() -> Iterator[None]:
    """:data:`LOCAL_ENV` for one ``fit()`` (a value the user set wins), then as it was: a later
    fit on a ``RAY_ADDRESS`` cluster from the same process gets Ray's defaults."""
    added = {k: v for k, v in LOCAL_ENV.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def local_trainer_class(base: type) -> type:
    """A subclass of the trainer class ``base`` for the local cluster (see the module's text)."""
    if not _INTERNALS or not hasattr(base, "_initialize_and_run_controller"):
        return base

    class LocalTrainer(base):
        def _initialize_and_run_controller(self, **kwargs):
            policy = kwargs.get("scaling_policy")
            if type(policy) is FixedScalingPolicy:
                kwargs["scaling_policy"] = LocalScalingPolicy(policy.scaling_config)
            unused = (PlacementGroupCleanerCallback,) + (() if self.datasets else (DatasetsCallback,))
            kwargs["callbacks"] = [c for c in kwargs.get("callbacks", []) if not isinstance(c, unused)]
            return super()._initialize_and_run_controller(**kwargs)

    LocalTrainer.__name__ = LocalTrainer.__qualname__ = f"Local{base.__name__}"
    return LocalTrainer


def trial_trainer_class(base: type) -> type:
    """A subclass of the trainer class ``base`` for a sweep trial's run on the local cluster. The
    cluster outlives the trial, whose actor Tune may end at any time (ASHA, the budget, an
    interrupt): Ray Train's full start, with a placement-group cleaner that works without the
    dashboard (:class:`GcsPlacementGroupCleaner`), so that a stopped trial's workers' CPUs are
    freed within a second or so and the next trial can start."""
    if not _INTERNALS or not hasattr(base, "_initialize_and_run_controller"):
        return base

    class TrialTrainer(base):
        def _initialize_and_run_controller(self, **kwargs):
            swapped = []
            for c in kwargs.get("callbacks", []):
                if type(c) is PlacementGroupCleanerCallback:
                    gcs = object.__new__(GcsPlacementGroupCleanerCallback)
                    gcs.__dict__.update(c.__dict__)
                    c = gcs
                swapped.append(c)
            kwargs["callbacks"] = swapped
            return super()._initialize_and_run_controller(**kwargs)

    TrialTrainer.__name__ = TrialTrainer.__qualname__ = f"Trial{base.__name__}"
    return TrialTrainer
