"""``ddpm-sweep``: a budgeted Ray Tune search over ``sweep.space`` with early stopping on a quick
FID, each trial a child run of one MLflow parent run, the best checkpoint through the gate.

    python -m flows.sweep [--params params.yaml] [section.key=value ...] [--verbose]

Trials run on the Ray cluster of :func:`flows.ray_train.init_ray` (``RAY_ADDRESS``, else a local
one). Each trial trains with the library trainer on the data of one DVC version (obtained like a
Ray Train worker obtains it), or with ``sweep.workers_per_trial`` > 1 as a Ray Train DDP run of
that many workers (:func:`flows.sweep_trials.ddp_trial`), and, at each checkpoint, reports a quick FID
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
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

if __name__ == "__main__":      # the command: a light parent that relays signals to the job
    from flows.interrupts import supervise
    supervise("flows.sweep")

# no usage reporting from offline machines; a first ephemeral server start outlasts 20 s on 2 cores
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
# a snapshot of Tune's state per reported checkpoint is what resuming needs (each ~10 ms): no warning
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")

from prefect import flow  # noqa: E402

from diffusion.config import Config, ConfigError, load_config, redact_url  # noqa: E402
from diffusion.search import draw_points, point_label, trial_config  # noqa: E402

from flows import interrupts  # noqa: E402
from flows.sweep_trials import (DIVERGED_FID, STOP_REASONS, _alive, parent_run, log_parent,  # noqa: E402
                                 remove_orphaned_work_dirs, sweep_trial, trial_rows, tracker)

FLOW_NAME = "ddpm-sweep"
__all__ = ["DIVERGED_FID", "STOP_REASONS", "SearchResult", "ddpm_sweep", "prepare_best", "register_best",
           "run_search"]


def sweep_name(cfg: Config, dataset: str, extractor_sha256: str) -> str:
    """``sweep.name`` plus a hash of what the trials depend on: the base configuration, the sweep
    section (without where it is stored and how many trials run at once), the data version and
    the extractor (a retrained one is another yardstick: a new experiment)."""
    s = {k: v for k, v in cfg.to_dict()["sweep"].items() if k not in ("storage_path", "name", "max_concurrent")}
    blob = json.dumps([cfg.hash(), s, dataset, extractor_sha256], sort_keys=True)
    return f"{cfg.sweep.name}-{hashlib.sha256(blob.encode()).hexdigest()[:8]}"


def check_trials(cfg: Config) -> None:
    """Build every drawn point's trial configuration before anything starts, so a cross-field
    error (``model.num_heads`` against a preset's channels) names its trial and the point's
    ``sweep.space`` keys; each trial needs a training budget (``train.budget_minutes`` > 0: also
    ASHA's last rung). Raises :class:`ConfigError`."""
    s = cfg.sweep
    if not s.space:
        raise ConfigError("sweep.space = {}: name at least one config key to vary, e.g. "
                          "sweep.space={train.lr: [1.0e-3, 2.0e-3]}")
    errors = [] if cfg.train.budget_minutes > 0 else [
        f"train.budget_minutes = {cfg.train.budget_minutes:g}: a sweep needs a per-trial budget (ASHA's "
        "last rung), e.g. train.budget_minutes=5"]
    n = s.workers_per_trial
    if n > 1 and s.gpus_per_trial > 0 and (s.gpus_per_trial % n or s.gpus_per_trial < n):
        errors.append(f"sweep.gpus_per_trial = {s.gpus_per_trial:g} over sweep.workers_per_trial = {n}: each "
                      "worker needs a whole GPU of its own (NCCL ranks cannot share one)")
    if not os.environ.get("RAY_ADDRESS") and s.cpus_per_trial > (os.cpu_count() or 1):
        errors.append(f"sweep.cpus_per_trial = {s.cpus_per_trial:g}: this machine's local Ray cluster has "
                      f"{os.cpu_count()} CPUs; lower it, or set RAY_ADDRESS to a larger cluster")
    for i, point in enumerate(draw_points(s.space, s.trials, s.seed)):
        keys = ", ".join(f"sweep.space.{k}" for k in point)
        try:
            trial = trial_config(cfg, point)
        except ConfigError as exc:
            errors.append(f"trial {i} ({point_label(point)}; from {keys}): {exc}")
            continue
        if trial.train.budget_minutes <= 0 < cfg.train.budget_minutes:
            errors.append(f"trial {i}: train.budget_minutes = {trial.train.budget_minutes:g}: a sweep needs a "
                          "per-trial budget (ASHA's last rung), e.g. train.budget_minutes=5")
        if trial.train.batch_size % n:      # a trial's batch is split over its workers
            errors.append(f"trial {i}: train.batch_size = {trial.train.batch_size} does not split over "
                          f"sweep.workers_per_trial = {n} workers; make it a multiple of {n}")
    if errors:
        raise ConfigError("\n".join(errors))


def max_concurrent(cfg: Config, resources: dict[str, float]) -> int:
    """``sweep.max_concurrent``, or for ``auto`` the trials the cluster holds at once: its CPUs (its
    GPUs when trials use GPUs) over what one trial asks for, at least 1."""
    s = cfg.sweep
    if s.max_concurrent != "auto":
        return int(s.max_concurrent)
    if s.gpus_per_trial > 0:
        return max(1, int(resources.get("GPU", 0.0) // s.gpus_per_trial))
    return max(1, int(resources.get("CPU", 1.0) // s.cpus_per_trial))


TUNE_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGUSR1") if hasattr(signal, n))


def _tune_interrupted(saved: dict) -> bool:
    """Whether a signal stopped ``tuner.fit()``: Ray Tune 2.60's ``_setup_signal_catching``
    installs one handler on SIGINT and SIGUSR1 that sets an event (and puts the previous SIGINT
    handler back) without calling the previous handler; read that event from the handler."""
    for sig in TUNE_SIGNALS:
        handler = signal.getsignal(sig)
        if handler is saved[sig] or not callable(handler):
            continue            # Tune installed nothing here (not the main thread, or restored)
        for cell in getattr(handler, "__closure__", None) or ():
            if isinstance(cell.cell_contents, threading.Event):
                return cell.cell_contents.is_set()
    # no Tune handler left (no SIGUSR1 here): Tune put SIGINT's back because a signal came,
    # unless it installed none
    installed = (threading.current_thread() is threading.main_thread()
                 and os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0") in ("", "0"))
    return installed and signal.getsignal(signal.SIGINT) is saved[signal.SIGINT]


STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n))


def _stop_tune_on(signals: tuple[int, ...], sigint_before: object, replaced: dict, taken: list) -> None:
    """During ``tuner.fit()``: SIGTERM and SIGHUP stop the search in Ctrl-C's order (Tune's own
    SIGINT handler: the trials stop, the experiment's state is saved, fit returns) and are recorded
    as the job's signal (:func:`flows.interrupts.received`, exit 128 + its number) and in
    ``taken``. Before Tune's handler is in place, and for a second signal (Tune then puts SIGINT's
    back), the handler that was there runs: :func:`flows.interrupts.handled`'s raises at once. A
    signal the process ignores (``nohup``) stays ignored. The handlers replaced go into
    ``replaced`` (none outside the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return
    previous = {sig: signal.getsignal(sig) for sig in signals}

    def stop(signum: int, frame) -> None:
        tune_handler = signal.getsignal(signal.SIGINT)
        if tune_handler is not sigint_before and callable(tune_handler) and interrupts.record(signum):
            taken.append(signum)
            tune_handler(signal.SIGINT, frame)
            return
        before = previous[signum]
        if callable(before):
            before(signum, frame)
        elif before == signal.SIG_DFL:      # end as the signal would have
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
    for sig, before in previous.items():
        if before != signal.SIG_IGN:
            replaced[sig] = before
            signal.signal(sig, stop)


def train_storage(cfg: Config) -> str:
    """Where the Ray Train runs of trials with several workers keep their checkpoints until Tune
    has copied them: ``ray.storage_path/sweeps`` (an ``s3://`` one on a cluster of several nodes)."""
    r = cfg.ray.storage_path
    return f"{r.rstrip('/')}/sweeps" if "://" in r else str(Path(r).absolute() / "sweeps")


def _remove_trial_dirs(pids: set[int], cfg: Config, name: str, wait_s: float = 10.0) -> None:
    """After a search on the local cluster: remove the work directories its trials' processes
    (``pids``, from their results) left, and the Ray Train runs of this sweep's trials (each
    removes its own as it ends; a stopped one may not). Tune ends the trial actors as ``fit()``
    returns, not before: wait up to ``wait_s`` for those processes to end first."""
    deadline = time.monotonic() + wait_s
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.25)
    remove_orphaned_work_dirs()
    runs = train_storage(cfg)
    if "://" not in runs:
        for d in Path(runs).glob(f"{name}-trial-*"):
            shutil.rmtree(d, ignore_errors=True)


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
    ended_by: str = "search"  # "budget": sweep.budget_minutes ended it (a re-run finds it ended)


def run_search(cfg: Config, on_event: Callable[[dict], None] | None = None) -> SearchResult:
    """The search itself (no evaluation or registration): start or restore Tune's experiment, run
    it within ``sweep.budget_minutes``, log the trials and the table of all trials on the parent
    run. An interrupted search (SIGINT / SIGUSR1 to this process) keeps its state and raises
    :class:`flows.interrupts.Interrupted`; running it again resumes."""
    import ray
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler

    from flows.sweep_asha import RestorableASHA, read_history

    from diffusion.data import load_prepared
    from diffusion.evaluate import reference_stats
    from diffusion.prepare import dataset_version
    from flows.ray_train import _git_commit, cluster_name, code_version, data_source, init_ray
    from flows.stages import StageError, load_extractor
    from flows.tracking import client_for, tracking_uri
    started = time.perf_counter()
    s = cfg.sweep
    check_trials(cfg)
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
    name = sweep_name(cfg, version, extractor.sha256)
    storage = Path(s.storage_path).absolute()
    path = storage / name
    points = [{"index": i, **p} for i, p in enumerate(draw_points(s.space, s.trials, s.seed))]
    uri = tracking_uri(cfg)
    local = not os.environ.get("RAY_ADDRESS")     # the trials run on this machine
    restored = tune.Tuner.can_restore(str(path))
    history = storage / f"{name}.asha.json"          # ASHA's rungs, for a restore
    state_file = storage / f"{name}.sweep.json"      # the parent run's id, how the search ended
    if restored:
        try:                                          # refused here: inside Tune it would restart the search
            read_history(history)
        except ValueError as exc:
            raise StageError(str(exc)) from None
    parent = parent_run(cfg, uri, state_file, name, points)
    client = client_for(uri)
    track = tracker(uri, parent, client.get_run(parent).info.experiment_id, s.budget_minutes * 60.0,
                    s.scheduler, on_event)
    setup = {"base": dataclasses.replace(cfg, data=dataclasses.replace(
                 cfg.data, prepared_dir=str(Path(cfg.data.prepared_dir).absolute()))).to_dict(),
             "data": data_source(cfg, version), "code": {**code_version(), "git": _git_commit()},
             "extractor": Path(cfg.extractor.path).read_bytes(), "extractor_sha256": extractor.sha256,
             "reference_cache": cache, "quick_fid_samples": s.quick_fid_samples,
             "checkpoint_every": s.checkpoint_every,
             "cpus_per_trial": s.cpus_per_trial, "gpus_per_trial": s.gpus_per_trial,
             "workers_per_trial": s.workers_per_trial, "sweep": name, "local": local,
             "train_storage": train_storage(cfg)}
    # a trial of several Ray Train workers holds no CPU itself (its workers hold the trial's); Tune
    # needs some resource for it: a MiB of memory
    trainable = tune.with_resources(tune.with_parameters(sweep_trial, setup=setup),
                                    {"cpu": s.cpus_per_trial, "gpu": s.gpus_per_trial}
                                    if s.workers_per_trial == 1 else {"cpu": 0, "memory": 2 ** 20})
    param_space = {"trial": tune.grid_search(points)}
    if restored:
        tuner = tune.Tuner.restore(str(path), trainable, resume_errored=True, param_space=param_space)
        tuner._local_tuner.get_run_config().callbacks = [track]    # this process's MLflow callback
    else:
        trial_minutes = cfg.train.budget_minutes           # > 0: check_trials
        history.unlink(missing_ok=True)                   # a new experiment: none recorded yet
        scheduler = (RestorableASHA(history, time_attr="train_minutes", max_t=trial_minutes,
                                    grace_period=min(s.grace_minutes, trial_minutes),
                                    reduction_factor=s.reduction_factor)
                     if s.scheduler == "asha" else FIFOScheduler())
        tuner = tune.Tuner(
            trainable, param_space=param_space,
            tune_config=tune.TuneConfig(metric="quick_fid", mode="min", scheduler=scheduler,
                                        max_concurrent_trials=max_concurrent(cfg, resources),
                                        time_budget_s=s.budget_minutes * 60.0,
                                        # one process for all trials (no torch import per trial);
                                        # not for trials of several workers: a stopped one must end
                                        # its process, and with it its Ray Train run, at once
                                        reuse_actors=s.workers_per_trial == 1),
            run_config=tune.RunConfig(
                name=name, storage_path=str(storage), callbacks=[track], verbose=0,
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute="quick_fid",
                                                        checkpoint_score_order="min"),
                failure_config=tune.FailureConfig(max_failures=0)))
    saved = {sig: signal.getsignal(sig) for sig in TUNE_SIGNALS}
    stops: dict = {}
    taken: list[int] = []         # SIGTERM / SIGHUP handed to Tune's stop
    try:
        _stop_tune_on(STOP_SIGNALS, saved[signal.SIGINT], stops, taken)
        grid = tuner.fit()
        interrupted = _tune_interrupted(saved)
    except BaseException as exc:
        track.close_unfinished()
        client.set_terminated(parent, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    finally:                    # Tune leaves its handlers (which only stop fit) installed
        for sig, handler in {**saved, **stops}.items():
            signal.signal(sig, handler)
    interrupted = interrupted or bool(taken)      # also one that came as fit() returned
    if interrupted:             # Tune stopped at the signal and kept its state
        track.close_unfinished()
        client.set_terminated(parent, "KILLED")
        if local:
            _remove_trial_dirs(track.pids, cfg, name)
        raise interrupts.Interrupted(interrupts.received() or signal.SIGINT)
    try:
        rows = trial_rows(grid, track)
        if local:
            _remove_trial_dirs(track.pids, cfg, name)
        for row in rows:        # stopped by the time budget: Tune calls no callback for those
            if row["stop_reason"] == "unknown":
                track.end_stopped(row["trial_id"], "budget")
                row["stop_reason"] = "budget"
        state = json.loads(state_file.read_text())
        if state.get("ended_by") != "budget" and (len(rows) < len(points) or any(
                r["stop_reason"] == "budget" for r in rows)):
            # Tune saved its searcher finished: a re-run returns at once, with the same trials
            state["ended_by"] = "budget"
            state_file.write_text(json.dumps(state) + "\n")
            client.set_tag(parent, "ended_by", "budget")
        scored = [r for r in rows if r.get("checkpoint")]
        best = min(scored, key=lambda r: r["best_quick_fid"]) if scored else None
        log_parent(client, parent, rows, best)
    except BaseException as exc:
        track.close_unfinished()
        client.set_terminated(parent, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    client.set_terminated(parent, "FINISHED")
    return SearchResult(name, path, parent, uri, rows, best, restored, time.perf_counter() - started,
                        state.get("ended_by", "search"))


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
                          + (" (ended by sweep.budget_minutes)" if search.ended_by == "budget" else "")
                          + (f", best quick FID {search.best['best_quick_fid']:.2f} (trial "
                             f"{search.best['index']}: {point_label(search.best['point'])})" if search.best else ""))
    best = prepare_best(cfg, search)
    with out.stage("evaluate") as info:
        metrics = evaluate_stage(best, progress=False)
        info["detail"] = f"FID {metrics['fid']:.2f} ± {metrics['fid_std']:.2f} (floor {metrics['floor_fid']:.2f})"
    with out.stage("register") as info:
        reg = register_best(best, search, flow_run_id)
        info["detail"] = (f"already registered as {reg['name']} version {reg['duplicate_of']}"
                          if reg.get("duplicate_of") else f"{reg['name']} version {reg['version']} -> {reg['alias']}")
    counts: dict[str, int] = {}
    for row in search.trials:
        counts[row["stop_reason"]] = counts.get(row["stop_reason"], 0) + 1
    return {"sweep": search.name, "trials": len(search.trials), "stop_reasons": counts,
            "best": search.best["point"], "best_quick_fid": search.best["best_quick_fid"],
            "fid": metrics["fid"], "fid_std": metrics["fid_std"], "model": reg["name"],
            "version": reg.get("duplicate_of") or reg["version"], "alias": reg["alias"],
            "duplicate": bool(reg.get("duplicate_of")),
            "parent_run_id": search.parent_run_id, "tracking_uri": redact_url(search.tracking_uri),
            "seconds": round(time.perf_counter() - started, 1)}


@flow(name=FLOW_NAME, log_prints=True)
def ddpm_sweep(params_file: str = "params.yaml", overrides: list[str] | None = None) -> dict:
    """A budgeted Ray Tune search over sweep.space; the best trial through the champion gate.
    SIGINT, SIGTERM or SIGHUP stop the search in order (Tune saves it, the parent run ends
    KILLED) and end the flow run Cancelled; running it again resumes."""
    from prefect.states import Cancelled

    from flows.console import console
    with interrupts.handled():      # in place of Prefect's SIGTERM handler while the flow runs
        try:
            return sweep_flow_body(params_file, overrides)
        except interrupts.Interrupted as exc:
            interrupts.record(exc.signum)     # Tune's own stop (Ctrl-C) records nothing: the exit code
            console().line(f"interrupted ({exc}); run the same command again to resume the sweep")
            return Cancelled(message=str(exc))


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
        check_trials(cfg)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from flows.console import console, run_command

    def interrupted(exc) -> None:         # while Prefect started or ended the flow run
        if not exc.reported:
            console().line(f"interrupted ({exc}); run the same command again to resume the sweep")
    return run_command(FLOW_NAME, args.log_dir, args.verbose, lambda: _main(args), interrupted)


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
    if state.is_cancelled() and interrupts.received():     # the console said so, at the time
        return 128 + interrupts.received()
    if not state.is_completed():
        out.error(f"{FLOW_NAME} ended {state.name}: {state.message}")
        return 1
    s = state.result()
    out.line(f"\n{FLOW_NAME} finished in {s['seconds']:.0f} s\n"
             f"  sweep           : {s['sweep']}, {s['trials']} trials ("
             + ", ".join(f"{n} {r}" for r, n in sorted(s["stop_reasons"].items())) + ")\n"
             f"  best trial      : {point_label(s['best'])}, quick FID {s['best_quick_fid']:.3f}\n"
             f"  FID             : {s['fid']:.3f} ± {s['fid_std']:.3f}\n"
             + (f"  registered      : already, as {s['model']} version {s['version']}; nothing new registered\n"
                if s["duplicate"] else f"  registered      : {s['model']} version {s['version']} -> alias '{s['alias']}'\n")
             + f"  MLflow parent   : run {s['parent_run_id']} (its trials are its child runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
