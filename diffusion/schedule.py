"""Noise schedules and the closed-form maths of the forward process (Ho et al. 2020).

A :class:`NoiseSchedule` is immutable: every coefficient is computed once in float64 from the
betas; ``to(device)`` returns a new schedule. All timestep indexing goes through :func:`extract`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import torch

ScheduleName = Literal["linear", "cosine"]
SCHEDULES = ("linear", "cosine")


def linear_betas(timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Ho et al. 2020: betas linear from 1e-4 to 0.02 for T=1000, rescaled by 1000/T for other T
    (improved-diffusion) and clipped at ``max_beta`` so very short chains stay valid."""
    scale = 1000.0 / timesteps
    return torch.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=torch.float64).clamp(max=max_beta)


def cosine_alpha_bar(t: torch.Tensor, s: float = 0.008) -> torch.Tensor:
    """Nichol & Dhariwal 2021, eq. 17: f(t) = cos^2(((t/T + s)/(1 + s)) * pi/2), t in [0, 1]."""
    return torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2


def cosine_betas(timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """betas_t = 1 - alpha_bar(t/T) / alpha_bar((t-1)/T), clipped at ``max_beta`` (eq. 17)."""
    steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    alpha_bar = cosine_alpha_bar(steps)
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)


def extract(coef: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Take ``coef[t]`` (one value per sample) and shape it (B, 1, 1, ...) to broadcast with ``like``."""
    out = coef.to(like.device)[t.to(like.device)].to(like.dtype)
    return out.reshape(t.shape[0], *([1] * (like.dim() - 1)))


@dataclass(frozen=True)
class NoiseSchedule:
    """All forward-process coefficients for t = 0..T-1 (index t is the paper's t+1), float64."""

    betas: torch.Tensor
    alphas: torch.Tensor
    alpha_bar: torch.Tensor
    alpha_bar_prev: torch.Tensor
    sqrt_alpha_bar: torch.Tensor
    sqrt_one_minus_alpha_bar: torch.Tensor
    snr: torch.Tensor                     # alpha_bar / (1 - alpha_bar)
    posterior_variance: torch.Tensor      # beta tilde, Ho et al. eq. 7
    posterior_log_variance: torch.Tensor  # log of beta tilde, first entry clipped (it is 0)
    posterior_mean_coef_x0: torch.Tensor  # sqrt(abar_{t-1}) beta_t / (1 - abar_t)
    posterior_mean_coef_xt: torch.Tensor  # sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t)

    @classmethod
    def from_betas(cls, betas: torch.Tensor) -> "NoiseSchedule":
        betas = betas.to(torch.float64)
        if betas.dim() != 1 or betas.numel() < 2:
            raise ValueError(f"betas must be a 1-D tensor of length >= 2, got shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("betas must lie in (0, 1)")
        alphas = 1.0 - betas
        alpha_bar = torch.cumprod(alphas, dim=0)
        alpha_bar_prev = torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])
        posterior_variance = betas * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar)
        return cls(
            betas=betas,
            alphas=alphas,
            alpha_bar=alpha_bar,
            alpha_bar_prev=alpha_bar_prev,
            sqrt_alpha_bar=alpha_bar.sqrt(),
            sqrt_one_minus_alpha_bar=(1.0 - alpha_bar).sqrt(),
            snr=alpha_bar / (1.0 - alpha_bar),
            posterior_variance=posterior_variance,
            posterior_log_variance=torch.log(
                torch.cat([posterior_variance[1:2], posterior_variance[1:]])),
            posterior_mean_coef_x0=alpha_bar_prev.sqrt() * betas / (1.0 - alpha_bar),
            posterior_mean_coef_xt=alphas.sqrt() * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar),
        )

    @classmethod
    def create(cls, name: str, timesteps: int) -> "NoiseSchedule":
        if name not in SCHEDULES:
            raise ValueError(f"unknown schedule {name!r}; expected one of {', '.join(SCHEDULES)}")
        if timesteps < 2:
            raise ValueError(f"timesteps must be >= 2, got {timesteps}")
        betas = linear_betas(timesteps) if name == "linear" else cosine_betas(timesteps)
        return cls.from_betas(betas)

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]

    def to(self, device: torch.device | str) -> "NoiseSchedule":
        """A copy with every coefficient on ``device`` (still float64 where supported)."""
        dtype = torch.float64 if torch.device(device).type != "mps" else torch.float32
        moved = {f.name: getattr(self, f.name).to(device=device, dtype=dtype)
                 for f in dataclasses.fields(self)}
        return NoiseSchedule(**moved)

    # ------------------------------------------------------------------ forward process
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (Ho et al. eq. 4). Shapes (B, C, H, W)."""
        return (extract(self.sqrt_alpha_bar, t, x0) * x0
                + extract(self.sqrt_one_minus_alpha_bar, t, x0) * noise)

    def q_posterior(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and log-variance of q(x_{t-1} | x_t, x_0) (Ho et al. eq. 6-7)."""
        mean = (extract(self.posterior_mean_coef_x0, t, xt) * x0
                + extract(self.posterior_mean_coef_xt, t, xt) * xt)
        return mean, extract(self.posterior_variance, t, xt), extract(self.posterior_log_variance, t, xt)

    # ------------------------------------------------------------------ parameterisations
    def v_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022, sec. 4)."""
        return (extract(self.sqrt_alpha_bar, t, x0) * noise
                - extract(self.sqrt_one_minus_alpha_bar, t, x0) * x0)

    def predict_x0_eps(self, xt: torch.Tensor, t: torch.Tensor, model_output: torch.Tensor,
                       target: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, eps) implied by the network output under parameterisation ``target`` (eps or v)."""
        a = extract(self.sqrt_alpha_bar, t, xt)
        s = extract(self.sqrt_one_minus_alpha_bar, t, xt)
        if target == "eps":
            eps = model_output
            x0 = (xt - s * eps) / a
        elif target == "v":
            x0 = a * xt - s * model_output
            eps = s * xt + a * model_output
        else:
            raise ValueError(f"unknown target {target!r}; expected 'eps' or 'v'")
        return x0, eps

    def eps_from_x0(self, xt: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar)."""
        return (xt - extract(self.sqrt_alpha_bar, t, xt) * x0) / extract(
            self.sqrt_one_minus_alpha_bar, t, xt)
