"""The training state (network, EMA, optimizer, scaler, step) and its checkpoint: what is saved,
what a resume must find unchanged, and the RNG state that makes a resume bit-identical."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from diffusion.checkpoint import FORMAT, CheckpointError, load_checkpoint, save_atomic
from diffusion.config import Config, ConfigError, EvaluateConfig, ExtractorConfig, RayConfig, TrackingConfig
from diffusion.ema import EMA
from diffusion.unet import UNet

# Keys that may change between a run and its resumption without invalidating the checkpoint.
RESUMABLE_KEYS = ("train.steps", "train.budget_minutes", "train.checkpoint_every", "train.log_every",
                  "train.out_dir", "train.device", "train.compile",
                  "train.precision",     # a change is recorded as a switch (diffusion.train_device)
                  "data.engine", "data.ray_workers", "data.s3_workers") + tuple(
    f"{section}.{f.name}" for section, cls in (("evaluate", EvaluateConfig), ("extractor", ExtractorConfig),
                                              ("ray", RayConfig), ("tracking", TrackingConfig))
    for f in dataclasses.fields(cls))
CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"


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
    # (after a restore: the checkpoint's, until train() resolves this segment's)


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



def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def save_training_checkpoint(state: TrainState, cfg: Config, path: Path) -> Path:
    return save_atomic({
        "format": FORMAT,
        "step": state.step,
        "config": json.dumps(cfg.public_dict(), sort_keys=True),   # no credentials in URLs
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
        now = cfg.public_dict()
        changed = sorted(f"{s}.{k}" for s in now for k in now[s]
                         if f"{s}.{k}" not in RESUMABLE_KEYS and stored.get(s, {}).get(k) != now[s][k])
    else:
        changed = []
    if changed:      # none: the checkpoint predates a key becoming resumable (train.precision)
        raise CheckpointError(f"{path}: was trained with a different configuration "
                              f"(changed: {', '.join(changed)}); use another "
                              "train.out_dir or restore those values to resume")
    state.model.load_state_dict(ckpt["model"])
    state.ema.load_state_dict(ckpt["ema"])
    state.optimizer.load_state_dict(ckpt["optimizer"])
    for group in state.optimizer.param_groups:   # the device's implementation, not the saved one's
        group["fused"] = True if device.type == "cuda" else None
        if device.type == "cuda":
            group["foreach"] = None
    if ckpt.get("scaler"):
        state.scaler.load_state_dict(ckpt["scaler"])
    state.step = int(ckpt["step"])
    state.train_seconds = float(ckpt.get("train_seconds", 0.0))
    state.hardware = json.loads(ckpt.get("hardware") or "{}")
    rng = ckpt.get("rng", {})
    if "torch" in rng:
        torch.set_rng_state(rng["torch"].cpu())
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])

