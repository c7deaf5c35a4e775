"""``ddpm-sweep``: a budgeted Ray Tune search over ``sweep.space`` with early stopping on a quick
FID, each trial a child run of one MLflow parent run, the best checkpoint through the gate.

    python -m flows.sweep [--params params.yaml] [section.key=value ...] [--verbose]

Trials run on the Ray cluster of :func:`flows.ray_train.init_ray` (``RAY_ADDRESS``, else a local
one). Each trial trains with the library trainer on the data of one DVC version (obtained like a
Ray Train worker obtains it) and, at each checkpoint, reports a quick FID
(:func:`diffusion.evaluate.quick_fid`) under one yardstick for all trials. ASHA compares trials at
equal *training minutes* (the library's training-loop wall clock, counted over resumes) and stops
the weak ones. Workers never talk to MLflow: a Tune callback on the driver logs each trial to a
child run of the sweep's parent run. Tune's experiment lives under
``sweep.storage_path/<sweep.name>-<hash of config and data>``; running the same sweep again
restores it: finished trials are kept, unfinished ones resume from their last checkpoint. The
best checkpoint gets the pipeline's evaluate and register stages (the champion gate decides).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

if __name__ == "__main__":      # the command: a light parent that relays signals to the job
    from flows.interrupts import supervise
    supervise("flows.sweep")

# no usage reporting from offline machines; a first ephemeral server start outlasts 20 s on 2 cores
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
# a snapshot of Tune's state per reported checkpoint is what resuming needs (each ~10 ms): no warning
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")

from prefect import flow  # noqa: E402

from diffusion.config import Config, ConfigError, config_from_dict, load_config  # noqa: E402
from diffusion.search import draw_points, point_label, trial_config  # noqa: E402

FLOW_NAME = "ddpm-sweep"
DIVERGED_FID = 1e6        # what a trial whose loss became NaN reports, so that ASHA ranks it last
STOP_REASONS = ("completed", "asha", "budget", "diverged", "error", "interrupted")


# ------------------------------------------------------------------------------ in a trial

def sweep_trial(config: dict, setup: dict) -> None:
    """One trial (a Ray Tune function trainable): train the point's configuration, report a
    quick FID with a checkpoint at every ``train.checkpoint_every`` steps."""
    import torch
    from ray import tune

    from diffusion.data import load_dataset
    from diffusion.evaluate import quick_fid
    from diffusion.trainer import CHECKPOINT_NAME, METRICS_NAME, NonFiniteLossError, train
    from flows.datasets import Remote, obtain
    from flows.ray_train import _check_code
    from flows.stages import load_extractor

    _check_code(setup["code"])
    point = {k: v for k, v in config["trial"].items() if k != "index"}
    cfg = trial_config(config_from_dict(setup["base"], "sweep base config"), point)
    data = setup["data"]
    got = obtain(data["version"], cfg.data.prepared_dir, Remote(**data["remote"]) if data.get("remote") else None)
    work = Path(tempfile.mkdtemp(prefix="ddpm-trial-"))
    (work / "extractor.pt").write_bytes(setup["extractor"])         # the sweep's, by value
    cfg = dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, prepared_dir=str(got.path)),
        train=dataclasses.replace(cfg.train, out_dir=str(work / "train")),
        extractor=dataclasses.replace(cfg.extractor, path=str(work / "extractor.pt")),
        evaluate=dataclasses.replace(cfg.evaluate, reference_cache=setup["reference_cache"]))
    extractor = load_extractor(cfg)
    if extractor.sha256 != setup["extractor_sha256"]:
        raise RuntimeError("the trial's extractor differs from the sweep's")
    if setup["gpus_per_trial"] <= 0:
        torch.set_num_threads(max(1, int(setup["cpus_per_trial"])))
    out = Path(cfg.train.out_dir)
    out.mkdir(parents=True)
    resume = tune.get_checkpoint()
    if resume is not None:
        with resume.as_directory() as d:
            for name in (CHECKPOINT_NAME, METRICS_NAME):
                if (Path(d) / name).exists():
                    shutil.copy(Path(d) / name, out / name)
    last: dict[str, float] = {}
    device = "cuda" if setup["gpus_per_trial"] > 0 and torch.cuda.is_available() else "cpu"

    def progress(step: int) -> dict:
        minutes = last.get("train_loop_seconds", 0.0) / 60.0
        budget = cfg.train.budget_minutes
        return {"step": step, "loss": last.get("loss", math.nan), "train_minutes": minutes,
                "final": step >= cfg.train.steps or (budget > 0 and minutes >= budget)}

    def on_checkpoint(step: int, path: Path) -> None:
        q = quick_fid(path, cfg, extractor, samples=setup["quick_fid_samples"], device=device)
        tune.report({"quick_fid": min(q["fid"], DIVERGED_FID), "yardstick": q["yardstick"], "diverged": False,
                     **progress(step)}, checkpoint=tune.Checkpoint.from_directory(str(out)))

    try:
        train(cfg, load_dataset(cfg.data), progress=False, on_metrics=lambda s, m: last.update(m),
              on_checkpoint=on_checkpoint)
    except NonFiniteLossError as exc:       # a finished trial, ranked last; no checkpoint to keep
        tune.report({"quick_fid": DIVERGED_FID, "yardstick": "", "diverged": True, "error": str(exc),
                     **progress(int(last.get("step", 0))), "final": True})


# ------------------------------------------------------------------------------ on the driver

def _tune_callback_base() -> type:
    from ray.tune import Callback
    return Callback


class SweepTracker:
    """The driver's Tune callback (made a :class:`ray.tune.Callback` by :func:`tracker`): one MLflow
    child run per trial, found again by its trial id when a sweep resumes; params are the trial's
    point, metrics ``loss``, ``quick_fid`` and ``train_minutes`` by step, the tag ``stop_reason``
    one of :data:`STOP_REASONS`. ``on_event`` receives ``{"kind": "start" | "result" | "end", ...}``."""

    def __init__(self, uri: str, parent_run_id: str, experiment_id: str, budget_s: float,
                 scheduler: str, on_event: Callable[[dict], None] | None = None) -> None:
        self.uri, self.parent, self.experiment_id = uri, parent_run_id, experiment_id
        self.budget_s, self.scheduler, self.on_event = budget_s, scheduler, on_event
        self.started = time.monotonic()
        self.runs: dict[str, str] = {}
        self.last: dict[str, dict] = {}
        self.reasons: dict[str, str] = {}
        self._client = None

    def __getstate__(self) -> dict:                  # Tune pickles its callbacks with the experiment
        return {**self.__dict__, "_client": None, "on_event": None}

    @property
    def client(self):
        if self._client is None:
            from flows.tracking import client_for
            self._client = client_for(self.uri)
        return self._client

    def _emit(self, event: dict) -> None:
        if self.on_event is not None:
            self.on_event(event)

    def lookup(self, trial_id: str):
        """The child run of ``trial_id`` made by this sweep (in this or an earlier process), or None."""
        found = self.client.search_runs(
            [self.experiment_id], f"tags.`mlflow.parentRunId` = '{self.parent}' and tags.trial_id = '{trial_id}'")
        return found[0] if found else None

    def child(self, trial) -> str:
        if trial.trial_id in self.runs:
            return self.runs[trial.trial_id]
        found = [run for run in [self.lookup(trial.trial_id)] if run is not None]
        if found:
            run_id = found[0].info.run_id
            if found[0].info.status != "RUNNING":
                self.client.update_run(run_id, status="RUNNING")
        else:
            point = {k: v for k, v in trial.config["trial"].items() if k != "index"}
            index = trial.config["trial"]["index"]
            run = self.client.create_run(self.experiment_id, run_name=f"trial-{index:02d} {point_label(point)}",
                                         tags={"mlflow.parentRunId": self.parent, "trial_id": trial.trial_id,
                                               "trial_index": str(index), "sweep_trial": "true"})
            run_id = run.info.run_id
            from mlflow.entities import Param
            self.client.log_batch(run_id, params=[Param(k, str(v)) for k, v in sorted(point.items())]
                                  + [Param("trial_index", str(index))])
        self.runs[trial.trial_id] = run_id
        return run_id

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.child(trial)
        self._emit({"kind": "start", "trial_id": trial.trial_id, "index": trial.config["trial"]["index"]})

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        from mlflow.entities import Metric
        if "quick_fid" not in result:
            return
        self.last[trial.trial_id] = dict(result)
        now, step = int(time.time() * 1000), int(result["step"])
        values = {"loss": result.get("loss"), "train_minutes": result.get("train_minutes")}
        if not result.get("diverged"):
            values["quick_fid"] = result["quick_fid"]
        metrics = [Metric(k, float(v), now, step) for k, v in values.items()
                   if v is not None and math.isfinite(float(v))]
        self.client.log_batch(self.child(trial), metrics=metrics)
        self._emit({"kind": "result", "trial_id": trial.trial_id, "index": trial.config["trial"]["index"],
                    **{k: result.get(k) for k in ("step", "quick_fid", "train_minutes", "diverged")}})

    def reason(self, trial) -> str:
        last = self.last.get(trial.trial_id, {})
        if last.get("diverged"):
            return "diverged"
        if last.get("final"):
            return "completed"
        if time.monotonic() - self.started >= 0.97 * self.budget_s:
            return "budget"
        return "asha" if self.scheduler == "asha" else "budget"

    def _end(self, trial, reason: str, status: str, error: str = "") -> None:
        run_id = self.child(trial)
        self.reasons[trial.trial_id] = reason
        self.client.set_tag(run_id, "stop_reason", reason)
        last = self.last.get(trial.trial_id, {})
        if error or last.get("error"):
            self.client.set_tag(run_id, "error", (error or last.get("error", ""))[:5000])
        self.client.set_terminated(run_id, status)
        self._emit({"kind": "end", "trial_id": trial.trial_id, "index": trial.config["trial"]["index"],
                    "reason": reason, "step": last.get("step", 0), "quick_fid": last.get("quick_fid")})

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._end(trial, self.reason(trial), "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        error = str(getattr(trial, "error_msg", "") or "")
        self._end(trial, "error", "FAILED", error or "the trial failed (see the log file)")

    def close_unfinished(self) -> None:
        """After an interrupted sweep: the child runs of trials that will resume end KILLED."""
        for trial_id, run_id in self.runs.items():
            if trial_id not in self.reasons:
                self.client.set_tag(run_id, "stop_reason", "interrupted")
                self.client.set_terminated(run_id, "KILLED")


def tracker(*args, **kwargs) -> SweepTracker:
    """A :class:`SweepTracker` that is a Tune ``Callback`` (Ray is imported only here)."""
    cls = type("SweepCallback", (SweepTracker, _tune_callback_base()), {})
    return cls(*args, **kwargs)


def sweep_name(cfg: Config, dataset: str) -> str:
    """``sweep.name`` plus a hash of what the trials depend on: the base configuration, the sweep
    section (without where it is stored and how many trials run at once) and the data version."""
    s = {k: v for k, v in cfg.to_dict()["sweep"].items() if k not in ("storage_path", "name", "max_concurrent")}
    blob = json.dumps([cfg.hash(), s, dataset], sort_keys=True)
    return f"{cfg.sweep.name}-{hashlib.sha256(blob.encode()).hexdigest()[:8]}"


def max_concurrent(cfg: Config, resources: dict[str, float]) -> int:
    """``sweep.max_concurrent``, or for ``auto`` the trials the cluster holds at once: its CPUs (its
    GPUs when trials use GPUs) over what one trial asks for, at least 1."""
    s = cfg.sweep
    if s.max_concurrent != "auto":
        return int(s.max_concurrent)
    if s.gpus_per_trial > 0:
        return max(1, int(resources.get("GPU", 0.0) // s.gpus_per_trial))
    return max(1, int(resources.get("CPU", 1.0) // s.cpus_per_trial))


@dataclass
class SearchResult:
    name: str                 # Tune's experiment name (sweep.name + hash)
    path: Path                # the experiment directory
    parent_run_id: str
    tracking_uri: str
    trials: list[dict]        # one row per trial: index, point, status, stop reason, steps, quick FID
    best: dict | None         # the best row, with its checkpoint path
    restored: bool
    seconds: float


def _parent_run(cfg: Config, uri: str, state_file: Path, name: str, points: list[dict]) -> str:
    """The sweep's MLflow parent run: the one this sweep made before (kept in ``state_file``), or new."""
    from mlflow.entities import Param

    from flows.tracking import client_for, experiment_id, source_tags
    client = client_for(uri)
    if state_file.is_file():
        run_id = json.loads(state_file.read_text())["parent_run_id"]
        client.update_run(run_id, status="RUNNING")
        return run_id
    run = client.create_run(experiment_id(client, cfg), run_name=f"sweep {name}",
                            tags={"sweep": name, "params_hash": cfg.hash(),
                                  **source_tags("flows/sweep.py", False)})
    s = cfg.sweep
    params = {"sweep.trials": s.trials, "sweep.budget_minutes": s.budget_minutes, "sweep.scheduler": s.scheduler,
              "sweep.grace_minutes": s.grace_minutes, "sweep.reduction_factor": s.reduction_factor,
              "sweep.quick_fid_samples": s.quick_fid_samples, "sweep.seed": s.seed,
              "sweep.space": json.dumps(s.space, sort_keys=True)}
    client.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
    client.log_dict(run.info.run_id, {"points": points}, "sweep/points.json")
    state_file.parent.mkdir(parents=True, exist_ok=True)
    state_file.write_text(json.dumps({"parent_run_id": run.info.run_id}) + "\n")
    return run.info.run_id


def run_search(cfg: Config, on_event: Callable[[dict], None] | None = None) -> SearchResult:
    """The search itself (no evaluation or registration): start or restore Tune's experiment, run
    it within ``sweep.budget_minutes``, log the trials and the table of all trials on the parent
    run. An interrupted search (SIGINT / SIGUSR1 to this process) keeps its state and raises
    :class:`flows.interrupts.Interrupted`; running it again resumes."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from diffusion.data import load_prepared
    from diffusion.evaluate import reference_stats
    from diffusion.prepare import dataset_version
    from flows.ray_train import _git_commit, cluster_name, code_version, data_source, init_ray
    from flows.stages import StageError, load_extractor
    from flows.tracking import client_for, tracking_uri
    started = time.perf_counter()
    s = cfg.sweep
    if not s.space:
        raise ConfigError("sweep.space = {}: name at least one config key to vary, e.g. "
                          "sweep.space={train.lr: [1.0e-3, 2.0e-3]}")
    version = dataset_version(cfg.data.prepared_dir)
    try:
        extractor = load_extractor(cfg)
    except Exception as exc:
        raise StageError(f"{cfg.extractor.path}: {exc}; run the extractor stage first "
                         "(python -m flows.stages extractor)") from None
    cache = str(Path(cfg.evaluate.reference_cache).absolute())     # warm once, shared by every trial
    reference_stats(cache, load_prepared(cfg.data.prepared_dir, "train"), extractor, dataset=version, split="train")
    init_ray()
    resources = ray.cluster_resources()
    if s.gpus_per_trial > 0 and resources.get("GPU", 0) < s.gpus_per_trial:
        raise ConfigError(f"sweep.gpus_per_trial = {s.gpus_per_trial:g}: {cluster_name()} has "
                          f"{resources.get('GPU', 0):g} GPUs")
    name = sweep_name(cfg, version)
    storage = Path(s.storage_path).absolute()
    path = storage / name
    points = [{"index": i, **p} for i, p in enumerate(draw_points(s.space, s.trials, s.seed))]
    uri = tracking_uri(cfg)
    parent = _parent_run(cfg, uri, storage / f"{name}.sweep.json", name, points)
    client = client_for(uri)
    track = tracker(uri, parent, client.get_run(parent).info.experiment_id, s.budget_minutes * 60.0,
                    s.scheduler, on_event)
    setup = {"base": dataclasses.replace(cfg, data=dataclasses.replace(
                 cfg.data, prepared_dir=str(Path(cfg.data.prepared_dir).absolute()))).to_dict(),
             "data": data_source(cfg, version), "code": {**code_version(), "git": _git_commit()},
             "extractor": Path(cfg.extractor.path).read_bytes(), "extractor_sha256": extractor.sha256,
             "reference_cache": cache, "quick_fid_samples": s.quick_fid_samples,
             "cpus_per_trial": s.cpus_per_trial, "gpus_per_trial": s.gpus_per_trial}
    trainable = tune.with_resources(tune.with_parameters(sweep_trial, setup=setup),
                                    {"cpu": s.cpus_per_trial, "gpu": s.gpus_per_trial})
    param_space = {"trial": tune.grid_search(points)}
    restored = tune.Tuner.can_restore(str(path))
    if restored:
        tuner = tune.Tuner.restore(str(path), trainable, resume_errored=True, param_space=param_space)
        tuner._local_tuner.get_run_config().callbacks = [track]    # this process's MLflow callback
    else:
        trial_minutes = cfg.train.budget_minutes if cfg.train.budget_minutes > 0 else s.budget_minutes
        scheduler = (ASHAScheduler(time_attr="train_minutes", max_t=trial_minutes,
                                   grace_period=min(s.grace_minutes, trial_minutes),
                                   reduction_factor=s.reduction_factor)
                     if s.scheduler == "asha" else FIFOScheduler())
        tuner = tune.Tuner(
            trainable, param_space=param_space,
            tune_config=tune.TuneConfig(metric="quick_fid", mode="min", scheduler=scheduler,
                                        max_concurrent_trials=max_concurrent(cfg, resources),
                                        time_budget_s=s.budget_minutes * 60.0,
                                        reuse_actors=True),      # no new process (torch import) per trial
            run_config=tune.RunConfig(
                name=name, storage_path=str(storage), callbacks=[track], verbose=0,
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute="quick_fid",
                                                        checkpoint_score_order="min"),
                failure_config=tune.FailureConfig(max_failures=0)))
    grid = tuner.fit()
    rows = _trial_rows(grid, track)
    from flows import interrupts
    statuses = [t.status for t in getattr(getattr(grid, "_experiment_analysis", None), "trials", None) or []]
    out_of_time = time.monotonic() - track.started >= 0.97 * track.budget_s
    if any(status not in ("TERMINATED", "ERROR") for status in statuses) or (
            len(statuses) < len(points) and not out_of_time):       # interrupted: Tune kept its state
        track.close_unfinished()
        client.set_terminated(parent, "KILLED")
        raise interrupts.Interrupted(interrupts.received() or 2)
    scored = [r for r in rows if r.get("checkpoint")]
    best = min(scored, key=lambda r: r["best_quick_fid"]) if scored else None
    _log_parent(client, parent, rows, best)
    return SearchResult(name, path, parent, uri, rows, best, restored, time.perf_counter() - started)


def _trial_rows(grid, track: SweepTracker) -> list[dict]:
    rows = []
    for result in grid:
        trial_cfg = result.config["trial"]
        trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name
        if trial_id not in track.reasons:                # finished in an earlier run of this sweep
            run = track.lookup(trial_id)
            if run is not None:
                track.runs[trial_id] = run.info.run_id
                if "stop_reason" in run.data.tags:
                    track.reasons[trial_id] = run.data.tags["stop_reason"]
        best_ckpt, best_fid = None, math.inf
        for ckpt, metrics in result.best_checkpoints or []:
            if not metrics.get("diverged") and metrics["quick_fid"] < best_fid:
                best_ckpt, best_fid, best_step = ckpt, metrics["quick_fid"], metrics["step"]
        df = result.metrics_dataframe
        steps = int(df["step"].max()) if df is not None and "step" in df else 0
        rows.append({"index": trial_cfg["index"], "trial_id": trial_id,
                     "point": {k: v for k, v in trial_cfg.items() if k != "index"},
                     "stop_reason": track.reasons.get(trial_id) or ("error" if result.error else "unknown"),
                     "steps": steps, "best_quick_fid": best_fid if best_ckpt else None,
                     "best_step": best_step if best_ckpt else None,
                     "checkpoint": best_ckpt.path if best_ckpt else None,
                     "mlflow_run_id": track.runs.get(trial_id)})
    return sorted(rows, key=lambda r: r["index"])


def _log_parent(client, parent: str, rows: list[dict], best: dict | None) -> None:
    """On the parent run: the best configuration (params ``best.<key>``), ``best_quick_fid`` and
    the table of all trials (``sweep/trials.csv`` and ``.json``)."""
    from mlflow.entities import Metric, Param
    keys = sorted({k for r in rows for k in r["point"]})
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["index", *keys, "stop_reason", "steps", "best_quick_fid", "best_step", "mlflow_run_id"])
    for r in rows:
        writer.writerow([r["index"], *[r["point"].get(k) for k in keys], r["stop_reason"], r["steps"],
                         r["best_quick_fid"], r["best_step"], r["mlflow_run_id"]])
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "trials.csv").write_text(buf.getvalue())
        (Path(tmp) / "trials.json").write_text(json.dumps(rows, indent=2, default=str) + "\n")
        client.log_artifacts(parent, tmp, "sweep")
    if best is not None:
        existing = client.get_run(parent).data.params
        params = [Param(f"best.{k}", str(v)) for k, v in sorted(best["point"].items())
                  if f"best.{k}" not in existing]
        client.log_batch(parent, params=params, metrics=[
            Metric("best_quick_fid", best["best_quick_fid"], int(time.time() * 1000), int(best["best_step"]))])
        client.set_tag(parent, "best_trial_index", str(best["index"]))
        client.set_tag(parent, "best_trial_run_id", str(best["mlflow_run_id"]))
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["stop_reason"]] = counts.get(r["stop_reason"], 0) + 1
    client.set_tag(parent, "trials_by_stop_reason", json.dumps(counts, sort_keys=True))


def best_config(cfg: Config, search: SearchResult) -> Config:
    """The best trial's configuration, its outputs beside the experiment (``<name>-best/``)."""
    out = search.path.parent / f"{search.name}-best"
    best = trial_config(cfg, search.best["point"])
    return dataclasses.replace(
        best, train=dataclasses.replace(best.train, out_dir=str(out)),
        evaluate=dataclasses.replace(best.evaluate, metrics_path=str(out / "eval.json"),
                                     grid_path=str(out / "samples.png")))


def prepare_best(cfg: Config, search: SearchResult) -> Config:
    """Copy the best checkpoint where the evaluate and register stages read it, with the
    ``run.json`` that names its child run as the model's run."""
    from diffusion.checkpoint import load_checkpoint
    from flows.stages import RUN_INFO, StageError
    if search.best is None:
        raise StageError(f"sweep {search.name}: no trial reported a usable checkpoint")
    best = best_config(cfg, search)
    out = Path(best.train.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(search.best["checkpoint"]) / "checkpoint.pt", out / "checkpoint.pt")
    step = int(load_checkpoint(out / "checkpoint.pt")["step"])
    (out / RUN_INFO).write_text(json.dumps({
        "step": step, "checkpoint": str(out / "checkpoint.pt"), "mlflow_run_id": search.best["mlflow_run_id"],
        "tracking_uri": search.tracking_uri, "ray_run_name": search.name}, indent=2) + "\n")
    return best


def register_best(best: Config, search: SearchResult, flow_run_id: str | None = None) -> dict:
    """The pipeline's register stage on the best checkpoint; its version (and the trial's run)
    carry the sweep's parent run id, and the parent run ends FINISHED."""
    from flows.stages import register_stage
    from flows.tracking import client_for
    reg = register_stage(best, flow_run_id)
    client = client_for(search.tracking_uri)
    version = reg.get("duplicate_of") or reg["version"]
    client.set_model_version_tag(reg["name"], version, "sweep_parent_run_id", search.parent_run_id)
    client.set_model_version_tag(reg["name"], version, "sweep", search.name)
    client.set_tag(search.parent_run_id, "registered", f"{reg['name']} version {version} -> {reg['alias']}")
    client.set_terminated(search.parent_run_id, "FINISHED")
    return reg


# ------------------------------------------------------------------------------ flow and command

def _trial_line(event: dict) -> str | None:
    """The console's line for a trial event (results are not shown: one line per trial end)."""
    if event["kind"] == "end":
        fid = event.get("quick_fid")
        score = f", quick FID {fid:.2f}" if fid is not None and fid < DIVERGED_FID else ""
        return f"  sweep: trial {event['index']} ended ({event['reason']}) at step {event['step']}{score}"
    return None


def sweep_flow_body(params_file: str, overrides: list[str] | None) -> dict:
    """sweep -> evaluate (the best checkpoint, full FID) -> register (the champion gate)."""
    from flows.console import console
    from flows.stages import evaluate_stage
    started = time.perf_counter()
    cfg = load_config(params_file, overrides or [])
    out = console()

    def on_event(event: dict) -> None:
        line = _trial_line(event)
        if line:
            out.line(line)
    flow_run_id = None
    try:
        from prefect.runtime import flow_run
        flow_run_id = str(flow_run.id or "") or None
    except Exception:   # noqa: BLE001 - outside a flow run
        pass
    with out.stage("sweep") as info:
        search = run_search(cfg, on_event)
        info["detail"] = (f"{len(search.trials)} trials" + (" (resumed)" if search.restored else "")
                          + (f", best quick FID {search.best['best_quick_fid']:.2f} (trial "
                             f"{search.best['index']}: {point_label(search.best['point'])})" if search.best else ""))
    best = prepare_best(cfg, search)
    with out.stage("evaluate") as info:
        metrics = evaluate_stage(best, progress=False)
        info["detail"] = f"FID {metrics['fid']:.2f} ± {metrics['fid_std']:.2f} (floor {metrics['floor_fid']:.2f})"
    with out.stage("register") as info:
        reg = register_best(best, search, flow_run_id)
        info["detail"] = f"{reg['name']} version {reg.get('duplicate_of') or reg['version']} -> {reg['alias']}"
    counts: dict[str, int] = {}
    for row in search.trials:
        counts[row["stop_reason"]] = counts.get(row["stop_reason"], 0) + 1
    return {"sweep": search.name, "trials": len(search.trials), "stop_reasons": counts,
            "best": search.best["point"], "best_quick_fid": search.best["best_quick_fid"],
            "fid": metrics["fid"], "fid_std": metrics["fid_std"], "model": reg["name"],
            "version": reg.get("duplicate_of") or reg["version"], "alias": reg["alias"],
            "parent_run_id": search.parent_run_id, "tracking_uri": search.tracking_uri,
            "seconds": round(time.perf_counter() - started, 1)}


@flow(name=FLOW_NAME, log_prints=True)
def ddpm_sweep(params_file: str = "params.yaml", overrides: list[str] | None = None) -> dict:
    """A budgeted Ray Tune search over sweep.space; the best trial through the champion gate."""
    return sweep_flow_body(params_file, overrides)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--verbose", action="store_true",
                        help="show Prefect's, Ray's and MLflow's own output on the console")
    parser.add_argument("--log-dir", default="runs/logs", help="where the run's log file goes")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_intermixed_args(argv)
    try:                                  # bad input: named, exit 2, before anything starts
        cfg = load_config(args.params, args.overrides)
        if not cfg.sweep.space:
            raise ConfigError(f"{args.params}: sweep.space is empty: name at least one config key to vary")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from flows import interrupts
    from flows.console import console, quiet_console
    with interrupts.handled():
        try:
            if args.verbose:
                return _main(args)
            log_path = Path(args.log_dir) / f"sweep-{time.strftime('%Y%m%d-%H%M%S')}.log"
            with quiet_console(log_path, restore=False) as out:
                out.line(f"{FLOW_NAME}: library output goes to {log_path}")
                return _main(args)
        except interrupts.Interrupted as exc:
            console().line(f"interrupted ({exc}); run the same command again to resume the sweep")
            return exc.exit_code


def _main(args: argparse.Namespace) -> int:
    from flows.console import console
    out = console()
    from prefect.settings import PREFECT_API_URL
    api = PREFECT_API_URL.value()
    out.line(f"Prefect: {api}" if api else "Prefect: starting a temporary API server")
    try:
        state = ddpm_sweep(args.params, args.overrides, return_state=True)
    except Exception as exc:      # Prefect itself could not start
        out.error(f"{FLOW_NAME} could not run: {type(exc).__name__}: {str(exc)[:2000]}")
        return 1
    if not state.is_completed():
        out.error(f"{FLOW_NAME} ended {state.name}: {state.message}")
        return 1
    s = state.result()
    out.line(f"\n{FLOW_NAME} finished in {s['seconds']:.0f} s\n"
             f"  sweep           : {s['sweep']}, {s['trials']} trials ("
             + ", ".join(f"{n} {r}" for r, n in sorted(s["stop_reasons"].items())) + ")\n"
             f"  best trial      : {point_label(s['best'])}, quick FID {s['best_quick_fid']:.3f}\n"
             f"  FID             : {s['fid']:.3f} ± {s['fid_std']:.3f}\n"
             f"  registered      : {s['model']} version {s['version']} -> alias '{s['alias']}'\n"
             f"  MLflow parent   : run {s['parent_run_id']} (its trials are its child runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
