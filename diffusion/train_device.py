"""Where and in what precision training runs: the device from ``train.device`` and
``train.precision: auto`` resolved by a probe of the real network (see :mod:`diffusion.hardware`),
agreed by every rank under DDP."""

from __future__ import annotations

import copy
import dataclasses

import torch
import torch.distributed as dist

from diffusion.batches import DistContext
from diffusion.config import Config, ConfigError
from diffusion.hardware import PrecisionChoice, resolve_precision
from diffusion.losses import DiffusionLoss
from diffusion.train_state import TrainState
from diffusion.unet import UNet


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device = 'cuda': no CUDA device is available here")
    return torch.device(name)



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

