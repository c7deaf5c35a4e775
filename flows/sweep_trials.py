"""What runs in and around each trial of a sweep (:mod:`flows.sweep`): the trial itself, a Ray
Tune function trainable that trains with the library and reports a quick FID at each checkpoint,
and the driver's Tune callback that logs every trial to an MLflow child run of the sweep's parent
run (workers never talk to MLflow). No Prefect here: Ray workers import this module.
"""

from __future__ import annotations

import atexit
import csv
import dataclasses
import io
import json
import math
import os
import re
import shutil
import stat
import tempfile
import time
from pathlib import Path
from typing import Callable

from diffusion.config import Config, config_from_dict
from diffusion.search import point_label, trial_config

DIVERGED_FID = 1e6        # what a trial whose loss became NaN reports, so that ASHA ranks it last
STOP_REASONS = ("completed", "asha", "budget", "diverged", "error", "interrupted")
WORK_PREFIX = "ddpm-trial-"   # a trial's work directory: <tmp>/ddpm-trial-<pid>-<random>


# ------------------------------------------------------------------------------ in a trial

def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:          # another user's process
        return True
    return True


def remove_orphaned_work_dirs(root: str | Path | None = None) -> list[Path]:
    """Remove trial work directories under ``root`` (the temp directory) whose process is gone.
    A trial removes its own as it ends, but when Tune stops a trial (ASHA, the time budget, an
    interrupt) it may end the trial's actor while the trial is between two reports, and a killed
    sweep ends them all; this runs as each trial starts (on its node) and after each search (on
    the driver's). Returns what it removed."""
    removed = []
    for d in sorted(Path(root or tempfile.gettempdir()).glob(f"{WORK_PREFIX}*-*")):
        found = re.fullmatch(rf"{WORK_PREFIX}([0-9]{{1,9}})-.+", d.name)
        if found is None or int(found.group(1)) == os.getpid() or _alive(int(found.group(1))):
            continue
        try:
            st = d.lstat()
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():     # a link, or not ours
            continue
        shutil.rmtree(d, ignore_errors=True)
        if not d.exists():
            removed.append(d)
    return removed


def _work_dir() -> Path:
    remove_orphaned_work_dirs()
    work = Path(tempfile.mkdtemp(prefix=f"{WORK_PREFIX}{os.getpid()}-"))
    atexit.register(shutil.rmtree, work, True)     # an actor that exits in order
    return work


def trial_progress(cfg: Config, step: int, last: dict) -> dict:
    """What each report of a trial carries besides its score: the step, the loss, the training
    minutes (ASHA's time) and whether the trial has reached its end (``final``)."""
    minutes = last.get("train_loop_seconds", 0.0) / 60.0
    budget = cfg.train.budget_minutes
    return {"step": step, "loss": last.get("loss", math.nan), "train_minutes": minutes,
            "final": step >= cfg.train.steps or (budget > 0 and minutes >= budget)}


def diverged(exc: Exception) -> dict:
    """The score of a trial whose loss became NaN: a finished trial, ranked last, no checkpoint."""
    return {"quick_fid": DIVERGED_FID, "yardstick": "", "diverged": True, "error": str(exc), "final": True}


class QuickFid:
    """The sweep's yardstick in the process that scores a trial's checkpoints (the trial's own, or
    rank 0 of its Ray Train workers): the sweep's extractor, sent by value and checked against its
    digest, and :func:`diffusion.evaluate.quick_fid` with the sweep's reference statistics.
    ``cfg.data.prepared_dir`` must be where this process obtained the data."""

    def __init__(self, cfg: Config, setup: dict, work: Path, device: str) -> None:
        from flows.stages import load_extractor
        extractor = setup["extractor"]
        if not isinstance(extractor, bytes):       # an object ref (a trial of several workers)
            import ray
            extractor = ray.get(extractor)
        (work / "extractor.pt").write_bytes(extractor)
        self.cfg = dataclasses.replace(
            cfg, extractor=dataclasses.replace(cfg.extractor, path=str(work / "extractor.pt")),
            evaluate=dataclasses.replace(cfg.evaluate, reference_cache=setup["reference_cache"]))
        self.extractor = load_extractor(self.cfg)
        if self.extractor.sha256 != setup["extractor_sha256"]:
            raise RuntimeError("the trial's extractor differs from the sweep's")
        self.samples, self.device = setup["quick_fid_samples"], device

    def __call__(self, checkpoint: Path) -> dict:
        from diffusion.evaluate import quick_fid
        q = quick_fid(checkpoint, self.cfg, self.extractor, samples=self.samples, device=self.device)
        return {"quick_fid": min(q["fid"], DIVERGED_FID), "yardstick": q["yardstick"], "diverged": False}


def sweep_trial(config: dict, setup: dict) -> None:
    """One trial (a Ray Tune function trainable): train the point's configuration, report a
    quick FID with a checkpoint at every ``sweep.checkpoint_every`` steps. With
    ``sweep.workers_per_trial`` > 1 the trial is a Ray Train run of that many DDP workers
    (:func:`ddp_trial`); else it trains in this process."""
    import torch
    from ray import tune

    from diffusion.data import load_dataset
    from diffusion.trainer import NonFiniteLossError, train
    from flows.datasets import Remote, obtain
    from flows.ray_train import _check_code, copy_training_files

    _check_code(setup["code"])
    point = {k: v for k, v in config["trial"].items() if k != "index"}
    cfg = trial_config(config_from_dict(setup["base"], "sweep base config"), point)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, checkpoint_every=setup["checkpoint_every"]))
    if setup.get("workers_per_trial", 1) > 1:
        return ddp_trial(cfg, setup)
    data = setup["data"]
    got = obtain(data["version"], cfg.data.prepared_dir, Remote(**data["remote"]) if data.get("remote") else None)
    work = _work_dir()
    try:      # Tune copies each reported checkpoint into its storage at tune.report
        cfg = dataclasses.replace(
            cfg, data=dataclasses.replace(cfg.data, prepared_dir=str(got.path)),
            train=dataclasses.replace(cfg.train, out_dir=str(work / "train")))
        device = "cuda" if setup["gpus_per_trial"] > 0 and torch.cuda.is_available() else "cpu"
        score = QuickFid(cfg, setup, work, device)
        if setup["gpus_per_trial"] <= 0:
            torch.set_num_threads(max(1, int(setup["cpus_per_trial"])))
        out = Path(cfg.train.out_dir)
        out.mkdir(parents=True)
        resume = tune.get_checkpoint()
        if resume is not None:
            copy_training_files(resume, out)
        last: dict[str, float] = {}

        def on_checkpoint(step: int, path: Path) -> None:
            tune.report({**score(path), **trial_progress(cfg, step, last)},
                        checkpoint=tune.Checkpoint.from_directory(str(out)))

        try:
            train(cfg, load_dataset(cfg.data), progress=False, on_metrics=lambda s, m: last.update(m, step=s),
                  on_checkpoint=on_checkpoint)
        except NonFiniteLossError as exc:       # a finished trial, ranked last; no checkpoint to keep
            tune.report({**trial_progress(cfg, int(last.get("step", 0)), last), **diverged(exc)})
    finally:
        shutil.rmtree(work, ignore_errors=True)


def ddp_trial(cfg: Config, setup: dict) -> None:
    """A trial as a Ray Train run (:func:`flows.ray_train.ray_train`) of
    ``sweep.workers_per_trial`` DDP workers, which share the trial's CPUs (GPUs) and its global
    batch: rank 0 scores each checkpoint, Ray Train persists it under ``setup["train_storage"]``,
    and this function, Tune's, reports both to Tune, which copies the checkpoint into the trial.
    A resumed trial starts its workers from Tune's last checkpoint. When Tune stops the trial
    (ASHA, the budget, an interrupt), the workers are asked to stop; if Tune ends this actor
    first, Ray ends the run's actors with it (they are its children)."""
    import queue
    import threading
    import uuid

    import ray
    from ray import tune

    from flows.ray_train import ray_run_name, ray_train
    n = int(setup["workers_per_trial"])
    gpus = setup["gpus_per_trial"]
    trial_id = tune.get_context().get_trial_id()
    run = dataclasses.replace(
        cfg.ray, num_workers=n, use_gpu=gpus > 0, cpus_per_worker=setup["cpus_per_trial"] / n,
        gpus_per_worker=gpus / n if gpus > 0 else cfg.ray.gpus_per_worker, max_failures=0,
        storage_path=setup["train_storage"], run_name=f"{setup['sweep']}-trial-{trial_id}-{uuid.uuid4().hex[:6]}")
    # the trial's batch split over its workers (check_trials: it divides), so that the global batch,
    # and with it the recipe, is the one-worker trial's
    cfg = dataclasses.replace(cfg, ray=run, train=dataclasses.replace(cfg.train, batch_size=cfg.train.batch_size // n))
    # what rank 0 scores with (QuickFid) and how ray_train picks its trainer; the extractor goes
    # through the object store, not inside every worker's config
    scoring = {**{k: setup[k] for k in ("extractor_sha256", "reference_cache", "quick_fid_samples", "local")},
               "extractor": ray.put(setup["extractor"])}
    reports: queue.Queue = queue.Queue()
    stop = threading.Event()
    outcome: dict = {}
    resume = tune.get_checkpoint()          # in Tune's thread: its session is this thread's

    def train_run() -> None:
        try:
            ray_train(cfg, on_event=lambda e: reports.put(e) if e.get("kind") == "report" else None,
                      should_stop=stop.is_set, source=setup["data"], trial=scoring,
                      resume_from=resume, local=False)   # the cluster outlives the trial
        except BaseException as exc:   # noqa: BLE001 - raised in Tune's thread below
            outcome["error"] = exc
        finally:
            reports.put(None)

    # Tune stops a function trainable by setting its session's stop event (Tune 2.60), which this
    # thread sees only when it reports: watch it too, so that a stop between two reports ends the
    # Ray Train run (its workers hold the trial's CPUs) at once
    from ray.train._internal.session import get_session
    stopping = getattr(get_session(), "stop_event", None) or threading.Event()
    runner = threading.Thread(target=train_run, name="sweep-trial-ray-train", daemon=True)
    runner.start()
    try:
        while not stopping.is_set():
            try:
                event = reports.get(timeout=0.5)
            except queue.Empty:
                continue
            if event is None:
                break
            tune.report(event["metrics"], checkpoint=event["checkpoint"])
    finally:            # the run is over, or Tune stopped the trial (its report raises then)
        stop.set()
        runner.join()
        if setup["local"] and "://" not in setup["train_storage"]:
            shutil.rmtree(Path(setup["train_storage"]) / ray_run_name(cfg), ignore_errors=True)
    if "error" in outcome:
        raise outcome["error"]


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
        self.yardsticks: set[str] = set()
        self.pids: set[int] = set()
        self._client = None

    def __getstate__(self) -> dict:
        # Tune pickles its callbacks into the experiment's tuner.pkl: no tracking URI there (it may
        # carry a token); a restored sweep replaces the callback with one of its own
        return {**self.__dict__, "uri": None, "_client": None, "on_event": None}

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
        if isinstance(result.get("pid"), int):
            self.pids.add(result["pid"])        # the trial's process (its work dir: ddpm-trial-<pid>-*)
        if "quick_fid" not in result:
            return
        self.last[trial.trial_id] = dict(result)
        now, step = int(time.time() * 1000), int(result["step"])
        values = {"loss": result.get("loss"), "train_minutes": result.get("train_minutes")}
        if not result.get("diverged"):
            values["quick_fid"] = result["quick_fid"]
        metrics = [Metric(k, float(v), now, step) for k, v in values.items()
                   if v is not None and math.isfinite(float(v))]
        run_id = self.child(trial)
        self.client.log_batch(run_id, metrics=metrics)
        stick = result.get("yardstick")
        if stick and stick not in self.yardsticks:     # every trial should report the same one
            self.yardsticks.add(stick)
            self.client.set_tag(run_id, "quick_fid_yardstick", stick)
            self.client.set_tag(self.parent, "quick_fid_yardsticks", ",".join(sorted(self.yardsticks)))
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

    def end_stopped(self, trial_id: str, reason: str) -> None:
        """A trial Tune stopped without a callback (its time budget stops every running trial)."""
        run_id = self.runs.get(trial_id)
        self.reasons[trial_id] = reason
        if run_id is not None:
            self.client.set_tag(run_id, "stop_reason", reason)
            self.client.set_terminated(run_id, "FINISHED")

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



def parent_run(cfg: Config, uri: str, state_file: Path, name: str, points: list[dict]) -> str:
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
              "sweep.quick_fid_samples": s.quick_fid_samples, "sweep.checkpoint_every": s.checkpoint_every,
              "sweep.seed": s.seed,
              "sweep.space": json.dumps(s.space, sort_keys=True)}
    client.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
    client.log_dict(run.info.run_id, {"points": points}, "sweep/points.json")
    state_file.parent.mkdir(parents=True, exist_ok=True)
    state_file.write_text(json.dumps({"parent_run_id": run.info.run_id}) + "\n")
    return run.info.run_id


def trial_rows(grid, track: SweepTracker) -> list[dict]:
    rows = []
    # a trial that reported nothing has no config in its result once restored from disk
    configs = {t.trial_id: t.config for t in getattr(getattr(grid, "_experiment_analysis", None), "trials", None) or []}
    for result in grid:
        trial_id = (result.metrics or {}).get("trial_id") or _trial_id_of(Path(result.path).name)
        trial_cfg = (result.config or configs[trial_id])["trial"]
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


def _trial_id_of(dirname: str) -> str:
    """The trial id in a Tune trial directory's name (``sweep_trial_4e306_00001_1_...``), for a
    trial that reported nothing."""
    found = re.search(r"_([0-9a-f]{5}_\d{5})_", dirname)
    return found.group(1) if found else dirname


def log_parent(client, parent: str, rows: list[dict], best: dict | None) -> None:
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
