"""Ray Train adapter around the library trainer: it only builds the distributed context, points
each rank at the data and reports checkpoints; the training step is ``diffusion.trainer``'s.

Cluster by configuration: with ``RAY_ADDRESS`` set, the existing cluster; otherwise a local one
sized to this machine (dashboard off). gloo on CPUs, NCCL on GPUs. Global batch =
train.batch_size x train.grad_accum x ray.num_workers. Checkpoints go through
``ray.train.report`` into ``ray.storage_path/<ray.run_name>-<config hash>``; a restarted worker
group resumes from ``ray.train.get_checkpoint()``, and re-running the same configuration under the
same run name continues the run.

Nodes that share nothing with the driver but the network (KubeRay, cluster launcher, cloud GPU
pools) get everything by version, never by the driver's paths:

- data: each worker obtains the prepared dataset by its DVC version (:mod:`flows.datasets`: in
  place when the path holds that version, else the node's cache, else the DVC remote; one
  download per node);
- tracking: workers never talk to MLflow. Rank 0's hardware choices, metrics and checkpoint
  sample grids travel to the driver through a Ray queue actor (reachable from any node), and the
  driver logs them, so an embedded SQLite store works with remote workers exactly as a server
  does; the driver also shows one progress display, whatever the number of workers;
- code: the image (``infra/``) carries the code; every worker compares a digest of its
  ``diffusion`` and ``flows`` sources with the driver's and refuses to train on a mismatch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import socket
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train import Checkpoint, FailureConfig, RunConfig, ScalingConfig
from ray.train import WorkerGroupError
from ray.train.torch import TorchConfig, TorchTrainer

from diffusion.checkpoint import load_checkpoint
from diffusion.config import Config, ConfigError, config_from_dict
from diffusion.data import load_dataset
from diffusion.prepare import dataset_version
from diffusion.trainer import CHECKPOINT_NAME, METRICS_NAME, RESUMABLE_KEYS, NonFiniteLossError, train
from flows.datasets import DatasetUnavailable, Remote, dvc_remote, obtain, remote_has
from flows.provenance import source_digest
from flows.ray_channel import RunChannel


class CodeMismatch(ConfigError):
    """A worker runs other code than the driver (a deployment error: every node needs the same image)."""


class GpuUnavailable(ConfigError):
    """Ray gave a worker a GPU, but torch in that worker sees no CUDA device."""


WORKER_SETUP_ERRORS = (CodeMismatch, DatasetUnavailable, GpuUnavailable)
CPU_WORKERS = 2              # ray.num_workers: auto on a cluster without GPUs (the global batch of 64)


@dataclass(frozen=True)
class Scaling:
    """``ray.use_gpu`` and ``ray.num_workers`` resolved against the cluster, and why."""
    num_workers: int
    use_gpu: bool
    reason: str


def resolve_scaling(cfg: Config, resources: dict[str, float], *, cluster: str) -> Scaling:
    """Resolve ``ray.use_gpu`` / ``ray.num_workers`` (each ``auto`` or a value) from the cluster's
    ``resources`` (``ray.cluster_resources()``): GPUs when the cluster has at least one worker's
    worth and ``train.device`` allows them, then one worker per ``ray.gpus_per_worker`` GPUs;
    on CPUs, 2 workers. ``cluster`` names the cluster in errors. An explicit ``use_gpu: true``
    on a cluster without enough GPUs, or ``train.device: cuda`` without GPUs, fails here, before
    Ray Train waits for resources that will not come."""
    r, device = cfg.ray, cfg.train.device
    gpus, per = float(resources.get("GPU", 0.0)), r.gpus_per_worker
    wanted = per * (r.num_workers if r.num_workers != "auto" else 1)   # GPUs the asked-for workers need
    if r.use_gpu is True and device == "cpu":
        raise ConfigError("ray.use_gpu = true with train.device = 'cpu': the workers would hold GPUs "
                          "and not use them; set train.device to auto or cuda, or ray.use_gpu to auto")
    if r.use_gpu is True or device == "cuda":
        key = "ray.use_gpu = true" if r.use_gpu is True else "train.device = 'cuda'"
        if per <= 0:
            raise ConfigError(f"{key} with ray.gpus_per_worker = 0: set ray.gpus_per_worker > 0")
        if r.use_gpu is False:
            raise ConfigError("train.device = 'cuda' with ray.use_gpu = false: Ray workers that "
                              "request no GPU see none; set ray.use_gpu to auto or true")
        if gpus < wanted:
            raise ConfigError(f"{key}: {cluster} has {gpus:g} GPUs and "
                              + (f"ray.num_workers x ray.gpus_per_worker = {wanted:g} are needed"
                                 if r.num_workers != "auto" else f"a worker needs {per:g}")
                              + "; run on a cluster with GPUs (RAY_ADDRESS), or set ray.use_gpu=auto "
                                "to train on CPUs")
    if r.use_gpu == "auto":                     # every worker asked for must fit, else CPUs
        use_gpu = device != "cpu" and per > 0 and gpus >= wanted
        why = (f"{gpus:g} GPUs in {cluster}" if use_gpu else
               "train.device = 'cpu'" if device == "cpu" else f"no GPUs in {cluster}")
    else:
        use_gpu, why = bool(r.use_gpu), f"ray.use_gpu = {str(r.use_gpu).lower()}"
    if r.num_workers != "auto":
        workers, how = int(r.num_workers), "as configured"
    elif use_gpu:
        workers, how = max(1, int(gpus // per)), f"one per {per:g} GPU"
    else:
        workers, how = CPU_WORKERS, "the CPU default"
    kind = "GPU" if use_gpu else "CPU"
    return Scaling(workers, use_gpu, f"{workers} {kind} worker{'s' if workers != 1 else ''} "
                                     f"({how}; {why})")


def resolved(cfg: Config, scaling: Scaling) -> Config:
    """``cfg`` with ``ray.use_gpu`` and ``ray.num_workers`` replaced by their resolved values."""
    return dataclasses.replace(cfg, ray=dataclasses.replace(cfg.ray, use_gpu=scaling.use_gpu,
                                                            num_workers=scaling.num_workers))


def gpu_report() -> dict:
    """What a Ray worker process was given and what torch there sees (runs on the worker)."""
    ids = [str(i) for i in ray.get_runtime_context().get_accelerator_ids().get("GPU", [])]
    cuda = torch.cuda.is_available()
    return {"node": socket.gethostname(), "ray_gpu_ids": ids,
            "visible": os.environ.get("CUDA_VISIBLE_DEVICES", "(unset)"), "cuda": cuda,
            "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            if cuda else [],
            "torch": torch.__version__, "torch_cuda": torch.version.cuda or "none"}


def check_gpu() -> None:
    """In a Ray worker or task that holds a GPU: raise :class:`GpuUnavailable` with the sentence
    of :func:`gpu_problem` when torch there sees no CUDA device."""
    problem = gpu_problem(gpu_report())
    if problem:
        raise GpuUnavailable(problem)


def gpu_problem(report: dict) -> str | None:
    """The sentence for a worker that Ray gave a GPU but where torch sees no CUDA device."""
    if not report["ray_gpu_ids"] or report["cuda"]:
        return None
    build = (f"torch {report['torch']} is a build without CUDA" if report["torch_cuda"] == "none"
             else f"torch {report['torch']} (CUDA {report['torch_cuda']}) finds no usable device: "
                  "check the node's NVIDIA driver")
    return (f"Ray gave this worker a GPU (node {report['node']}, GPU ids "
            f"{','.join(report['ray_gpu_ids'])}, CUDA_VISIBLE_DEVICES={report['visible']}) but torch "
            f"sees no CUDA device: {build}. Install a CUDA build of torch on that node (infra/), or "
            "set ray.use_gpu=false")


def _gpu_preflight(cfg: Config, timeout_s: float = 300.0) -> list[dict]:
    """Before Ray Train starts its NCCL group (which fails with a bare "NCCL not built in" on a
    CPU build of torch): one short task per worker, each holding a worker's GPUs and custom
    resources, reports what torch sees there. Returns the reports; raises :class:`GpuUnavailable`."""
    r = cfg.ray
    # max_calls=1: the process exits after the probe and frees the GPU (an option of the
    # decorator only; .options() refuses it)
    custom = _worker_resources(cfg)
    probe = ray.remote(num_cpus=0, num_gpus=r.gpus_per_worker, max_calls=1,
                       **({"resources": custom} if custom else {}))(gpu_report)
    refs = [probe.remote() for _ in range(r.num_workers)]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    if len(ready) < len(refs):
        for ref in refs:
            ray.cancel(ref, force=True)
        raise GpuUnavailable(f"ray.use_gpu: {len(refs) - len(ready)} of {len(refs)} GPU workers "
                             f"could not be placed within {timeout_s:.0f} s; {cluster_name()} has "
                             f"{ray.cluster_resources().get('GPU', 0):g} GPUs, "
                             f"{ray.available_resources().get('GPU', 0):g} of them free (other jobs "
                             "hold the rest, or their nodes are not up yet)")
    reports = ray.get(refs)
    for report in reports:
        problem = gpu_problem(report)
        if problem:
            raise GpuUnavailable(problem)
    return reports


def _absolute(cfg: Config) -> Config:
    """Ray workers chdir into their run directory: make every path absolute first."""
    data = dataclasses.replace(cfg.data, prepared_dir=str(Path(cfg.data.prepared_dir).absolute()))
    return dataclasses.replace(cfg, data=data)


def code_version() -> dict[str, str]:
    """A digest of the ``diffusion`` and ``flows`` sources this process imports (what decides the
    trained model), with the torch version: equal on the driver and every worker, or no run."""
    return {"digest": source_digest(), "torch": torch.__version__}


def _check_code(driver: dict[str, str]) -> None:
    mine = code_version()
    if mine != {k: driver[k] for k in mine}:
        raise CodeMismatch(
            f"the worker on node {socket.gethostname()} runs code {mine['digest']} with torch "
            f"{mine['torch']}; the driver runs {driver['digest']} with torch {driver['torch']} (git "
            f"{driver.get('git', 'unknown')}): deploy the driver's image or commit to every node "
            "(infra/README.md) and run again")


def _worker_resources(cfg: Config) -> dict[str, float]:
    """``ray.worker_resources`` entries ``name=amount``: custom resources each worker needs."""
    out = {}
    for item in cfg.ray.worker_resources:
        name, sep, amount = item.partition("=")
        try:
            value = float(amount)
        except ValueError:
            value = -1.0
        if not sep or not name.strip() or value <= 0:
            raise ConfigError(f"ray.worker_resources: {item!r}: expected name=amount with a "
                              "positive amount, e.g. accelerator_h100=1")
        out[name.strip()] = value
    return out


def copy_training_files(checkpoint: Checkpoint, dest: Path) -> None:
    """The trainer's files (checkpoint and metrics) from a Ray Train or Tune checkpoint into ``dest``."""
    with checkpoint.as_directory() as d:
        for name in (CHECKPOINT_NAME, METRICS_NAME):
            if (Path(d) / name).exists():
                shutil.copy(Path(d) / name, dest / name)


def _param_checksum(model: torch.nn.Module) -> torch.Tensor:
    return torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1)


def train_loop_per_worker(config: dict) -> None:
    cfg = config_from_dict(config["cfg"], "ray worker config")
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    channel = config.get("events")

    def emit(event: dict) -> None:
        if channel is not None:
            ray.get(channel.put.remote(event), timeout=60)

    # before any device work: the same code as the driver, a GPU torch can use, the data by version
    _check_code(config["code"])
    if cfg.ray.use_gpu:
        check_gpu()
    data = config["data"]
    got = obtain(data["version"], cfg.data.prepared_dir,
                 Remote(**data["remote"]) if data.get("remote") else None)
    emit({"kind": "data", "rank": rank, "node": socket.gethostname(), "how": got.how,
          "seconds": round(got.seconds, 3), "bytes": got.bytes, "path": str(got.path)})
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, prepared_dir=str(got.path)))
    if not cfg.ray.use_gpu:                      # one intra-op thread per CPU Ray granted us
        torch.set_num_threads(max(1, int(cfg.ray.cpus_per_worker)))
    with contextlib.ExitStack() as cleanup:      # what Ray Train persisted at each report stays
        workdir = Path(tempfile.mkdtemp(prefix=f"ddpm-rank{rank}-"))
        cleanup.callback(shutil.rmtree, workdir, True)
        # this run's own latest (a worker restarted), else the one the caller gave (a resumed trial)
        resume_from = ray.train.get_checkpoint() or config.get("resume_from")
        if resume_from is not None:
            copy_training_files(resume_from, workdir)
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, out_dir=str(workdir)))
        last_metrics: dict = {}
        resumed_from = int(load_checkpoint(workdir / CHECKPOINT_NAME)["step"]) \
            if (workdir / CHECKPOINT_NAME).exists() else 0

        grids = bool(config.get("grids")) and cfg.tracking.grid_images > 0
        stop = StopWatch(channel)
        cleanup.callback(stop.close)
        trial = config.get("trial")              # a sweep's trial: rank 0 scores each checkpoint
        score = None
        if trial is not None and rank == 0:      # its extractor beside, not in, the reported checkpoint
            from flows.sweep_trials import QuickFid
            scoring = Path(tempfile.mkdtemp(prefix=f"ddpm-rank{rank}-fid-"))
            cleanup.callback(shutil.rmtree, scoring, True)
            score = QuickFid(cfg, trial, scoring, str(ray.train.torch.get_device()))

        def on_metrics(step: int, metrics: dict) -> None:
            last_metrics.update(metrics, step=step)
            if rank == 0:
                emit({"kind": "metrics", "step": step, **metrics})

        def on_checkpoint(step: int, path: Path) -> None:
            if rank == 0 and grids and not stop.requested():   # the driver logs it (workers never talk to MLflow)
                from flows.tracking import sample_grid
                t = cfg.tracking
                emit({"kind": "grid", "step": step,
                      "image": sample_grid(path, t.grid_images, t.grid_steps)})
            metrics = {**last_metrics, "step": step, "resumed_from": resumed_from,
                       "world_size": ctx.get_world_size()}
            if trial is not None:               # no score for a trial being stopped: nobody reads it
                from flows.sweep_trials import trial_progress
                metrics.update(trial_progress(cfg, step, last_metrics),
                               **(score(path) if score and not stop.requested() else {}))
            if rank == 0:
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(path.parent)))
            else:
                ray.train.report(metrics, checkpoint=None)

        try:
            result = train(cfg, load_dataset(cfg.data), progress=False, on_metrics=on_metrics,
                           on_checkpoint=on_checkpoint, should_stop=stop.requested,
                           on_setup=lambda hw: emit({"kind": "setup", **hw, "resumed_from": resumed_from})
                           if rank == 0 else None)
        except NonFiniteLossError as exc:    # every rank raises at the same step (the check is all-reduced)
            if trial is None:
                raise
            from flows.sweep_trials import diverged, trial_progress
            ray.train.report({**trial_progress(cfg, int(last_metrics.get("step", 0)), last_metrics),
                              **diverged(exc)}, checkpoint=None)
            return
    # every rank must hold the same weights: compare a checksum across the group
    total = _param_checksum(result.state.model)
    lo, hi = total.clone(), total.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if bool(lo != hi):
        raise RuntimeError(f"ranks disagree on the weights after training (checksums {lo} .. {hi})")


def start_early() -> None:
    """:func:`init_ray`, for the daemon thread of :func:`flows.ray_early.start`, begun while the
    stages before training run, so that training finds the cluster up: the first
    :func:`init_ray` after it waits for it. A failure is logged (without the address) and left for
    that call to meet again, in the stage that needs Ray, where it is raised. When this started
    the cluster it does not return: Ray starts a local cluster's GCS and raylet with
    ``PR_SET_PDEATHSIG``, which Linux sends when the *thread* that started them ends."""
    try:
        started = init_ray(early=True)
    except BaseException as exc:   # noqa: BLE001 - see above
        logging.getLogger(__name__).warning("starting Ray early failed (%s); the train stage tries again",
                                            type(exc).__name__)
        return
    if started:
        threading.Event().wait()


def init_ray(address: str | None = None, *, early: bool = False) -> bool:
    """Connect to RAY_ADDRESS when set, else start a local cluster sized to this machine: its
    CPUs and the CUDA devices torch sees (Ray's own GPU detection is not consulted, so the
    cluster offers exactly the GPUs the training code can use). Returns whether this call
    started it; an early start (``early``) is skipped once the job is being stopped."""
    from flows import ray_early
    with ray_early.LOCK:
        if ray.is_initialized() or (early and ray_early.STOPPED.is_set()):
            return False
        _init_ray(address)
        return True


def _init_ray(address: str | None) -> None:
    address = address or os.environ.get("RAY_ADDRESS")
    # ray.init replaces the process's SIGTERM handler with sys.exit; the job's own handler
    # (flows/interrupts.py: stop training at a step, checkpoint it) is put back after it
    keep = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    try:
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            # "local": always a new cluster of our own, even when `ray start` left one running here
            ray.init(address="local", num_cpus=os.cpu_count(), num_gpus=torch.cuda.device_count(),
                     include_dashboard=False, log_to_driver=True)
    except SystemExit as exc:       # Ray's own SIGTERM handler fired while it was starting
        if exc.code == signal.SIGTERM and callable(keep):
            from flows.interrupts import Interrupted
            raise Interrupted(signal.SIGTERM) from None
        raise
    finally:
        if keep is not None:
            signal.signal(signal.SIGTERM, keep)


def cluster_name() -> str:
    """How errors and the run's tags name the cluster (never RAY_ADDRESS itself: it may carry
    credentials)."""
    return "the RAY_ADDRESS cluster" if os.environ.get("RAY_ADDRESS") else "this machine's local Ray cluster"


def _check_local_resources(cfg: Config) -> None:
    """On the local cluster (no RAY_ADDRESS) Ray would wait forever for workers this machine
    cannot hold; say so at once. A real cluster may scale up, so only its GPUs are checked
    (:func:`resolve_scaling`)."""
    if os.environ.get("RAY_ADDRESS"):
        return
    r = cfg.ray
    have = ray.cluster_resources()
    wanted = {"CPU": r.num_workers * r.cpus_per_worker,
              **({"GPU": r.num_workers * r.gpus_per_worker} if r.use_gpu else {})}
    for kind, amount in wanted.items():
        if amount > have.get(kind, 0):
            per = "ray.cpus_per_worker" if kind == "CPU" else "ray.gpus_per_worker"
            raise ConfigError(f"ray.num_workers x {per} = {amount:g} {kind}s: this machine's local Ray "
                              f"cluster has {have.get(kind, 0):g}; lower ray.num_workers, or set "
                              "RAY_ADDRESS to a cluster that has them")


def ray_run_name(cfg: Config) -> str:
    """``ray.run_name`` plus the hash of everything a resume must keep equal: re-running the same
    configuration continues its run; a changed one (``dvc exp run -S train.lr=...``) starts anew."""
    return f"{cfg.ray.run_name}-{cfg.hash(exclude=RESUMABLE_KEYS)[:8]}"


class EventRelay:
    """The driver's side of a :class:`RunChannel`: a thread that hands each event to
    ``on_event`` and, once ``should_stop()`` is true, asks the workers to stop. An error in
    ``on_event`` does not stop training; the first one is kept in ``error`` for the caller to
    raise once the run is over."""

    POLL_S = 0.25

    def __init__(self, on_event: Callable[[dict], None],
                 should_stop: Callable[[], bool] | None = None) -> None:
        self.channel = ray.remote(num_cpus=0)(RunChannel).remote()   # never takes a worker's CPU
        self.on_event, self.should_stop = on_event, should_stop
        self.error: Exception | None = None
        self.stop_sent = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pump, name="ray-train-events", daemon=True)
        self._thread.start()

    def _deliver(self, event: dict) -> None:
        try:
            self.on_event(event)
        except Exception as exc:   # noqa: BLE001 - reported after training, never stops it
            self.error = self.error or exc

    def _pump(self) -> None:
        while not self._stop.is_set():
            try:
                if not self.stop_sent and self.should_stop is not None and self.should_stop():
                    ray.get(self.channel.request_stop.remote(), timeout=30)
                    self.stop_sent = True
                events = ray.get(self.channel.take.remote(), timeout=30)
            except ray.exceptions.GetTimeoutError:
                continue                       # a loaded machine: ask again, never give up here
            except Exception:   # noqa: BLE001 - the channel actor is gone (cluster shut down)
                return
            for event in events:
                self._deliver(event)
            self._stop.wait(self.POLL_S)

    def close(self) -> None:
        """Deliver what is left, then remove the channel actor."""
        self._stop.set()
        self._thread.join(timeout=10)
        try:
            for event in ray.get(self.channel.take.remote(), timeout=10):
                self._deliver(event)
            ray.kill(self.channel)
        except Exception:   # noqa: BLE001 - already gone with the cluster
            pass


class StopWatch:
    """In a worker: a thread that polls the run's channel for a stop request every ``every``
    seconds; :meth:`requested` is what the training loop polls after each step."""

    def __init__(self, channel, every: float = 0.5) -> None:
        self.channel, self.every = channel, every
        self._flag, self._done = threading.Event(), threading.Event()
        if channel is not None:
            threading.Thread(target=self._poll, name="ray-train-stop", daemon=True).start()

    def _poll(self) -> None:
        while not self._done.wait(self.every):
            try:
                if ray.get(self.channel.stop_requested.remote(), timeout=30):
                    self._flag.set()
                    return
            except Exception:   # noqa: BLE001 - the driver is gone: Ray ends this worker
                return

    def requested(self) -> bool:
        return self._flag.is_set()

    def close(self) -> None:
        self._done.set()


@dataclass(frozen=True)
class RayTrainResult:
    checkpoint: Path          # copied to train.out_dir/checkpoint.pt for the evaluate stage
    run_name: str             # ray.run_name + the config's hash: same config resumes, new one starts
    step: int
    metrics: dict
    ray_checkpoint: str       # where Ray keeps it (local path or s3:// URI)
    train_seconds: float      # training-loop wall clock over all attempts (train.budget_minutes)
    stopped_by: str           # "steps", "budget" or "interrupt" (should_stop)
    hardware: dict            # the workers' resolved device and precision, with the reasons


def data_source(cfg: Config, version: str | None = None) -> dict:
    """What a worker needs to obtain the prepared data: its version (hashed here when not given)
    and the project's default DVC remote (``None`` without one)."""
    remote = dvc_remote()
    return {"version": version or dataset_version(cfg.data.prepared_dir),
            "remote": dataclasses.asdict(remote) if remote else None}


def ray_train(cfg: Config, mlflow_run: tuple[str, str] | None = None,
              on_event: Callable[[dict], None] | None = None,
              dataset: str | None = None,
              should_stop: Callable[[], bool] | None = None, *,
              source: dict | None = None, trial: dict | None = None,
              resume_from: Checkpoint | None = None, local: bool | None = None) -> RayTrainResult | None:
    """Run DDP training on Ray and copy the final checkpoint to ``train.out_dir``. With
    ``mlflow_run = (tracking URI, run id)``, the driver logs rank 0's metrics and sample grids to
    that run; ``on_event`` receives rank 0's ``{"kind": "setup", ...}`` (resolved hardware) and
    ``{"kind": "metrics", "step": ..., ...}`` events and every rank's ``{"kind": "data", ...}``
    (how it obtained the dataset) on the driver. ``dataset``: the data version, when known.
    ``should_stop()`` (polled on the driver) asks the workers to stop: they checkpoint the step
    they reached, which is returned with ``stopped_by="interrupt"``; true before the workers
    start, it raises :class:`flows.interrupts.Interrupted` instead.

    For a sweep's trial (:func:`flows.sweep_trials.ddp_trial`): ``source``, the data source of
    :func:`data_source` made on the sweep's driver; ``trial``, the sweep's setup: rank 0 scores
    each checkpoint with its quick FID and every report comes to ``on_event`` as ``{"kind":
    "report", "metrics", "checkpoint"}`` (the checkpoint as Ray Train persisted it), and None is
    returned; ``resume_from``, the checkpoint to start from. ``local``: whether the cluster is
    this process's own local one, which ends with it (default: no ``RAY_ADDRESS``); a trial passes
    False (the sweep's cluster outlives it: Ray Train's full start, which removes the run's
    placement group when the trial's actor is ended)."""
    local = not os.environ.get("RAY_ADDRESS") if local is None else local
    init_ray()
    scaling = resolve_scaling(cfg, ray.cluster_resources(), cluster=cluster_name())
    cfg = resolved(cfg, scaling)
    r = cfg.ray
    if local:
        _check_local_resources(cfg)
    if r.use_gpu and trial is None:     # a trial's tasks would land in Tune's placement group
        _gpu_preflight(cfg)              # (its workers check their GPU themselves: check_gpu)
    if on_event is not None:
        on_event({"kind": "scaling", "workers": r.num_workers, "use_gpu": r.use_gpu,
                  "reason": scaling.reason})
    run_name = ray_run_name(cfg)
    storage = r.storage_path if "://" in r.storage_path else str(Path(r.storage_path).absolute())
    resources = {"CPU": r.cpus_per_worker, **({"GPU": r.gpus_per_worker} if r.use_gpu else {}),
                 **_worker_resources(cfg)}
    tracker = None
    if mlflow_run is not None:
        from flows.tracking import TrainingTracker
        tracker = TrainingTracker(cfg, *mlflow_run)

    def deliver(event: dict) -> None:
        if tracker is not None and event.get("kind") == "metrics":
            tracker.on_metrics(event["step"], {k: v for k, v in event.items() if k not in ("kind", "step")})
        if tracker is not None and event.get("kind") == "grid":
            tracker.log_grid(event["step"], event["image"])
            return
        if on_event is not None:
            on_event(dict(event))

    relay = EventRelay(deliver, should_stop)
    code = {**code_version(), "git": _git_commit()}
    source = source or data_source(cfg, dataset)
    if not local and trial is None and source["remote"] and not remote_has(
            source["version"], Remote(**source["remote"])):
        from flows.console import console             # say it before the workers fail
        console().warning(f"dataset version {source['version']} is not on the DVC remote "
                          f"{source['remote']['url']}: workers on nodes without "
                          f"{Path(cfg.data.prepared_dir).absolute()} cannot train; run dvc push")
    trainer_class, settings = TorchTrainer, contextlib.nullcontext()
    if local:                                         # this process's own cluster: a lighter start
        from flows.ray_local import local_settings, local_trainer_class
        trainer_class, settings = local_trainer_class(TorchTrainer), local_settings()
    elif trial is not None and trial.get("local"):    # a trial on the sweep driver's local cluster
        from flows.ray_local import trial_trainer_class
        trainer_class = trial_trainer_class(TorchTrainer)
    if should_stop is not None:
        trainer_class = _keeping_signal_handlers(trainer_class)
    trainer = trainer_class(
        train_loop_per_worker,
        train_loop_config={"cfg": _absolute(cfg).to_dict(), "code": code,
                           "data": source, "events": relay.channel,
                           "grids": tracker is not None, "trial": trial,
                           "resume_from": resume_from},    # Ray Train V2 takes no resume_from_checkpoint
        scaling_config=ScalingConfig(num_workers=r.num_workers, use_gpu=r.use_gpu,
                                     resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if r.use_gpu else "gloo"),
        run_config=RunConfig(name=run_name, storage_path=storage,
                             failure_config=FailureConfig(max_failures=r.max_failures),
                             callbacks=[_reports_to(relay.channel)] if trial is not None else None),
    )
    try:
        if should_stop is not None and should_stop():    # before Ray Train starts any worker
            from flows.interrupts import Interrupted, received
            raise Interrupted(received() or signal.SIGINT)
        with settings:
            result = trainer.fit()
    except WorkerGroupError as exc:          # a worker's refusal to start, as the worker said it
        for _, failure in sorted(exc.worker_failures.items()):
            cause = failure if isinstance(failure, WORKER_SETUP_ERRORS) else getattr(failure, "cause", None)
            if isinstance(cause, WORKER_SETUP_ERRORS):
                raise cause from exc
        raise
    finally:
        relay.close()
        if tracker is not None:
            tracker.close()
    if trial is not None:                    # its checkpoints went to Tune with its reports
        if relay.error is not None:
            raise relay.error
        return None
    if result.checkpoint is None:
        raise RuntimeError(f"Ray run {run_name!r} reported no checkpoint")
    out = Path(cfg.train.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    copy_training_files(result.checkpoint, out)
    if relay.error is not None:
        raise RuntimeError(f"training finished (checkpoint in {out}), but the driver could not "
                           f"log rank 0's events: {relay.error}") from relay.error
    final = load_checkpoint(out / CHECKPOINT_NAME)
    step = int(final["step"])
    hardware = {**json.loads(final.get("hardware") or "{}"), "ray_use_gpu": r.use_gpu,
                "ray_scaling": scaling.reason}
    return RayTrainResult(out / CHECKPOINT_NAME, run_name, step, dict(result.metrics or {}),
                          result.checkpoint.path, float(final.get("train_seconds", 0.0)),
                          "steps" if step >= cfg.train.steps else "interrupt" if relay.stop_sent
                          else "budget", hardware)


def _reports_to(channel):
    from flows.ray_report import ReportsToChannel     # Ray Train V2's callback API: trials only
    return ReportsToChannel(channel)


def _keeping_signal_handlers(base: type) -> type:
    """``base`` without Ray Train V2's SIGINT handler: its ``fit()`` replaces the process's
    handler for good with one that aborts the run (the workers are killed, no checkpoint of the
    step reached) and then calls ``sys.exit``. A caller that polls ``should_stop`` handles the
    signal itself and stops the workers in order."""
    if not hasattr(base, "_register_sigint_handler"):     # pragma: no cover - another Ray version
        return base
    return type(base.__name__, (base,), {"_register_sigint_handler": lambda self, controller: None})


def _git_commit() -> str:
    from flows.tracking import git_commit
    return git_commit(Path(__file__).resolve().parents[1])
