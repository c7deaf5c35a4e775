"""DVC stage entry points: ``python -m flows.stages <stage> [section.key=value ...]`` with
stage one of prepare, validate, extractor, train, evaluate, register.

Each reads its own section of ``params.yaml``, calls one library function and prints a JSON
summary. The Prefect flow calls the same functions.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if __name__ == "__main__":      # the command (what `dvc repro` runs): a light parent relays signals
    from flows.interrupts import supervise      # to the stage only, so Ray's processes stop in order
    supervise("flows.stages")

from diffusion.config import Config, ConfigError, load_config
from diffusion.prepare import DataError, PrepareResult, dataset_version, prepare_from_config

if TYPE_CHECKING:
    from diffusion.features import FeatureExtractor
    from diffusion.validate import ValidationReport

# torch, MLflow and pandas are imported by the stages that use them: a `dvc repro` prepare or
# validate process does not pay for them.

STAGES = ("prepare", "validate", "extractor", "train", "evaluate", "register")
RUN_INFO = "run.json"        # train stage -> register stage: the MLflow run and Ray run of a model


class StageError(RuntimeError):
    """A stage cannot run: a missing or inconsistent input, named in the message."""


def prepare_stage(cfg: Config, progress: bool = False) -> PrepareResult:
    """Prepare the configured source; ``progress``: a bar with images/s and the rejects so far
    (on a terminal)."""
    from diffusion.progress import progress_bar
    d = cfg.data
    bar = progress_bar(total=None, desc="prepare", unit="img", enabled=progress, leave=False)
    shown = {"items": 0, "rejects": 0}

    def advance(images: int, rejects: int) -> None:
        bar.update(images + rejects - shown["items"])
        shown["items"] = images + rejects
        if rejects != shown["rejects"]:
            shown["rejects"] = rejects
            bar.set_postfix(rejects=rejects, refresh=False)
    try:
        if d.engine == "ray":
            from flows.ray_prepare import ray_prepare
            return ray_prepare(d, progress=advance)
        if d.source == "s3":
            from flows.s3 import s3_records
            return prepare_from_config(d, s3_records(d.path, workers=d.s3_workers), progress=advance)
        return prepare_from_config(d, progress=advance)
    finally:
        bar.close()


def validate_stage(cfg: Config) -> ValidationReport:
    from diffusion.validate import validate_dataset
    d = cfg.data
    return validate_dataset(d.prepared_dir, d.validation_dir, min_pixel_std=d.min_pixel_std)


def extractor_stage(cfg: Config, progress: bool = True) -> dict:
    """Train the domain classifier on the training split (a no-op for the Inception extractor).
    On the CPU on every machine: its weights file is the FID yardstick, and cuDNN's pooling
    backward is not deterministic, so a GPU would give another file (sha256) on every run. It
    is small (about half a minute on 2 cores); evaluation computes its features on the GPU."""
    from diffusion.data import load_prepared
    from diffusion.features import load_inception, save_classifier, train_classifier
    x = cfg.extractor
    if x.kind == "inception":
        return {"extractor": "inception", "sha256": load_inception(x.path).sha256}
    train_set = load_prepared(cfg.data.prepared_dir, "train")
    heldout = load_prepared(cfg.data.prepared_dir, "heldout")
    model, acc = train_classifier(train_set, heldout, epochs=x.epochs, batch_size=x.batch_size,
                                  lr=x.lr, seed=x.seed, progress=progress)
    if acc < x.min_accuracy:
        raise DataError(f"extractor.min_accuracy = {x.min_accuracy}: the domain classifier reached "
                        f"only {acc:.4f} held-out accuracy; raise extractor.epochs")
    info = {"heldout_accuracy": acc, "dataset_version": dataset_version(cfg.data.prepared_dir)}
    sha = save_classifier(model, x.path, info)
    return {"extractor": "domain", "path": x.path, "sha256": sha, **info}


def load_extractor(cfg: Config) -> FeatureExtractor:
    from diffusion.features import load_domain_extractor, load_inception
    x = cfg.extractor
    return load_domain_extractor(x.path) if x.kind == "domain" else load_inception(x.path)


def train_stage(cfg: Config, progress: bool = True, tags: dict[str, str] | None = None) -> dict:
    """Train (Ray Train DDP, or in-process with ``ray.enabled = false``) inside an MLflow run;
    writes ``train.out_dir/run.json`` for the register stage and returns the same summary. The
    console shows the workers' resolved hardware, the step a run resumes from and one progress
    display (``progress``). On a signal (:mod:`flows.interrupts`, when its handlers are
    installed) training stops after the current step, checkpoints it, the MLflow run ends
    KILLED and :class:`~flows.interrupts.Interrupted` carries the step; any other failure
    ends the run FAILED."""
    from flows import interrupts
    with interrupts.deferred():     # a signal while the run is set up stops it before the first step
        return _train_stage(cfg, progress, tags)


def _train_stage(cfg: Config, progress: bool, tags: dict[str, str] | None) -> dict:
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    from diffusion.checkpoint import checkpoint_step
    from diffusion.data import load_dataset
    from diffusion.trainer import CHECKPOINT_NAME, train
    from flows import interrupts
    from flows.console import TrainingProgress, console
    from flows.tracking import TrainingTracker, client_for, log_hardware, run_name, start_training_run
    started = time.perf_counter()
    ray_name = "none"
    if cfg.ray.enabled:                       # ray is imported only when it trains
        from flows.ray_train import ray_run_name, ray_train
        ray_name = ray_run_name(cfg)
    version = dataset_version(cfg.data.prepared_dir)
    uri, run_id = start_training_run(
        cfg, run_name=run_name(cfg, version),
        tags={"ray_run_name": ray_name, "dataset_version": version, **(tags or {})})
    client = client_for(uri)
    monitor = None
    if cfg.tracking.system_metrics_every > 0:
        monitor = SystemMetricsMonitor(run_id, sampling_interval=cfg.tracking.system_metrics_every,
                                       tracking_uri=uri)
        monitor.start()
    display = TrainingProgress(console(), cfg.train.steps, cfg.train.budget_minutes) if progress else None

    scaling: dict = {}
    # in-process training resumes from train.out_dir; Ray workers say where they resumed from
    resumes_from = None if cfg.ray.enabled else checkpoint_step(Path(cfg.train.out_dir) / CHECKPOINT_NAME)

    first_step: dict[str, float] = {}

    def on_setup(hardware: dict) -> None:          # just before the first step (rank 0's)
        first_step.setdefault("seconds", round(time.perf_counter() - started, 2))
        if "ray_call" in first_step:               # Ray's part: ray_train() called to the first step
            first_step.setdefault("ray", round(time.perf_counter() - first_step["ray_call"], 2))
        if progress:
            console().hardware("train", {**hardware, **scaling})
            step = hardware.get("resumed_from", resumes_from)
            if step:
                console().line(f"  train: resuming from step {step}")

    data_obtained: dict[str, str] = {}

    def on_event(event: dict) -> None:              # relayed from the Ray workers
        kind = event.pop("kind", "")
        if kind == "scaling":                       # ray.use_gpu / num_workers as resolved
            scaling.update(workers=event["workers"], ray_scaling=event["reason"])
            client.set_tag(run_id, "resolved.train.ray_scaling", event["reason"])
        elif kind == "setup":
            on_setup(event)
        elif kind == "metrics" and display is not None:
            display.update(event.pop("step"), event)
        elif kind == "data":                        # how each rank got the dataset version
            how = f"{event['how']} on {event['node']} ({event['seconds']:.1f} s)"
            data_obtained[f"rank{event['rank']}"] = how
            client.set_tag(run_id, f"data.rank{event['rank']}", how)
            if progress and event["how"] == "downloaded":
                console().line(f"[train] rank {event['rank']} on {event['node']}: dataset "
                               f"{version[:12]} downloaded from the DVC remote, "
                               f"{event['bytes'] / 1e6:.1f} MB in {event['seconds']:.1f} s")

    try:
        if cfg.ray.enabled:
            first_step["ray_call"] = time.perf_counter()
            with interrupts.deferred():
                r = ray_train(cfg, (uri, run_id), on_event=on_event, dataset=version,
                              should_stop=interrupts.requested)
            step, checkpoint, hardware = r.step, r.checkpoint, r.hardware
            extra = {**{k: r.metrics.get(k) for k in ("resumed_from", "world_size")},
                     "stopped_by": r.stopped_by, "train_loop_seconds": round(r.train_seconds, 2)}
        else:
            tracker = TrainingTracker(cfg, uri, run_id)

            def on_metrics(step: int, metrics: dict) -> None:
                tracker.on_metrics(step, metrics)
                if display is not None:
                    display.update(step, metrics)
            try:
                with interrupts.deferred():
                    t = train(cfg, load_dataset(cfg.data), progress=False, on_metrics=on_metrics,
                              on_checkpoint=tracker.on_checkpoint, on_setup=on_setup,
                              should_stop=interrupts.requested)
            finally:
                tracker.close()
            step, checkpoint, hardware = t.step, t.checkpoint, t.hardware
            extra = {"resumed_from": t.resumed_from, "world_size": 1, "stopped_by": t.stopped_by,
                     "train_loop_seconds": round(t.train_seconds, 2)}
        if interrupts.requested():      # stopped early, or the signal came as the last step ended
            raise interrupts.Interrupted(interrupts.received(), step=step)
    except BaseException as exc:
        client.set_terminated(run_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    finally:
        if monitor is not None:
            monitor.finish()
        if display is not None:
            display.close()
    seconds = time.perf_counter() - started
    client.log_metric(run_id, "train_seconds", seconds, step=step)
    client.log_metric(run_id, "train_loop_seconds", extra["train_loop_seconds"], step=step)
    if "seconds" in first_step:   # the stage's start-up, and Ray's part of it (bench/RESULTS.md)
        client.log_metric(run_id, "seconds_to_first_step", first_step["seconds"], step=step)
        extra["seconds_to_first_step"] = first_step["seconds"]
    if "ray" in first_step:
        client.log_metric(run_id, "ray_seconds_to_first_step", first_step["ray"], step=step)
        extra["ray_seconds_to_first_step"] = first_step["ray"]
    client.set_tag(run_id, "stopped_by", extra["stopped_by"])
    log_hardware(client, run_id, "train", hardware)
    client.set_terminated(run_id, "FINISHED")
    info = {"step": step, "checkpoint": str(checkpoint), "mlflow_run_id": run_id,
            "tracking_uri": uri, "ray_run_name": ray_name,
            "seconds": round(seconds, 2), **extra, "hardware": hardware,
            **({"data_obtained": data_obtained} if data_obtained else {})}
    (Path(cfg.train.out_dir) / RUN_INFO).write_text(json.dumps(info, indent=2) + "\n")
    return info


def evaluate_stage(cfg: Config, progress: bool = True) -> dict:
    """Evaluate on this machine's device (a GPU when it has one); a driver without one whose
    Ray cluster (``RAY_ADDRESS``) has GPUs runs it there as one GPU task (flows/ray_evaluate.py)."""
    from diffusion.evaluate import evaluate
    from diffusion.trainer import select_device
    from flows.console import console
    if os.environ.get("RAY_ADDRESS") and cfg.ray.enabled:
        from flows import ray_evaluate
        if ray_evaluate.wanted(cfg):
            metrics, setup = ray_evaluate.remote_evaluate(cfg)
            console().hardware("sampling", {**setup, "device_description":
                                            f"{setup['device_description']} on Ray node {setup['node']}"})
            return metrics
    return evaluate(Path(cfg.train.out_dir) / "checkpoint.pt", cfg, load_extractor(cfg),
                    progress=progress, device=select_device(cfg.train.device),
                    on_setup=lambda s: console().hardware("sampling", s))


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise StageError(f"{path}: not found; run the {what} stage first") from None
    except json.JSONDecodeError as exc:
        raise StageError(f"{path}: not valid JSON ({exc})") from None


def registry_path(cfg: Config) -> Path:
    return Path(cfg.evaluate.metrics_path).with_name("registry.json")


def register_stage(cfg: Config, flow_run_id: str | None = None) -> dict:
    """Log the evaluation and the pyfunc generator on the training run, register a new model
    version with its lineage and run the champion gate; writes ``registry.json`` beside the
    evaluation metrics. Weights already registered are not registered again (the result then
    names the version that holds them, ``duplicate_of``)."""
    from diffusion.checkpoint import load_checkpoint, weights_sha256
    from diffusion.evaluate import features_path
    from diffusion.trainer import select_device
    from flows.registry import log_generator, register
    from flows.tracking import client_for, git_commit, log_evaluation
    out = Path(cfg.train.out_dir)
    info = _read_json(out / RUN_INFO, "train")
    metrics = _read_json(Path(cfg.evaluate.metrics_path), "evaluate")
    for key in ("fid", "fid_std", "checkpoint_step", "dataset_version", "extractor_sha256"):
        if key not in metrics:
            raise StageError(f"{cfg.evaluate.metrics_path}: key {key!r} missing; re-run the evaluate stage")
    if int(metrics["checkpoint_step"]) != int(info["step"]):
        raise StageError(f"{cfg.evaluate.metrics_path}: evaluates step {metrics['checkpoint_step']} but "
                         f"{out / RUN_INFO} trained to step {info['step']}; re-run the evaluate stage")
    for key in ("yardstick", "yardstick_parts"):           # evaluations from before the yardstick
        if key not in metrics:
            raise StageError(f"{cfg.evaluate.metrics_path}: key {key!r} missing; re-run the evaluate stage")
    features = features_path(cfg.evaluate.metrics_path)
    if not features.is_file():
        raise StageError(f"{features}: not found; re-run the evaluate stage")
    uri, run_id = info["tracking_uri"], info["mlflow_run_id"]
    digest = weights_sha256(load_checkpoint(out / "checkpoint.pt"))
    log_evaluation(uri, run_id, metrics, cfg.evaluate.grid_path, cfg.evaluate.metrics_path)
    lineage = {
        "dataset_version": metrics["dataset_version"], "git_commit": git_commit(),
        "params_hash": cfg.hash(), "extractor_sha256": metrics["extractor_sha256"],
        "prefect_flow_run_id": flow_run_id or os.environ.get("PREFECT__FLOW_RUN_ID", "none"),
        "ray_run_name": info.get("ray_run_name", "none"), "mlflow_run_id": run_id,
        "checkpoint_step": str(info["step"]),
        **{f"train_{k}": str(v) for k, v in info.get("hardware", {}).items()    # pinned per run
           if k in ("precision", "precision_switched_at_step") and v is not None},
    }
    reg = register(uri, cfg, model_uri=lambda: log_generator(uri, run_id, out / "checkpoint.pt"),
                   run_id=run_id, evaluation=metrics, features_file=features, lineage=lineage,
                   weights_sha256=digest, device=str(select_device(cfg.train.device)))
    result = {**reg.to_dict(), "fid": metrics["fid"], "fid_std": metrics["fid_std"],
              "tracking_uri": uri,
              "experiment_id": client_for(uri).get_run(run_id).info.experiment_id}
    path = registry_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def already_registered(cfg: Config) -> dict | None:
    """The version of ``tracking.model_name`` that holds ``train.out_dir``'s checkpoint weights,
    or None (also when there is no checkpoint or no registry yet): a run that trained nothing
    new says so before spending time on evaluation."""
    from diffusion.checkpoint import CheckpointError, load_checkpoint, weights_sha256
    from flows.registry import registered_version
    from flows.tracking import client_for, tracking_uri
    try:
        digest = weights_sha256(load_checkpoint(Path(cfg.train.out_dir) / "checkpoint.pt"))
    except CheckpointError:
        return None
    held = registered_version(client_for(tracking_uri(cfg)), cfg.tracking.model_name, digest)
    if held is None:
        return None
    return {"version": str(held.version), "aliases": list(held.aliases), "run_id": held.run_id,
            "fid": float(held.tags.get("fid", "nan")), "fid_std": float(held.tags.get("fid_std", "nan"))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.stages", description=__doc__)
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_intermixed_args(argv)
    from flows.interrupts import Interrupted, handled
    try:
        with handled():
            return _run_stage(args)
    except Interrupted as exc:
        where = f" at step {exc.step}; checkpoint kept" if exc.step else ""
        print(f"interrupted during the {args.stage} stage{where}", file=sys.stderr)
        return exc.exit_code


def _run_stage(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.params, args.overrides)
        if args.stage == "prepare":
            r = prepare_stage(cfg, progress=sys.stderr.isatty())
            print(json.dumps({"prepared": str(r.out_dir), "counts": r.counts, "classes": r.classes,
                              "rejects": r.rejects, "dataset_version": r.version}, indent=2))
        elif args.stage == "validate":
            report = validate_stage(cfg)
            print(json.dumps({"validated": report.dataset, "rows": report.rows, "ok": report.ok}))
        elif args.stage == "extractor":
            print(json.dumps(extractor_stage(cfg), indent=2))
        elif args.stage == "train":
            print(json.dumps(train_stage(cfg), indent=2))
        elif args.stage == "evaluate":
            print(json.dumps(evaluate_stage(cfg), indent=2))
        else:
            print(json.dumps(register_stage(cfg), indent=2))
    except Exception as exc:
        if not isinstance(exc, _expected_errors()):
            raise
        print(f"error: {args.stage} stage: {exc}", file=sys.stderr)
        return 2
    return 0


def _expected_errors() -> tuple[type[Exception], ...]:
    """The errors a stage reports in one line (exit 2): bad input or configuration. Those of
    modules the stage never imported cannot have been raised, so they are not imported here."""
    errors: list[type[Exception]] = [ConfigError, DataError, StageError]
    for module, name in (("diffusion.validate", "ValidationFailed"), ("diffusion.checkpoint", "CheckpointError"),
                         ("diffusion.trainer", "NonFiniteLossError"), ("mlflow.exceptions", "MlflowException"),
                         ("flows.registry", "GateError")):
        if module in sys.modules:
            errors.append(getattr(sys.modules[module], name))
    return tuple(errors)


if __name__ == "__main__":
    sys.exit(main())
