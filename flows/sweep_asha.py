"""ASHA whose rungs survive a sweep's restore (driver only; imports Ray Tune).

Ray Tune 2.60 saves a restored experiment's trials, searcher and callbacks, but not the
scheduler's state: ``Tuner.restore`` unpickles the scheduler as it was created, with empty rungs,
so after a restart ASHA would compare resumed and new trials only with what they report from then
on, and a trial that finished before the interrupt would no longer count. :class:`RestorableASHA`
records every result its rungs took (trial id, time, reward) in a JSON file beside the
experiment, rewritten atomically at each, and replays them into its rungs the first time a
restored copy sees a trial.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from ray.tune.schedulers import ASHAScheduler

logger = logging.getLogger(__name__)


def read_history(path: str | Path) -> list[tuple[str, float, float]]:
    """The results a :class:`RestorableASHA` recorded in ``path`` ([] when there is no file);
    ValueError naming the file when it is not such a record."""
    path = Path(path)
    if not path.is_file():
        return []
    try:
        rows = json.loads(path.read_text())["recorded"]
        return [(str(trial_id), float(t), float(reward)) for trial_id, t, reward in rows]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a sweep's ASHA record ({type(exc).__name__}: {exc}); remove it "
                         "to resume without the rungs recorded before the restart") from None


class _Seen:
    """What a rung reads of a trial: its id."""

    def __init__(self, trial_id: str) -> None:
        self.trial_id = trial_id


class RestorableASHA(ASHAScheduler):
    """:class:`ray.tune.schedulers.ASHAScheduler` (one bracket) that keeps its rungs in
    ``history_path`` and takes them back after ``Tuner.restore``."""

    def __init__(self, history_path: str | Path, **kwargs) -> None:
        super().__init__(brackets=1, **kwargs)
        self.history_path = str(history_path)
        self._history: list[list] = []          # [trial_id, time, reward] in the order recorded
        self._replayed = False

    def _replay(self) -> None:
        if self._replayed:
            return
        self._replayed = True
        try:        # checked before the restore (flows.sweep); Tune would swallow an error here
            history = read_history(self.history_path)
        except ValueError as exc:
            logger.warning("%s; ASHA restarts with empty rungs", exc)
            return
        for trial_id, t, reward in history:
            self._brackets[0].on_result(_Seen(trial_id), t, reward)
        self._history = [list(h) for h in history]

    def _note(self, trial_id: str, result: dict) -> None:
        self._history.append([trial_id, float(result[self._time_attr]),
                              float(self._metric_op * result[self._metric])])
        path = Path(self.history_path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"time_attr": self._time_attr, "metric": self._metric,
                                   "recorded": self._history}) + "\n")
        os.replace(tmp, path)

    def on_trial_add(self, tune_controller, trial) -> None:
        self._replay()
        super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        self._replay()
        action = super().on_trial_result(tune_controller, trial, result)
        # the rungs take a result unless it is at max_t (then ASHA stops the trial, and records
        # its final result in on_trial_complete)
        if (self._time_attr in result and self._metric in result
                and not (result[self._time_attr] >= self._max_t and self._stop_last_trials)):
            self._note(trial.trial_id, result)
        return action

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        self._replay()
        super().on_trial_complete(tune_controller, trial, result)
        if self._time_attr in result and self._metric in result:
            self._note(trial.trial_id, result)

    def rungs(self) -> list[tuple[float, dict[str, float]]]:
        """The rungs: (milestone, {trial id: reward}), highest milestone first."""
        return [(m, dict(r)) for m, r in self._brackets[0]._rungs]
