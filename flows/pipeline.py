"""The Prefect flow ``ddpm-pipeline``: version the data (prepare, validate, DVC commit + push) ->
extractor -> train (Ray) -> evaluate (FID) -> register (MLflow gate).

Every task is a thin wrapper around the function a DVC stage calls (``flows.stages``). Caching:
the extractor, train, evaluate and register tasks are keyed on the dataset version (DVC's md5 of
``data/prepared``) and the hash of the config sections that task depends on, so a re-run with
unchanged inputs skips finished work (the task ends ``Cached``); ``force=True`` redoes it. Only
the DVC push retries (remote I/O). A failing task fails the flow with the stage named; nothing is
registered after a failure. Run it:

    python -m flows.pipeline [--params params.yaml] [section.key=value ...] [--force] [--verbose]

(ephemeral Prefect when no ``PREFECT_API_URL`` is set), or as a deployment, see ``flows/serve.py``.
Ctrl-C, SIGTERM or a closed terminal stop it in order (:mod:`flows.interrupts`): training
checkpoints the step it reached, the MLflow run ends KILLED, the flow run Cancelled, the Ray
cluster stops, and the command exits 130 / 143 / 129; the next run resumes from that step.
The console shows one line per stage as it starts and ends, the resolved hardware, one training
progress display and the summary; Prefect's, Ray's and MLflow's own output goes to the log file
named on the first line (``--verbose`` keeps it all on the console instead).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __name__ == "__main__":      # the command: a light parent that runs the job and relays signals
    from flows.interrupts import supervise
    supervise("flows.pipeline")

# no usage reporting from offline machines (it also contends for the ephemeral server's SQLite)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
# On a machine that never ran Prefect, the ephemeral server first creates and migrates its
# SQLite database under PREFECT_HOME: on 2 cores that outlasts Prefect's default 20 s allowance.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.states import Cancelled

from diffusion.config import Config, config_from_dict, load_config, redact_url
from flows import interrupts, stages
from flows.console import console, run_command

FLOW_NAME = "ddpm-pipeline"


def _hash(tree: Any) -> str:
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:16]


def _sections(cfg: dict, *names: str) -> dict:
    return {n: cfg[n] for n in names}


# What each cached task depends on, besides the dataset version. Paths of outputs are included:
# the same work written elsewhere is not the same result.
_TRAIN_KEYS = ("data", "model", "diffusion", "train")
_EVAL_KEYS = _TRAIN_KEYS + ("evaluate", "extractor")
_REGISTER_KEYS = _EVAL_KEYS + ("tracking",)


def _key(stage: str, names: tuple[str, ...]):
    """A cache key on (dataset version, config sections the stage depends on, and for the stages
    after training, the MLflow run that trained the model: a retrained model is re-evaluated)."""
    def key_fn(context, parameters: dict) -> str:
        cfg = parameters["cfg"]
        trained = parameters.get("train_run", "")
        return (f"{FLOW_NAME}-{stage}-{parameters['dataset_version']}-"
                f"{_hash([_sections(cfg, *names), trained])}")
    return key_fn


def _refresh(force: bool, *outputs: str | Path) -> dict:
    """Task options: recompute when forced or when an output a cached result points at is gone
    (deleted by hand, or a fresh clone that shares the Prefect result store)."""
    return {"refresh_cache": True} if force or not all(Path(o).exists() for o in outputs) else {}


def _cfg(cfg: dict) -> Config:
    return config_from_dict(cfg, "flow parameters")


def _stage(name: str, fn, *args, **kwargs):
    """Run one stage function; a failure names the stage and its cause."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:
        raise RuntimeError(f"{name} stage failed: {type(exc).__name__}: {exc}") from exc


@task(name="prepare", cache_policy=NO_CACHE)
def prepare_task(cfg: dict) -> dict:
    r = _stage("prepare", stages.prepare_stage, _cfg(cfg), progress=console().interactive)
    return {"dataset_version": r.version, "counts": r.counts, "rejects": r.rejects}


@task(name="validate", cache_policy=NO_CACHE)
def validate_task(cfg: dict) -> dict:
    report = _stage("validate", stages.validate_stage, _cfg(cfg))
    return {"rows": report.rows, "ok": report.ok}


def _dvc(*args: str) -> str:
    # this interpreter's DVC: the flow may run from an environment that is not on PATH
    out = subprocess.run([sys.executable, "-m", "dvc", *args], capture_output=True, text=True,
                         timeout=1800)
    if out.returncode:
        raise RuntimeError(f"dvc {' '.join(args)} failed ({out.returncode}): "
                           f"{(out.stderr or out.stdout).strip()[-2000:]}")
    return out.stdout


@task(name="dvc-commit", cache_policy=NO_CACHE)
def dvc_commit_task() -> str:
    """Record the prepared data in dvc.lock and the DVC cache, as ``dvc repro`` would."""
    if not Path("dvc.yaml").is_file() or not Path(".dvc").is_dir():
        return "skipped: not a DVC project"
    _dvc("commit", "--force", "prepare")
    return "committed"


@task(name="dvc-push", cache_policy=NO_CACHE, retries=3, retry_delay_seconds=[2, 10, 30])
def dvc_push_task() -> str:
    if not Path(".dvc").is_dir():
        return "skipped: not a DVC project"
    _dvc("push", "prepare")
    return "pushed"


@task(name="extractor", cache_key_fn=_key("extractor", ("data", "extractor")),
      persist_result=True)
def extractor_task(cfg: dict, dataset_version: str) -> dict:
    return _stage("extractor", stages.extractor_stage, _cfg(cfg), progress=console().interactive)


@task(name="train", cache_key_fn=_key("train", _TRAIN_KEYS),
      persist_result=True)
def train_task(cfg: dict, dataset_version: str, flow_run_id: str) -> dict:
    return _stage("train", stages.train_stage, _cfg(cfg), progress=True,
                  tags={"prefect_flow_run_id": flow_run_id})


@task(name="evaluate", cache_key_fn=_key("evaluate", _EVAL_KEYS),
      persist_result=True)
def evaluate_task(cfg: dict, dataset_version: str, train_run: str) -> dict:
    return _stage("evaluate", stages.evaluate_stage, _cfg(cfg), progress=console().interactive)


@task(name="register", cache_key_fn=_key("register", _REGISTER_KEYS), persist_result=True)
def register_task(cfg: dict, dataset_version: str, train_run: str, flow_run_id: str) -> dict:
    return _stage("register", stages.register_stage, _cfg(cfg), flow_run_id=flow_run_id)


def _run(name: str, task_fn, *args, detail=None):
    """Run one task between a console line as it starts and one as it ends (with its time, or
    "cached" when Prefect reused the result); a failure prints its cause and fails the flow."""
    with console().stage(name) as info:
        state = task_fn(*args, return_state=True)
        result = state.result()              # raises the task's error when it failed
        info["cached"] = state.name == "Cached"
        if detail is not None:
            info["detail"] = detail(result)
    return result


def _ui_links(reg: dict) -> tuple[str, str]:
    uri = redact_url(reg.get("tracking_uri", ""))
    # the experiment's training runs; MLflow 3's UI otherwise opens a fresh browser in GenAI mode
    page = (f"/#/experiments/{reg['experiment_id']}/runs?workflowType=machine_learning"
            if reg.get("experiment_id") else "")
    if uri.startswith("http"):
        mlflow_ui = uri.rstrip("/") + page
    else:
        mlflow_ui = f"`mlflow ui --backend-store-uri {uri}` then http://127.0.0.1:5000{page}"
    from prefect.settings import PREFECT_API_URL
    api = PREFECT_API_URL.value() or ""
    prefect_ui = api.removesuffix("/api") if api else "`prefect server start` then http://127.0.0.1:4200"
    return mlflow_ui, prefect_ui


def _stop_ray(flow=None, flow_run=None, state=None) -> None:
    """Cancelling the flow stops the Ray job: shutting the driver down ends its workers (and the
    local cluster the job started), after a start begun early has ended."""
    try:
        from flows import ray_early
        ray_early.stop()
    except Exception:   # noqa: BLE001 - best effort while the run is being torn down
        pass


def _start_ray_early(cfg: Config) -> None:
    """Start Ray (:mod:`flows.ray_early`) while the first stages run: training then finds it up.
    Only when this run trains on Ray (not with ``ray.enabled = false``). Torch and Ray are
    imported here, in this thread, first: imported in the background while a stage imports them
    too, a module can be seen half-initialised ("partially initialized module 'torch'")."""
    if cfg.ray.enabled:
        import flows.ray_train  # noqa: F401 - see above
        from flows import ray_early
        ray_early.start()


@flow(name=FLOW_NAME, on_cancellation=[_stop_ray], on_crashed=[_stop_ray], log_prints=True)
def ddpm_pipeline(params_file: str = "params.yaml", overrides: list[str] | None = None,
                  force: bool = False, push: bool = True) -> dict:
    """Data versioning -> Ray training -> FID evaluation -> MLflow registration with the gate.
    SIGINT, SIGTERM or SIGHUP end the run Cancelled, after the stage running has stopped in
    order (a training run checkpoints the step it reached) and Ray is shut down."""
    with interrupts.handled():      # in place of Prefect's SIGTERM handler while the flow runs
        try:
            return _pipeline(params_file, overrides, force, push)
        except interrupts.Interrupted as exc:
            interrupts.record(exc.signum)     # raised where no handler recorded it (Ray's start)
            if not exc.reported:
                console().line("interrupted between stages")
            _stop_ray()
            where = f" at step {exc.step} (checkpoint kept)" if exc.step else ""
            return Cancelled(message=f"{exc}{where}")


def _pipeline(params_file: str, overrides: list[str] | None, force: bool, push: bool) -> dict:
    from prefect.runtime import flow_run
    logger = get_run_logger()
    started = time.perf_counter()
    cfg = load_config(params_file, overrides or [])
    c = cfg.to_dict()
    run_id = str(flow_run.id or "none")
    _start_ray_early(cfg)

    data = _run("prepare", prepare_task, c, detail=lambda r: (
        f"dataset {r['dataset_version'][:12]} ({r['counts']['train']} train, "
        f"{r['counts']['heldout']} held-out images, {r['rejects']} rejected)"))
    version = data["dataset_version"]
    logger.info("dataset version %s (%s)", version, data["counts"])
    _run("validate", validate_task, c, detail=lambda r: f"{r['rows']} records valid")
    with console().stage("dvc") as info:
        dvc_state = dvc_commit_task()
        if push and dvc_state == "committed":
            dvc_state = dvc_push_task()
        info["detail"] = dvc_state
    t0 = time.perf_counter()
    out_dir = Path(cfg.train.out_dir)
    _run("extractor", extractor_task.with_options(**_refresh(force, cfg.extractor.path)), c, version,
         detail=lambda r: f"held-out accuracy {r['heldout_accuracy']:.1%}" if "heldout_accuracy" in r
         else r.get("extractor", ""))
    trained = _run("train", train_task.with_options(
        **_refresh(force, out_dir / "checkpoint.pt", out_dir / "run.json")), c, version, run_id,
        detail=lambda r: f"{r['step']} steps, ended by {r.get('stopped_by', 'steps')}")
    train_seconds = time.perf_counter() - t0
    if trained.get("resumed_from") == trained["step"]:      # nothing new: maybe nothing to do
        held = stages.already_registered(cfg)
        if held is not None:
            from flows.tracking import client_for
            client_for(trained["tracking_uri"]).set_tag(trained["mlflow_run_id"], "duplicate_of",
                                                        f"{cfg.tracking.model_name} version {held['version']}")
            aliases = ", ".join(held["aliases"]) or "no alias"
            console().line(f"[train] trained nothing new: step {trained['step']} was reached before and "
                           f"its weights are {cfg.tracking.model_name} version {held['version']} "
                           f"({aliases}); evaluation and registration skipped")
            return {"dataset_version": version, "dvc": dvc_state, "train_step": trained["step"],
                    "train_seconds": round(train_seconds, 1), "stopped_by": trained.get("stopped_by", "steps"),
                    "fid": held["fid"], "fid_std": held["fid_std"], "model": cfg.tracking.model_name,
                    "version": held["version"], "alias": ",".join(held["aliases"]) or "none",
                    "duplicate_of": held["version"],
                    "reason": f"these weights are already registered as version {held['version']}",
                    "mlflow_run_id": held["run_id"], "tracking_uri": trained["tracking_uri"],
                    "experiment_id": None, "seconds": round(time.perf_counter() - started, 1)}
    from diffusion.evaluate import features_path
    metrics = _run("evaluate", evaluate_task.with_options(
        **_refresh(force, cfg.evaluate.metrics_path, features_path(cfg.evaluate.metrics_path))),
                   c, version, trained["mlflow_run_id"], detail=lambda m: (
                       f"FID {m['fid']:.2f} ± {m['fid_std']:.2f} (floor {m['floor_fid']:.2f})"
                       + (f", {m['confident_share']:.1%} recognised" if "confident_share" in m else "")))
    reg = _run("register", register_task.with_options(**_refresh(force, stages.registry_path(cfg))),
               c, version, trained["mlflow_run_id"], run_id,
               detail=lambda r: f"already registered as {r['name']} version {r['duplicate_of']}"
               if r.get("duplicate_of") else f"{r['name']} version {r['version']} -> {r['alias']}")

    mlflow_ui, prefect_ui = _ui_links(reg)
    per_seed = metrics.get("fid_per_seed", [])
    summary = {
        "dataset_version": version, "dvc": dvc_state, "train_step": trained["step"],
        "train_seconds": round(train_seconds, 1), "fid": metrics["fid"], "fid_std": metrics["fid_std"],
        "floor_fid": metrics["floor_fid"], "stopped_by": trained.get("stopped_by", "steps"),
        **{k: metrics[k] for k in ("confident_share", "class_entropy_ratio", "label_agreement")
           if k in metrics},
        "model": reg["name"], "version": reg["version"],
        "alias": reg["alias"], "reason": reg["reason"], "mlflow_run_id": reg["run_id"],
        "duplicate_of": reg.get("duplicate_of"),
        "tracking_uri": reg["tracking_uri"], "experiment_id": reg.get("experiment_id"),
        "seconds": round(time.perf_counter() - started, 1),
    }
    create_markdown_artifact(key=FLOW_NAME, description="ddpm-pipeline run summary", markdown="\n".join([
        f"# {FLOW_NAME}: {reg['name']} v{reg['version']} -> `{reg['alias']}`",
        "",
        f"- dataset version: `{version}` (DVC: {dvc_state})",
        f"- training: {trained['step']} steps (ended by {summary['stopped_by']}), {train_seconds:.1f} s "
        f"in this run (Ray run `{trained.get('ray_run_name', 'none')}`)",
        f"- FID {metrics['fid']:.3f} ± {metrics['fid_std']:.3f} over {len(per_seed)} seeds; "
        f"real-vs-real floor {metrics['floor_fid']:.3f}",
        *([f"- recognised by the domain classifier (p ≥ {metrics['confidence_threshold']:g}): "
           f"{metrics['confident_share']:.1%}; class entropy {metrics['class_entropy_ratio']:.3f} of "
           f"the maximum; label agreement {metrics.get('label_agreement', float('nan')):.1%}"]
          if "confident_share" in metrics else []),
        f"- registry decision: **{reg['alias']}** - {reg['reason']}",
        f"- MLflow run `{reg['run_id']}` at {redact_url(reg['tracking_uri'])}; model `models:/{reg['name']}/{reg['version']}`",
        f"- MLflow UI: {mlflow_ui}",
    ]))
    create_table_artifact(key=f"{FLOW_NAME}-fid", description="FID per evaluation seed", table=[
        {"seed": k, "fid": f, "floor_fid": metrics["floor_fid"]} for k, f in enumerate(per_seed)])
    logger.info("FID %.3f ± %.3f -> %s v%s is %s (%s)", metrics["fid"], metrics["fid_std"],
                reg["name"], reg["version"], reg["alias"], reg["reason"])
    return summary


@flow(name="ddpm-rollback", log_prints=True)
def ddpm_rollback(to: int | str, reason: str, params_file: str = "params.yaml",
                  overrides: list[str] | None = None) -> dict:
    """Move the registry's ``champion`` back to version ``to`` (``python -m flows.registry
    rollback`` as a deployment), under the registry lock; who, why and when go on both versions."""
    import getpass

    from prefect.runtime import flow_run

    from flows.registry import rollback
    from flows.tracking import tracking_uri
    cfg = load_config(params_file, overrides or [])
    done = rollback(tracking_uri(cfg), cfg.tracking.model_name, str(to), reason,
                    who=f"{getpass.getuser()} (Prefect flow run {flow_run.id})")
    get_run_logger().info("champion of %s: version %s (was %s)", done["name"], done["champion"],
                          done["previous_champion"])
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--force", action="store_true", help="ignore cached task results")
    parser.add_argument("--no-push", action="store_true", help="do not push data to the DVC remote")
    parser.add_argument("--verbose", action="store_true",
                        help="show Prefect's, Ray's and MLflow's own output on the console")
    parser.add_argument("--log-dir", default="runs/logs", help="where the run's log file goes")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_intermixed_args(argv)
    def interrupted(exc: interrupts.Interrupted) -> None:   # while Prefect started or ended the flow run
        if not exc.reported:
            console().line(f"interrupted ({exc})")
        _stop_ray()
    return run_command(FLOW_NAME, args.log_dir, args.verbose, lambda: _main(args), interrupted)


def _main(args: argparse.Namespace) -> int:
    out = console()
    from prefect.settings import PREFECT_API_URL
    api = PREFECT_API_URL.value()
    out.line(f"Prefect: {api}" if api else "Prefect: starting a temporary API server "
             "(the first run on a machine also creates its database)")
    try:
        state = ddpm_pipeline(args.params, args.overrides, force=args.force, push=not args.no_push,
                              return_state=True)
    except Exception as exc:      # Prefect itself could not start, or the parameters were refused
        out.error(f"{FLOW_NAME} could not run: {type(exc).__name__}: {str(exc)[:2000]}")
        return 1
    if state.is_cancelled() and interrupts.received():     # the console said where, at the time
        return 128 + interrupts.received()
    if not state.is_completed():
        out.error(f"{FLOW_NAME} ended {state.name}: {state.message}")
        return 1
    s = state.result()
    mlflow_ui, prefect_ui = _ui_links(s)
    out.line(f"\n{FLOW_NAME} finished in {s['seconds']:.0f} s\n"
             f"  dataset version : {s['dataset_version']}\n"
             f"  training        : {s['train_step']} steps, ended by {s['stopped_by']}\n"
             f"  FID             : {s['fid']:.3f} ± {s['fid_std']:.3f}"
             + (f" (real-vs-real floor {s['floor_fid']:.3f})\n" if "floor_fid" in s else "\n")
             + (f"  recognised      : {s['confident_share']:.1%} of samples (classifier p >= 0.9), class "
                f"entropy {s['class_entropy_ratio']:.3f} of max, label agreement "
                f"{s.get('label_agreement', float('nan')):.1%}\n" if "confident_share" in s else "")
             + (f"  registered      : already, as {s['model']} version {s['duplicate_of']} "
                f"(alias '{s['alias']}'); nothing new registered\n" if s.get("duplicate_of") else
                f"  registered      : {s['model']} version {s['version']} -> alias '{s['alias']}'\n") +
             f"  decision        : {s['reason']}\n"
             f"  MLflow UI       : {mlflow_ui}\n"
             f"  Prefect UI      : {prefect_ui}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
