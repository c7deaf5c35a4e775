"""DDPM training: one ``train_step`` that runs single-process and under DDP, and a resumable loop.

Determinism: the data order of step k comes from a permutation seeded by (seed, epoch), and the
timestep, noise and label dropout of sample i of step k are functions of (seed, k, i) that each
rank computes for its own samples only (:class:`BatchPlan`). So a run is reproducible across
resumes, and 2 workers x batch b see exactly what 1 worker x batch 2b sees. Dropout uses the
global RNG, whose state the checkpoint keeps.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from diffusion import counter_rng
from diffusion.checkpoint import FORMAT, CheckpointError, load_checkpoint, save_atomic
from diffusion.config import Config, ConfigError, EvaluateConfig, ExtractorConfig, RayConfig, TrackingConfig
from diffusion.data import ImageSet, to_model_range
from diffusion.ema import EMA
from diffusion.hardware import AUTOCAST_DTYPES, PrecisionChoice, device_description, resolve_precision
from diffusion.losses import DiffusionLoss
from diffusion.progress import progress_bar
from diffusion.schedule import NoiseSchedule
from diffusion.throughput import Prefetcher, train_flops_per_image, use_persistent_inductor_cache
from diffusion.unet import UNet

# Keys that may change between a run and its resumption without invalidating the checkpoint.
RESUMABLE_KEYS = ("train.steps", "train.budget_minutes", "train.checkpoint_every", "train.log_every",
                  "train.out_dir", "train.device", "train.compile",
                  "data.engine", "data.ray_workers", "data.s3_workers") + tuple(
    f"{section}.{f.name}" for section, cls in (("evaluate", EvaluateConfig), ("extractor", ExtractorConfig),
                                              ("ray", RayConfig), ("tracking", TrackingConfig))
    for f in dataclasses.fields(cls))
CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"
_NO_BAD_STEP = 2**62


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or Inf; the last good checkpoint is kept."""


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1

    @classmethod
    def current(cls) -> "DistContext":
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device = 'cuda': no CUDA device is available here")
    return torch.device(name)


def lr_at(step: int, lr: float, warmup_steps: int) -> float:
    """Linear warm-up over ``warmup_steps`` optimizer steps, then constant."""
    return lr * min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else lr


@dataclass(frozen=True)
class MicroBatch:
    x0: torch.Tensor        # (b, C, H, W) in [-1, 1]
    labels: torch.Tensor | None
    t: torch.Tensor         # (b,)
    noise: torch.Tensor     # (b, C, H, W)
    weights: torch.Tensor   # (b,) importance weights of the timestep sampler


class BatchPlan:
    """Deterministic, stateless batches: everything step k trains on is a function of (seed, k).

    Step k covers positions 0 .. accum x world x b - 1 of the epoch's seeded permutation;
    micro-batch m of rank r takes positions [(m * world + r) * b, +b). The image at a position
    comes from the permutation, and its timestep, noise and label dropout are functions of
    (seed, k, position) alone (:mod:`diffusion.counter_rng`), computed only by the rank that
    trains on it. So 2 workers x b, 1 worker x 2b and 1 worker x b x 2 accumulation steps train
    on the same samples, and a run resumed at any step continues exactly.

    Images are read per micro-batch from the dataset (on demand from the shards, see
    :class:`diffusion.data.ShardReader`) and moved to the device; nothing else of the dataset
    is held but its labels and the epoch's permutation.
    """

    def __init__(self, data: ImageSet, cfg: Config, ctx: DistContext, device: torch.device,
                 null_class: int | None) -> None:
        self.images = data.images
        self.labels = data.labels
        self.cfg, self.ctx, self.device, self.null_class = cfg, ctx, device, null_class
        self.local = cfg.train.batch_size
        self.step_size = self.local * ctx.world_size * cfg.train.grad_accum
        n = self.images.shape[0]
        if n < self.step_size:
            raise ConfigError(f"train.batch_size = {self.local}: the samples per step ({self.step_size}"
                              f" = batch_size x grad_accum x {ctx.world_size} workers) exceed the "
                              f"{n} training images")
        self.per_epoch = n // self.step_size
        self._perm_epoch, self._perm = -1, torch.empty(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.cfg.train.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(self.images.shape[0], generator=g)
            self._perm_epoch = epoch
        return self._perm

    def read(self, step: int) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """The host side of step k: per micro-batch of this rank, (first position, images,
        labels) read from the dataset; in pinned memory when training on CUDA, so the copy to
        the device does not block (:class:`diffusion.throughput.Prefetcher` runs this ahead)."""
        epoch, offset = divmod(step, self.per_epoch)
        index = self._permutation(epoch)[offset * self.step_size:(offset + 1) * self.step_size]
        pin = self.device.type == "cuda"
        out = []
        for m in range(self.cfg.train.grad_accum):
            start = (m * self.ctx.world_size + self.ctx.rank) * self.local
            mine = index[start:start + self.local]
            images, labels = self.images[mine], self.labels[mine]
            out.append((start, images.pin_memory() if pin else images,
                        labels.pin_memory() if pin else labels))
        return out

    def micro_batches(self, step: int, host: list[tuple[int, torch.Tensor, torch.Tensor]] | None = None
                      ) -> list[MicroBatch]:
        """Step k's micro-batches on the device, from ``host`` (:meth:`read` of the same step)."""
        seed, shape = self.cfg.train.seed, tuple(self.images.shape[1:])
        out = []
        for start, images, labels in (host if host is not None else self.read(step)):
            positions = torch.arange(start, start + self.local, device=self.device)
            x0 = to_model_range(images.to(self.device, non_blocking=True))
            t = counter_rng.randint(seed, step, counter_rng.STREAM_TIMESTEP, positions,
                                    self.cfg.diffusion.timesteps)
            noise = counter_rng.normal(seed, step, counter_rng.STREAM_NOISE, positions, shape)
            y = None
            if self.null_class is not None:
                drop = counter_rng.uniform(seed, step, counter_rng.STREAM_DROPOUT, positions)
                y = torch.where(drop < self.cfg.model.class_dropout,
                                torch.full((self.local,), self.null_class, device=self.device),
                                labels.to(self.device, non_blocking=True))
            out.append(MicroBatch(x0, y, t, noise, torch.ones(self.local, device=self.device)))
        return out


@dataclass
class TrainState:
    model: UNet
    ema: EMA
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    step: int = 0
    train_seconds: float = 0.0      # wall-clock spent in the training loop, over all resumes
    precision: str = "fp32"         # resolved autocast precision (train() resolves "auto")
    hardware: dict = field(default_factory=dict)   # device and precision choices, with reasons


def build_state(cfg: Config, device: torch.device, num_classes_in_data: int) -> TrainState:
    if cfg.model.num_classes and cfg.model.num_classes < num_classes_in_data:
        raise ConfigError(f"model.num_classes = {cfg.model.num_classes}: the data has "
                          f"{num_classes_in_data} classes")
    torch.manual_seed(cfg.train.seed)
    model = UNet(cfg.model, cfg.data.channels, cfg.data.resolution).to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr,
                                  betas=(cfg.train.adam_beta1, cfg.train.adam_beta2),
                                  weight_decay=cfg.train.weight_decay,
                                  fused=True if device.type == "cuda" else None)   # one kernel per step
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.precision == "fp16")  # auto: never fp16
    precision = cfg.train.precision if cfg.train.precision != "auto" else "fp32"   # until resolved
    return TrainState(model, EMA(model, cfg.train.ema_decay, cfg.train.ema_warmup), optimizer, scaler,
                      precision=precision)


def train_step(state: TrainState, net: nn.Module, loss_fn: DiffusionLoss, micro_batches: list[MicroBatch],
               cfg: Config, device: torch.device) -> dict[str, torch.Tensor]:
    """One optimizer step over ``micro_batches`` (gradient accumulation). ``net`` is the model,
    or its DDP / compiled wrapper; gradients sync only on the last micro-batch. Returns device
    tensors (no host sync): mean loss and the pre-clipping global grad norm."""
    for group in state.optimizer.param_groups:
        group["lr"] = lr_at(state.step, cfg.train.lr, cfg.train.warmup_steps)
    amp = AUTOCAST_DTYPES[state.precision]
    ddp = getattr(net, "_orig_mod", net)          # a compiled module wraps the DDP one
    total = torch.zeros((), device=device)
    for i, mb in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        sync = ddp.no_sync() if isinstance(ddp, DDP) and not last else contextlib.nullcontext()
        x0 = mb.x0.contiguous(memory_format=torch.channels_last) if cfg.train.channels_last else mb.x0
        with sync:
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                per_sample = loss_fn(net, x0, mb.t, mb.noise, mb.weights, mb.labels)   # (b,)
            loss = per_sample.mean() / len(micro_batches)
            state.scaler.scale(loss).backward()
        total += loss.detach()
    state.scaler.unscale_(state.optimizer)
    max_norm = cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(state.model.parameters(), max_norm)
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.optimizer.zero_grad(set_to_none=True)
    state.ema.update(state.model)
    state.step += 1
    return {"loss": total, "grad_norm": grad_norm.detach()}


def _probe_workload(model: UNet, loss_fn: DiffusionLoss, cfg: Config, device: torch.device,
                    null_class: int | None):
    """One forward + backward of a copy of the network at the local batch, on random data, for
    the precision probe (the model, the optimizer and the global RNG are left untouched)."""
    probe = copy.deepcopy(model)
    b, c, r = cfg.train.batch_size, cfg.data.channels, cfg.data.resolution
    g = torch.Generator(device).manual_seed(0)
    x0 = torch.rand((b, c, r, r), generator=g, device=device) * 2 - 1
    t = torch.randint(0, cfg.diffusion.timesteps, (b,), generator=g, device=device)
    noise = torch.randn((b, c, r, r), generator=g, device=device)
    labels = (torch.randint(0, cfg.model.num_classes, (b,), generator=g, device=device)
              if null_class is not None else None)
    weights = torch.ones(b, device=device)

    def run(dtype: torch.dtype | None) -> int:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = loss_fn(probe, x0, t, noise, weights, labels).mean()
            loss.backward()
        probe.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return b
    return run


def resolve_training_precision(state: TrainState, loss_fn: DiffusionLoss, cfg: Config,
                               device: torch.device, ctx: DistContext) -> PrecisionChoice:
    """``train.precision`` for this device (see :mod:`diffusion.hardware`); under DDP the ranks
    agree (bf16 only where every rank chose it), so all run the same arithmetic."""
    null_class = state.model.null_class if cfg.model.num_classes else None
    shape = {"work": "train", "model": dataclasses.asdict(cfg.model), "target": cfg.diffusion.target,
             "image": [cfg.data.channels, cfg.data.resolution], "batch": cfg.train.batch_size}
    built = []                        # the probe's model copy and batch, only if a probe runs

    def workload(dtype: torch.dtype | None) -> int:
        if not built:
            built.append(_probe_workload(state.model, loss_fn, cfg, device, null_class))
        return built[0](dtype)
    choice = resolve_precision(cfg.train.precision, device, shape=shape, what="train.precision",
                               workload=workload)
    if cfg.train.precision == "auto" and ctx.world_size > 1:
        agreed = torch.tensor([1.0 if choice.precision == "bf16" else 0.0], device=device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
        if choice.precision == "bf16" and not bool(agreed.item()):
            choice = dataclasses.replace(choice, precision="fp32",
                                         reason=choice.reason + "; another rank chose fp32, so all do")
    return choice


# ----------------------------------------------------------------------------- checkpoints

def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def save_training_checkpoint(state: TrainState, cfg: Config, path: Path) -> Path:
    return save_atomic({
        "format": FORMAT,
        "step": state.step,
        "config": json.dumps(cfg.to_dict(), sort_keys=True),
        "config_hash": cfg.hash(exclude=RESUMABLE_KEYS),
        "model": state.model.state_dict(),
        "ema": state.ema.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "scaler": state.scaler.state_dict(),
        "rng": _rng_state(),
        "train_seconds": state.train_seconds,
        "hardware": json.dumps(state.hardware, sort_keys=True),
    }, path)


def restore_training_checkpoint(state: TrainState, cfg: Config, path: Path,
                                device: torch.device) -> None:
    ckpt = load_checkpoint(path, map_location=device)
    if ckpt["config_hash"] != cfg.hash(exclude=RESUMABLE_KEYS):
        stored = json.loads(ckpt["config"])
        now = cfg.to_dict()
        changed = sorted(f"{s}.{k}" for s in now for k in now[s]
                         if f"{s}.{k}" not in RESUMABLE_KEYS and stored.get(s, {}).get(k) != now[s][k])
        raise CheckpointError(f"{path}: was trained with a different configuration "
                              f"(changed: {', '.join(changed) or 'unknown'}); use another "
                              "train.out_dir or restore those values to resume")
    state.model.load_state_dict(ckpt["model"])
    state.ema.load_state_dict(ckpt["ema"])
    state.optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt.get("scaler"):
        state.scaler.load_state_dict(ckpt["scaler"])
    state.step = int(ckpt["step"])
    state.train_seconds = float(ckpt.get("train_seconds", 0.0))
    rng = ckpt.get("rng", {})
    if "torch" in rng:
        torch.set_rng_state(rng["torch"].cpu())
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])


# ----------------------------------------------------------------------------- the loop

@dataclass
class TrainResult:
    step: int
    checkpoint: Path
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from: int = 0
    state: TrainState | None = field(default=None, repr=False)   # live model, EMA and optimizer
    stopped_by: str = "steps"       # "steps" (train.steps reached) or "budget" (train.budget_minutes)
    train_seconds: float = 0.0      # training-loop wall clock over all resumes
    hardware: dict = field(default_factory=dict)   # resolved device / precision choices and why


MetricsCallback = Callable[[int, dict[str, float]], None]
CheckpointCallback = Callable[[int, Path], None]
SetupCallback = Callable[[dict], None]


class _Budget:
    """``train.budget_minutes`` of loop wall clock, summed over resumes. A single process reads
    its own clock (no device sync). Under DDP the ranks agree through a MAX all-reduce of the
    "out of time" flag, so all stop after the same step; on CUDA that flag is checked every 10
    steps (each check waits for the GPU)."""

    def __init__(self, minutes: float, spent: float, ctx: DistContext, device: torch.device) -> None:
        self.limit, self.spent, self.ctx, self.device = minutes * 60.0, spent, ctx, device
        self.every = 1 if device.type == "cpu" or ctx.world_size == 1 else 10
        self.start = time.perf_counter()

    def seconds(self) -> float:
        return self.spent + time.perf_counter() - self.start

    def exhausted(self, step: int) -> bool:
        if self.limit <= 0 or step % self.every:
            return False
        if self.ctx.world_size == 1:
            return self.seconds() >= self.limit
        flag = torch.tensor([float(self.seconds() >= self.limit)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


class _Monitor:
    """Running metrics without host syncs between reports, and the NaN/Inf watch."""

    def __init__(self, device: torch.device, ctx: DistContext, images_per_step: int) -> None:
        self.device, self.ctx, self.images_per_step = device, ctx, images_per_step
        self.loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        self.bad_step = torch.full((), _NO_BAD_STEP, device=device, dtype=torch.long)
        self.count, self.clock = 0, time.perf_counter()

    def record(self, step: int, out: dict[str, torch.Tensor]) -> None:
        loss = out["loss"]
        bad = ~torch.isfinite(loss)
        self.bad_step = torch.where(bad & (self.bad_step == _NO_BAD_STEP), step, self.bad_step)
        self.loss_sum += loss.double()
        self.count += 1

    def check_finite(self, ckpt_path: Path, last_good: int) -> None:
        bad = self.bad_step.clone()
        if self.ctx.world_size > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MIN)
        if int(bad) != _NO_BAD_STEP:
            kept = f"the last good checkpoint {ckpt_path} (step {last_good}) is kept" if last_good \
                else "no checkpoint had been written yet"
            raise NonFiniteLossError(f"loss became NaN or Inf at step {int(bad) + 1}; training "
                                     f"stopped and {kept}")

    def report(self, step: int, out: dict[str, torch.Tensor], lr: float) -> dict[str, float]:
        """Metrics since the last report; under DDP the loss is the mean over all ranks."""
        if self.ctx.world_size > 1:
            dist.all_reduce(self.loss_sum, op=dist.ReduceOp.SUM)
            self.loss_sum /= self.ctx.world_size
        now = time.perf_counter()
        metrics = {"loss": float(self.loss_sum) / max(self.count, 1),
                   "grad_norm": float(out["grad_norm"]), "lr": lr,
                   "img_per_s": self.count * self.images_per_step / max(now - self.clock, 1e-9)}
        self.loss_sum.zero_()
        self.count, self.clock = 0, now
        return metrics


def train(cfg: Config, data: ImageSet, *, resume: bool = True, progress: bool = True,
          on_metrics: MetricsCallback | None = None,
          on_checkpoint: CheckpointCallback | None = None,
          on_setup: SetupCallback | None = None) -> TrainResult:
    """Train to ``cfg.train.steps`` optimizer steps or until ``cfg.train.budget_minutes`` of
    training wall clock (counted over resumes) are spent, whichever comes first, resuming from
    ``out_dir/checkpoint.pt`` (with ``resume=False`` an existing checkpoint is an error, never
    overwritten). Either way the last step is checkpointed with its EMA weights.
    ``on_checkpoint(step, path)`` runs on every rank after each checkpoint (rank 0 wrote it).
    ``on_setup(hardware)`` runs once on every rank before the first step with the resolved
    device and precision (``train.precision: auto``) and the reasons; with ``progress`` and no
    callback, rank 0 prints them.

    Works single-process and inside an initialized process group (DDP); only rank 0 writes.
    """
    started = time.perf_counter()
    ctx = DistContext.current()
    device = select_device(cfg.train.device)
    if device.type == "cuda" and ctx.world_size > 1:
        device = torch.device("cuda", torch.cuda.current_device())
    if data.images.shape[1:] != (cfg.data.channels, cfg.data.resolution, cfg.data.resolution):
        raise ConfigError(f"data.resolution/channels = {cfg.data.resolution}/{cfg.data.channels}: "
                          f"the images are {tuple(data.images.shape[1:])}")
    if cfg.model.num_classes and bool((data.labels < 0).any()):
        raise ConfigError(f"model.num_classes = {cfg.model.num_classes}: the training data has "
                          "unlabelled images (no class sub-folders); set model.num_classes = 0")
    out_dir = Path(cfg.train.out_dir).absolute()
    ckpt_path = out_dir / CHECKPOINT_NAME
    if ckpt_path.exists() and not resume:
        raise CheckpointError(f"{ckpt_path} exists and resuming is off; choose another "
                              "train.out_dir (nothing was overwritten)")
    state = build_state(cfg, device, data.num_classes)
    if ckpt_path.exists():
        restore_training_checkpoint(state, cfg, ckpt_path, device)
    resumed_from = last_good = state.step
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        _truncate_metrics(out_dir / METRICS_NAME, state.step)

    net: nn.Module = state.model
    if ctx.world_size > 1:
        net = DDP(state.model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.train.compile:
        use_persistent_inductor_cache()         # kernels compiled once per machine, not per run
        net = torch.compile(net)
    schedule = NoiseSchedule.create(cfg.diffusion.schedule, cfg.diffusion.timesteps).to(device)
    loss_fn = DiffusionLoss(schedule, cfg.diffusion.target, cfg.diffusion.loss_weighting,
                            cfg.diffusion.min_snr_gamma)
    choice = resolve_training_precision(state, loss_fn, cfg, device, ctx)
    state.precision = choice.precision
    flops = train_flops_per_image(state.model, loss_fn, tuple(data.images.shape[1:]),
                                  cfg.diffusion.timesteps,
                                  state.model.null_class if cfg.model.num_classes else None, device)
    state.hardware = {"device": device.type, "device_description": device_description(device),
                      "flops_per_image": round(flops), "compiled": cfg.train.compile,
                      "dist_backend": dist.get_backend() if dist.is_available() and dist.is_initialized()
                      else "none",
                      "threads": torch.get_num_threads(), "world_size": ctx.world_size,
                      "precision": choice.precision, "precision_requested": choice.requested,
                      "precision_reason": choice.reason, "precision_warning": choice.warning,
                      "precision_measured": choice.measured}
    if on_setup is not None:
        on_setup(dict(state.hardware))
    elif progress and ctx.is_main:
        print(f"device: {state.hardware['device_description']}; precision {choice.precision} "
              f"({choice.reason})" + (f"\nwarning: {choice.warning}" if choice.warning else ""),
              file=sys.stderr)
    plan = BatchPlan(data, cfg, ctx, device, state.model.null_class if cfg.model.num_classes else None)
    prefetch = Prefetcher(plan.read, enabled=device.type == "cuda")   # next step's images, in pinned memory
    monitor = _Monitor(device, ctx, plan.step_size)
    history: list[dict[str, float]] = []
    bar = progress_bar(total=cfg.train.steps, initial=state.step, desc="training", unit="step",
                       enabled=progress and ctx.is_main)
    budget = _Budget(cfg.train.budget_minutes, state.train_seconds, ctx, device)
    out_of_time = budget.exhausted(state.step)        # a resumed run may have spent it already
    try:
        while state.step < cfg.train.steps and not out_of_time:
            step = state.step
            out = train_step(state, net, loss_fn, plan.micro_batches(step, prefetch.get(step)), cfg, device)
            monitor.record(step, out)
            bar.update(1)
            out_of_time = budget.exhausted(state.step)
            state.train_seconds = budget.seconds()
            done = state.step == cfg.train.steps or out_of_time
            if state.step % cfg.train.log_every == 0 or done:
                monitor.check_finite(ckpt_path, last_good)
                metrics = monitor.report(state.step, out, lr_at(step, cfg.train.lr, cfg.train.warmup_steps))
                metrics["train_loop_seconds"] = round(state.train_seconds, 3)   # counts over resumes
                # model FLOP/s of this rank (forward + backward, counted): the numerator of MFU
                metrics["tflops"] = metrics["img_per_s"] / ctx.world_size * flops / 1e12
                history.append({"step": state.step, **metrics})
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", img_s=f"{metrics['img_per_s']:.0f}")
                if ctx.is_main:
                    _append_metrics(out_dir / METRICS_NAME, history[-1])
                if on_metrics is not None:
                    on_metrics(state.step, metrics)
            if state.step % cfg.train.checkpoint_every == 0 or done:
                monitor.check_finite(ckpt_path, last_good)
                if ctx.is_main:
                    save_training_checkpoint(state, cfg, ckpt_path)
                last_good = state.step
                if on_checkpoint is not None:
                    on_checkpoint(state.step, ckpt_path)
    finally:
        bar.close()
        prefetch.close()
    if state.step == resumed_from:     # nothing left to train (steps or budget already spent)
        if ctx.is_main and not ckpt_path.exists():
            save_training_checkpoint(state, cfg, ckpt_path)
        if on_checkpoint is not None:  # the caller still learns where the final checkpoint is
            on_checkpoint(state.step, ckpt_path)
    stopped_by = "steps" if state.step >= cfg.train.steps else "budget"
    if ctx.is_main and progress and stopped_by == "budget":
        print(f"training budget of {cfg.train.budget_minutes:g} min reached at step {state.step} "
              f"of {cfg.train.steps} ({state.train_seconds:.0f} s of training)")
    return TrainResult(state.step, ckpt_path, time.perf_counter() - started, history, resumed_from,
                       state, stopped_by, state.train_seconds, dict(state.hardware))


def _append_metrics(path: Path, row: dict[str, float]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric rows past ``step`` (work after the last checkpoint is redone on resume)."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip()
            and json.loads(line)["step"] <= step]
    path.write_text("".join(r + "\n" for r in rows))
