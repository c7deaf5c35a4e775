"""Training objective: timestep sampling, targets and per-sample losses.

Losses return one value per sample; the trainer reduces them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from diffusion.schedule import NoiseSchedule

TARGETS = ("eps", "v")
LOSS_WEIGHTINGS = ("none", "min_snr")


@dataclass(frozen=True)
class UniformTimestepSampler:
    """t ~ U{0, ..., T-1}; importance weights are all one (improved-diffusion's ScheduleSampler)."""

    num_timesteps: int

    def sample(self, n: int, generator: torch.Generator, device: torch.device | str = "cpu"
               ) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.randint(0, self.num_timesteps, (n,), generator=generator, device=device)
        return t, torch.ones(n, device=device)


def min_snr_weight(snr: torch.Tensor, gamma: float, target: str) -> torch.Tensor:
    """Min-SNR-gamma weights (Hang et al. 2023), expressed for the network's target.

    The x0-space weight min(SNR, gamma) becomes min(SNR, gamma) / SNR for eps-prediction and
    min(SNR, gamma) / (SNR + 1) for v-prediction.
    """
    clipped = snr.clamp(max=gamma)
    if target == "eps":
        return clipped / snr
    if target == "v":
        return clipped / (snr + 1)
    raise ValueError(f"unknown target {target!r}; expected one of {', '.join(TARGETS)}")


@dataclass(frozen=True)
class DiffusionLoss:
    """Per-sample weighted MSE between the network output and its target (eps or v).

    ``__call__`` returns a (B,) tensor: mean over pixels of ||target - net(x_t, t)||^2,
    times the loss weight at t times the timestep sampler's importance weight.
    """

    schedule: NoiseSchedule
    target: str = "eps"
    weighting: str = "none"
    min_snr_gamma: float = 5.0

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"unknown target {self.target!r}; expected one of {', '.join(TARGETS)}")
        if self.weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"unknown loss weighting {self.weighting!r}; "
                             f"expected one of {', '.join(LOSS_WEIGHTINGS)}")

    def __call__(self, net: Callable[..., torch.Tensor], x0: torch.Tensor, t: torch.Tensor,
                 noise: torch.Tensor, sample_weights: torch.Tensor,
                 labels: torch.Tensor | None = None) -> torch.Tensor:
        xt = self.schedule.q_sample(x0, t, noise)                      # (B, C, H, W)
        output = net(xt, t, labels) if labels is not None else net(xt, t)
        target = noise if self.target == "eps" else self.schedule.v_target(x0, noise, t)
        per_sample = (output.float() - target.float()).pow(2).flatten(1).mean(1)   # (B,)
        if self.weighting == "min_snr":
            snr = self.schedule.snr.to(t.device)[t].to(per_sample.dtype)           # (B,)
            per_sample = per_sample * min_snr_weight(snr, self.min_snr_gamma, self.target)
        return per_sample * sample_weights
