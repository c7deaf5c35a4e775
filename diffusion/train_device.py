"""Where and in what precision training runs: the device from ``train.device`` and
``train.precision: auto`` resolved by a probe of the real network (see :mod:`diffusion.hardware`),
agreed by every rank under DDP, and pinned for the run: a resume keeps the checkpoint's
precision while ``train.precision`` asks for what it asked then; a changed ``train.precision``
is a switch, recorded with its step (``precision_history``, ``precision_switched_at_step``)."""

from __future__ import annotations

import copy
import dataclasses

import torch
import torch.distributed as dist

from diffusion.batches import DistContext
from diffusion.config import Config, ConfigError
from diffusion.hardware import PrecisionChoice, native_bf16, resolve_precision
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
    agree (bf16 only where every rank chose it), so all run the same arithmetic. A resumed
    ``auto`` run keeps what its checkpoint (``state.hardware``) trained in."""
    kept = _checkpoint_precision(state.hardware, cfg.train.precision, device, state.step)
    if kept is not None:
        return kept                  # every rank restored the same checkpoint: no need to agree
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


def _segments(record: dict) -> list[dict]:
    """The precision segments of a checkpoint's hardware record (one for records that predate
    the history)."""
    if record.get("precision_history"):
        return list(record["precision_history"])
    if record.get("precision"):
        return [{"step": 0, "precision": record["precision"],
                 "requested": record.get("precision_requested", "auto"),
                 "reason": record.get("precision_reason", "")}]
    return []


def _checkpoint_precision(record: dict, requested: str, device: torch.device,
                          step: int) -> PrecisionChoice | None:
    """The checkpoint's precision when a resumed run asks for ``auto`` as it did then (a new
    probe could answer otherwise: another node, a deleted cache, timings near the threshold).
    None when there is nothing to keep or the request is explicit (resolved as asked)."""
    segments = _segments(record)
    if step == 0 or not segments or requested != "auto" or segments[-1]["requested"] != "auto":
        return None
    last = segments[-1]
    warning = ""
    if last["precision"] == "bf16" and not native_bf16(device):
        warning = ("train.precision: this run trains in bf16 (its checkpoint's choice), which this "
                   "device only emulates, slowly; set train.precision=fp32 to switch "
                   f"(recorded at step {step})")
    reason = (f"auto: kept from the checkpoint (step {step}); chosen at step {last['step']}: "
              f"{last['reason']}")
    return PrecisionChoice("auto", last["precision"], reason, warning=warning,
                           measured=record.get("precision_measured"))


def precision_record(previous: dict, choice: PrecisionChoice, step: int) -> dict:
    """The hardware record's precision fields for a segment starting at ``step``: the segments
    so far (``previous``: the checkpoint's record, {} for a new run), a new one when the request
    or the precision changed, and the step of the last switch of precision."""
    segments = _segments(previous)
    switched = previous.get("precision_switched_at_step")
    reason = choice.reason
    last = segments[-1] if segments else None
    if last is None or (last["precision"], last["requested"]) != (choice.precision,
                                                                  choice.requested):
        if last is not None and last["precision"] != choice.precision:
            switched = step
            reason += (f"; switched from {last['precision']} at step {step} (train.precision "
                       f"{last['requested']} -> {choice.requested})")
        segments.append({"step": step, "precision": choice.precision, "requested": choice.requested,
                         "reason": choice.reason})
    return {"precision": choice.precision, "precision_requested": choice.requested,
            "precision_reason": reason, "precision_warning": choice.warning,
            "precision_measured": choice.measured, "precision_history": segments,
            "precision_switched_at_step": switched}
