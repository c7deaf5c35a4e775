"""MLflow tracking for the pipeline: where runs go, what a training run logs, and how.

Backends by configuration only: ``tracking.tracking_uri`` when set, else ``MLFLOW_TRACKING_URI``,
else the embedded store - SQLite at ``<tracking.local_dir>/mlflow.db`` (absolute path) with
artifacts under ``<tracking.local_dir>/artifacts``. A server URI (``http://host:5000``) sends
everything to ``mlflow server``, whose artifact store (for example S3) the server chooses.

No credentials reach the store: every URL in tags, params, dataset sources and the config
snapshot loses its user-info (:func:`diffusion.config.redact_url`: ``https://user:token@host`` is
logged as ``https://host``).

Per-step metrics are buffered and sent in ``log_batch`` calls of ``tracking.flush_every`` values,
so a training step never waits on the tracking server. Metric names are the trainer's own keys
(loss, lr, grad_norm, img_per_s, ...) and the evaluation's (fid, fid_std, kid, floor_fid, ...),
the same in every run, so the MLflow compare view lines runs up.
"""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")   # offline machines; no phoning home

import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import Metric, Param  # noqa: E402

from diffusion.config import Config, redact_url  # noqa: E402
from diffusion.grid import make_grid  # noqa: E402
from diffusion.sampling import load_generator, sample  # noqa: E402

_MAX_PARAMS_PER_BATCH = 100       # MLflow's log_batch limits
_MAX_METRICS_PER_BATCH = 1000
_MAX_PARAM_LENGTH = 6000
EVAL_METRICS = ("fid", "fid_std", "kid", "kid_std", "floor_fid", "floor_kid", "fid_over_floor",
                "confident_share", "class_entropy_ratio", "label_agreement", "sampling_seconds")


def tracking_uri(cfg: Config) -> str:
    t = cfg.tracking
    if t.tracking_uri:
        return t.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    root = Path(t.local_dir).absolute()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


@contextlib.contextmanager
def using_tracking_uri(uri: str):
    """Point MLflow's process-wide tracking URI (fluent API, ``models:/`` resolution; it also sets
    ``MLFLOW_TRACKING_URI``) at ``uri`` for a block, then put the caller's setting back."""
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


def client_for(uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


# MLflow's UI opens an experiment without this tag in GenAI mode (traces, sessions); with it, on
# the runs table of a model-training experiment
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}


def experiment_id(client: MlflowClient, cfg: Config) -> str:
    """The configured experiment, created on first use as a model-training experiment (embedded
    store: local artifact root); an existing one without the kind tag gets it."""
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    if exp is None:
        location = None
        if client.tracking_uri.startswith("sqlite:"):
            location = (Path(cfg.tracking.local_dir).absolute() / "artifacts").as_uri()
        try:
            return client.create_experiment(cfg.tracking.experiment, artifact_location=location,
                                            tags=EXPERIMENT_TAGS)
        except mlflow.exceptions.MlflowException:      # created concurrently by another process
            exp = client.get_experiment_by_name(cfg.tracking.experiment)
    for key, value in EXPERIMENT_TAGS.items():
        if exp.tags.get(key) != value:
            client.set_experiment_tag(exp.experiment_id, key, value)
    return exp.experiment_id


def source_tags(entry_point: str, job: bool, cwd: str | Path = ".") -> dict[str, str]:
    """MLflow's own source tags (the UI's "Source" column and the run page): what ran, as a job
    or locally, and the git commit, branch and repository URL (without its user-info: a remote
    cloned with a token carries it) where git knows them."""
    tags = {"mlflow.source.name": entry_point, "mlflow.source.type": "JOB" if job else "LOCAL"}
    commit = git_commit(cwd)
    if commit != "unknown":
        tags["mlflow.source.git.commit"] = commit.removesuffix("-dirty")
    for key, args in (("mlflow.source.git.branch", ["rev-parse", "--abbrev-ref", "HEAD"]),
                      ("mlflow.source.git.repoURL", ["remote", "get-url", "origin"])):
        try:
            out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            continue
        if out.returncode == 0 and out.stdout.strip():
            tags[key] = redact_url(out.stdout.strip())
    return tags


def log_datasets(client: MlflowClient, run_id: str, cfg: Config, version: str) -> None:
    """The training split (context "training") and the held-out split ("evaluation") as MLflow
    dataset inputs whose digest is the DVC dataset version and whose source is the DVC remote's
    copy of that version (``files/md5/<ab>/<cdef...>.dir``), else the prepared directory."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT
    from flows.datasets import DatasetUnavailable, dvc_remote
    try:
        remote = dvc_remote()
    except DatasetUnavailable:        # an unreadable DVC config: name the prepared directory
        remote = None
    md5 = version.removesuffix(".dir")
    where = (f"{remote.url.rstrip('/')}/files/md5/{md5[:2]}/{md5[2:]}.dir" if remote
             else str(Path(cfg.data.prepared_dir).absolute()))
    source = resolve_dataset_source(redact_url(where) if "://" in where else Path(where).as_uri())
    inputs = []
    for split, context in (("train", "training"), ("heldout", "evaluation")):
        dataset = MetaDataset(source, name=f"{cfg.data.source}-{split}", digest=version)
        inputs.append(DatasetInput(dataset._to_mlflow_entity(),
                                   tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)]))
    client.log_inputs(run_id, datasets=inputs)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = redact_url(str(value))[:_MAX_PARAM_LENGTH]
    return out


def git_commit(cwd: str | Path = ".") -> str:
    """HEAD's commit, with ``-dirty`` when tracked files differ from it; ``unknown`` outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                              text=True, timeout=30)
        if head.returncode:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=30).stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# Bookkeeping, not what a model depends on: where things are written, how tracking is done. The
# whole configuration is on each run as config/params.yaml; the params are what people vary.
_NOT_PARAMS = ("tracking.", "sweep.", "data.prepared_dir", "data.validation_dir", "train.out_dir",
               "ray.storage_path", "extractor.path", "evaluate.reference_cache",
               "evaluate.metrics_path", "evaluate.grid_path")


def run_params(cfg: Config) -> dict[str, str]:
    """The run's params: the flattened configuration without bookkeeping keys (``_NOT_PARAMS``)."""
    return {k: v for k, v in flatten(cfg.to_dict()).items() if not k.startswith(_NOT_PARAMS)}


def run_name(cfg: Config, dataset_version: str) -> str:
    """What tells runs apart in the UI's table: preset, budget (or steps), the dataset version's
    prefix and a short random id, e.g. ``small-5min-d3f1a2b-4c1e``."""
    import uuid
    t = cfg.train
    budget = f"{t.budget_minutes:g}min" if t.budget_minutes else f"{t.steps}steps"
    return f"{cfg.model.preset}-{budget}-d{dataset_version[:7]}-{uuid.uuid4().hex[:4]}"


def start_training_run(cfg: Config, *, run_name: str, tags: dict[str, str] | None = None,
                       snapshot_files: tuple[str, ...] = ("params.yaml", "dvc.lock")) -> tuple[str, str]:
    """Create a run with the flattened config as params and a snapshot of ``params.yaml`` and
    ``dvc.lock`` (when present, URLs redacted); returns (tracking URI, run id)."""
    uri = tracking_uri(cfg)
    client = client_for(uri)
    tags = tags or {}
    job = tags.get("prefect_flow_run_id") not in (None, "none")
    run = client.create_run(experiment_id(client, cfg), run_name=run_name, tags={
        "git_commit": git_commit(), "params_hash": cfg.hash(),
        **source_tags("ddpm-pipeline (Prefect flow)" if job else "flows/stages.py train", job), **tags})
    run_id = run.info.run_id
    if tags.get("dataset_version"):
        log_datasets(client, run_id, cfg, tags["dataset_version"])
    params = [Param(k, v) for k, v in sorted(run_params(cfg).items())]
    for i in range(0, len(params), _MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, params=params[i:i + _MAX_PARAMS_PER_BATCH])
    with tempfile.TemporaryDirectory() as tmp:
        for name in snapshot_files:
            if Path(name).is_file():
                copy = Path(tmp) / Path(name).name
                copy.write_text(redact_url(Path(name).read_text()))
                client.log_artifact(run_id, str(copy), artifact_path="config")
    return uri, run_id


class MetricBuffer:
    """Collects (key, value, step) and sends them in batches; non-finite values are dropped
    (MLflow rejects them) but counted in ``dropped``."""

    def __init__(self, client: MlflowClient, run_id: str, flush_every: int = 50):
        self.client, self.run_id, self.flush_every = client, run_id, flush_every
        self.pending: list[Metric] = []
        self.sent = 0
        self.dropped = 0

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        now = int(time.time() * 1000)
        for key, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if not math.isfinite(value):
                self.dropped += 1
                continue
            self.pending.append(Metric(key, float(value), now, int(step)))
        if len(self.pending) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        while self.pending:
            chunk, self.pending = (self.pending[:_MAX_METRICS_PER_BATCH],
                                   self.pending[_MAX_METRICS_PER_BATCH:])
            self.client.log_batch(self.run_id, metrics=chunk)
            self.sent += len(chunk)


def sample_grid(checkpoint: str | Path, num_images: int, steps: int, seed: int = 0):
    """A fixed-seed DDIM grid (H, W, C uint8) from a checkpoint's EMA weights, labels cycling
    through the classes of a conditional model."""
    model, schedule, cfg, _ = load_generator(checkpoint, "cpu")
    classes = cfg.model.num_classes
    labels = torch.arange(num_images) % classes if classes else None
    images = sample(model, schedule, num_images, channels=cfg.data.channels,
                    resolution=cfg.data.resolution, sampler="ddim",
                    steps=min(steps, cfg.diffusion.timesteps), target=cfg.diffusion.target,
                    seed=seed, labels=labels, progress=False)
    return make_grid(images)


class TrainingTracker:
    """The trainer's ``on_metrics`` / ``on_checkpoint`` callbacks, logging to one MLflow run:
    buffered per-step metrics, and a sample grid per checkpoint (``log_image`` with its step)."""

    def __init__(self, cfg: Config, uri: str, run_id: str):
        self.cfg, self.run_id = cfg, run_id
        self.client = client_for(uri)
        self.buffer = MetricBuffer(self.client, run_id, cfg.tracking.flush_every)
        self.grid_seconds = 0.0

    def on_metrics(self, step: int, metrics: dict[str, Any]) -> None:
        self.buffer.log(step, metrics)

    def on_checkpoint(self, step: int, path: Path) -> None:
        t = self.cfg.tracking
        if t.grid_images:
            started = time.perf_counter()
            self.log_grid(step, sample_grid(path, t.grid_images, t.grid_steps))
            self.grid_seconds += time.perf_counter() - started
        else:
            self.buffer.flush()

    def log_grid(self, step: int, grid) -> None:
        """A checkpoint's sample grid (made here, or by a Ray worker and relayed)."""
        self.buffer.flush()
        self.client.log_image(self.run_id, grid, key="samples", step=step)

    def close(self) -> None:
        self.buffer.flush()


def log_hardware(client: MlflowClient, run_id: str, stage: str, hardware: dict[str, Any]) -> None:
    """The resolved device and precision of a stage, so runs from different machines compare
    honestly: ``resolved.<stage>.precision``, ``.device_description``, ... and the reasons, as
    tags (hardware is what a run got, not what a person chose: the params stay the choices)."""
    values = {k: hardware[k] for k in ("precision", "precision_requested", "device_description",
                                        "threads", "world_size", "memory_format", "ray_use_gpu",
                                        "flops_per_image", "precision_switched_at_step")
              if hardware.get(k) is not None}
    for k, v in sorted(values.items()):
        client.set_tag(run_id, f"resolved.{stage}.{k}", redact_url(str(v))[:_MAX_PARAM_LENGTH])
    for k in ("precision_reason", "precision_warning", "memory_format_reason", "ray_scaling"):
        if hardware.get(k):
            client.set_tag(run_id, f"resolved.{stage}.{k}", redact_url(str(hardware[k])))
    if len(hardware.get("precision_history") or ()) > 1:      # the run switched precision
        client.set_tag(run_id, f"resolved.{stage}.precision_history", "; ".join(
            f"{s['precision']} from step {s['step']} ({s['requested']})"
            for s in hardware["precision_history"]))


def log_evaluation(uri: str, run_id: str, metrics: dict[str, Any], grid_path: str | Path | None,
                   metrics_path: str | Path | None = None) -> None:
    """Evaluation results on the training run: FID/KID with spread and floor, per-seed FIDs,
    the fixed-seed grid and the metrics JSON."""
    client = client_for(uri)
    step = int(metrics.get("checkpoint_step", 0))
    buffer = MetricBuffer(client, run_id)
    buffer.log(step, {k: metrics[k] for k in EVAL_METRICS if k in metrics})
    log_hardware(client, run_id, "evaluate", metrics)
    for k, value in enumerate(metrics.get("fid_per_seed", [])):
        buffer.log(step, {f"fid_seed_{k}": value})
    buffer.flush()
    for path in (grid_path, metrics_path):
        if path is not None and Path(path).is_file():
            client.log_artifact(run_id, str(path), artifact_path="evaluation")
    if grid_path is not None and Path(grid_path).is_file():     # in the run's images, by step
        from PIL import Image
        with Image.open(grid_path) as grid:
            client.log_image(run_id, np.asarray(grid.convert("RGB")), key="evaluation_samples",
                             step=step)
