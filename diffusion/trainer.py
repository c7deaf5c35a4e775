"""DDPM training: one ``train_step`` that runs single-process and under DDP, and a resumable loop.

Determinism: the data order of step k comes from a permutation seeded by (seed, epoch), and the
timestep, noise and label dropout of sample i of step k are functions of (seed, k, i) that each
rank computes for its own samples only (:class:`diffusion.batches.BatchPlan`). So a run is reproducible across
resumes, and 2 workers x batch b see exactly what 1 worker x batch 2b sees. Dropout uses the
global RNG, whose state the checkpoint keeps.

Around the loop: :mod:`diffusion.batches` (what each rank trains on), :mod:`diffusion.train_device`
(device and precision), :mod:`diffusion.train_state` (state and checkpoints).
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from diffusion.batches import BatchPlan, DistContext, MicroBatch
from diffusion.config import Config, ConfigError
from diffusion.data import ImageSet
from diffusion.hardware import AUTOCAST_DTYPES, device_description
from diffusion.losses import DiffusionLoss
from diffusion.progress import progress_bar
from diffusion.schedule import NoiseSchedule
from diffusion.throughput import Prefetcher, train_flops_per_image, use_persistent_inductor_cache
from diffusion.train_device import precision_record, resolve_training_precision, select_device
from diffusion.train_state import (CHECKPOINT_NAME, METRICS_NAME, RESUMABLE_KEYS, TrainState, build_state,
                                   restore_training_checkpoint, save_training_checkpoint)
from diffusion.checkpoint import CheckpointError

# the public names of the training API, wherever they live
__all__ = ["BatchPlan", "CHECKPOINT_NAME", "DistContext", "METRICS_NAME", "MicroBatch", "NonFiniteLossError",
           "RESUMABLE_KEYS", "TrainResult", "TrainState", "build_state", "lr_at", "select_device", "train",
           "train_step"]

_NO_BAD_STEP = 2**62


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or Inf; the last good checkpoint is kept."""


def lr_at(step: int, lr: float, warmup_steps: int) -> float:
    """Linear warm-up over ``warmup_steps`` optimizer steps, then constant."""
    return lr * min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else lr


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


# ----------------------------------------------------------------------------- the loop

@dataclass
class TrainResult:
    step: int
    checkpoint: Path
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from: int = 0
    state: TrainState | None = field(default=None, repr=False)   # live model, EMA and optimizer
    stopped_by: str = "steps"       # "steps" (train.steps reached), "budget" (train.budget_minutes)
    #                                 or "interrupt" (the caller's should_stop)
    train_seconds: float = 0.0      # training-loop wall clock over all resumes
    hardware: dict = field(default_factory=dict)   # resolved device / precision choices and why


MetricsCallback = Callable[[int, dict[str, float]], None]
CheckpointCallback = Callable[[int, Path], None]
SetupCallback = Callable[[dict], None]


class _Budget:
    """When to stop before ``train.steps``: ``train.budget_minutes`` of loop wall clock, summed
    over resumes, or a stop the caller requests (``should_stop``, e.g. on a signal). A single
    process reads its own clock and flag (no device sync). Under DDP the ranks agree through a
    MAX all-reduce of "out of time" (1) / "stop requested" (2), so all stop after the same step;
    on CUDA that is checked every 10 steps (each check waits for the GPU)."""

    def __init__(self, minutes: float, spent: float, ctx: DistContext, device: torch.device,
                 should_stop: Callable[[], bool] | None = None) -> None:
        self.limit, self.spent, self.ctx, self.device = minutes * 60.0, spent, ctx, device
        self.should_stop = should_stop
        self.every = 1 if device.type == "cpu" or ctx.world_size == 1 else 10
        self.start = time.perf_counter()

    def seconds(self) -> float:
        return self.spent + time.perf_counter() - self.start

    def exhausted(self, step: int) -> str | None:
        """``"budget"``, ``"interrupt"`` or None (keep training), the same on every rank."""
        if (self.limit <= 0 and self.should_stop is None) or step % self.every:
            return None
        flag = 2.0 if self.should_stop is not None and self.should_stop() else \
            1.0 if self.limit > 0 and self.seconds() >= self.limit else 0.0
        if self.ctx.world_size > 1:
            agreed = torch.tensor([flag], device=self.device)
            dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
            flag = float(agreed.item())
        return {0.0: None, 1.0: "budget", 2.0: "interrupt"}[flag]


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
          on_setup: SetupCallback | None = None,
          should_stop: Callable[[], bool] | None = None) -> TrainResult:
    """Train to ``cfg.train.steps`` optimizer steps or until ``cfg.train.budget_minutes`` of
    training wall clock (counted over resumes) are spent, whichever comes first, resuming from
    ``out_dir/checkpoint.pt`` (with ``resume=False`` an existing checkpoint is an error, never
    overwritten). Either way the last step is checkpointed with its EMA weights.
    ``on_checkpoint(step, path)`` runs on every rank after each checkpoint (rank 0 wrote it).
    ``on_setup(hardware)`` runs once on every rank before the first step with the resolved
    device and precision (``train.precision: auto``) and the reasons; with ``progress`` and no
    callback, rank 0 prints them. ``should_stop()`` (polled after every step, cheap: it reads a
    flag) ends training early like the budget does: the step reached is checkpointed and the
    result says ``stopped_by="interrupt"``; under DDP every rank stops after the same step.

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
                      **precision_record(state.hardware, choice, state.step)}
    if on_setup is not None:
        on_setup(dict(state.hardware))
    elif progress and ctx.is_main:
        print(f"device: {state.hardware['device_description']}; precision {choice.precision} "
              f"({state.hardware['precision_reason']})"
              + (f"\nwarning: {choice.warning}" if choice.warning else "")
              + (f"\nresuming from step {resumed_from}" if resumed_from else ""), file=sys.stderr)
    plan = BatchPlan(data, cfg, ctx, device, state.model.null_class if cfg.model.num_classes else None)
    prefetch = Prefetcher(plan.read, enabled=device.type == "cuda")   # next step's images, in pinned memory
    monitor = _Monitor(device, ctx, plan.step_size)
    history: list[dict[str, float]] = []
    bar = progress_bar(total=cfg.train.steps, initial=state.step, desc="training", unit="step",
                       enabled=progress and ctx.is_main)
    budget = _Budget(cfg.train.budget_minutes, state.train_seconds, ctx, device, should_stop)
    out_of_time = budget.exhausted(state.step)        # a resumed run may have spent it already
    try:
        while state.step < cfg.train.steps and not out_of_time:
            step = state.step
            out = train_step(state, net, loss_fn, plan.micro_batches(step, prefetch.get(step)), cfg, device)
            monitor.record(step, out)
            bar.update(1)
            out_of_time = budget.exhausted(state.step)
            state.train_seconds = budget.seconds()
            done = state.step == cfg.train.steps or out_of_time is not None
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
    stopped_before_training = out_of_time == "interrupt" and state.step == 0
    if state.step == resumed_from and not stopped_before_training:  # nothing left to train
        if ctx.is_main and not ckpt_path.exists():
            save_training_checkpoint(state, cfg, ckpt_path)
        if on_checkpoint is not None:  # the caller still learns where the final checkpoint is
            on_checkpoint(state.step, ckpt_path)
    stopped_by = "steps" if state.step >= cfg.train.steps else out_of_time or "budget"
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
