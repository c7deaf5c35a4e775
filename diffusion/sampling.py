"""Samplers: DDPM ancestral (Ho et al. 2020) and DDIM (Song et al. 2021) over respaced
timesteps, and the multistep solvers DPM-Solver++(2M) and UniPC (:mod:`diffusion.solvers`).

Each step is a pure function of (schedule, index, x_t, predictions, noise source) that returns
x at the previous kept timestep; :func:`sample` is the loop around them. Noise comes from one
generator per sample seeded by ``seed + index``, so image j is the same whatever the batch size.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from diffusion.checkpoint import checkpoint_config, load_checkpoint
from diffusion.config import Config
from diffusion.hardware import (AUTOCAST_DTYPES, PRECISIONS, PrecisionChoice, choose_fastest,
                                resolve_precision)
from diffusion.progress import progress_bar
from diffusion.schedule import NoiseSchedule
from diffusion.solvers import SOLVERS, SPACINGS, solve, solver_schedule
from diffusion.unet import UNet

SamplerName = Literal["ddpm", "ddim", "dpmpp_2m", "unipc"]
SAMPLERS = ("ddpm", "ddim") + SOLVERS


@dataclass(frozen=True)
class RespacedSchedule:
    """A subset of N timesteps of a schedule, with the coefficients of the shortened chain."""

    timesteps: torch.Tensor       # (N,) int64, ascending indices into the full schedule
    alpha_bar: torch.Tensor       # (N,) float64, abar at each kept timestep
    alpha_bar_prev: torch.Tensor  # (N,) float64, abar at the previous kept timestep (1 for the first)

    @property
    def betas(self) -> torch.Tensor:
        """beta_i = 1 - abar_i / abar_{i-1} of the respaced chain (Nichol & Dhariwal, sec. 4)."""
        return 1.0 - self.alpha_bar / self.alpha_bar_prev

    @property
    def posterior_variance(self) -> torch.Tensor:
        return self.betas * (1.0 - self.alpha_bar_prev) / (1.0 - self.alpha_bar)

    @property
    def posterior_mean_coef_x0(self) -> torch.Tensor:
        """sqrt(abar_{i-1}) beta_i / (1 - abar_i) (Ho et al. eq. 7), float64: exactly 1 at i = 0."""
        return self.alpha_bar_prev.sqrt() * self.betas / (1.0 - self.alpha_bar)

    @property
    def posterior_mean_coef_xt(self) -> torch.Tensor:
        """sqrt(1 - beta_i) (1 - abar_{i-1}) / (1 - abar_i) (Ho et al. eq. 7), float64: 0 at i = 0."""
        return (1.0 - self.betas).sqrt() * (1.0 - self.alpha_bar_prev) / (1.0 - self.alpha_bar)


def respace(schedule: NoiseSchedule, num_steps: int) -> RespacedSchedule:
    """Keep ``num_steps`` evenly spaced timesteps of ``schedule``: t = round(k (T-1) / (N-1)),
    k = 0..N-1, so the chain always starts from pure noise at t = T-1 (with N = 1, only T-1)."""
    total = schedule.num_timesteps
    if not 1 <= num_steps <= total:
        raise ValueError(f"sampling steps must be in [1, {total}], got {num_steps}")
    if num_steps == 1:
        steps = torch.tensor([total - 1])
    else:
        steps = torch.linspace(0, total - 1, num_steps, dtype=torch.float64).round().long()
    alpha_bar = schedule.alpha_bar.cpu()[steps]
    alpha_bar_prev = torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])
    return RespacedSchedule(steps, alpha_bar, alpha_bar_prev)


def _coef(values: torch.Tensor, i: int, like: torch.Tensor) -> torch.Tensor:
    return values[i].to(device=like.device, dtype=like.dtype)


def ddpm_step(rs: RespacedSchedule, i: int, xt: torch.Tensor, x0: torch.Tensor,
              noise: torch.Tensor) -> torch.Tensor:
    """x_{i-1} ~ q(x_{i-1} | x_i, x0_pred) (Ho et al. eq. 6-7, sigma^2 = beta tilde). The
    coefficients are computed in float64 and cast once, so the last step returns x0 exactly."""
    mean = _coef(rs.posterior_mean_coef_x0, i, xt) * x0 + _coef(rs.posterior_mean_coef_xt, i, xt) * xt
    if i == 0:
        return mean
    return mean + _coef(rs.posterior_variance, i, xt).sqrt() * noise


def ddim_step(rs: RespacedSchedule, i: int, xt: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor,
              eta: float, noise: torch.Tensor) -> torch.Tensor:
    """Song et al. 2021 eq. 12: x_{i-1} = sqrt(abar') x0 + sqrt(1 - abar' - sigma^2) eps + sigma z,
    with sigma = eta * sqrt((1 - abar') / (1 - abar)) * sqrt(1 - abar / abar') (eq. 16)."""
    abar, abar_prev = _coef(rs.alpha_bar, i, xt), _coef(rs.alpha_bar_prev, i, xt)
    sigma = eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)).sqrt()
    direction = (1 - abar_prev - sigma**2).clamp(min=0).sqrt() * eps
    out = abar_prev.sqrt() * x0 + direction
    if eta > 0 and i > 0:
        out = out + sigma * noise
    return out


def _predict(model: nn.Module, schedule: NoiseSchedule, timestep: int, x: torch.Tensor, target: str,
             labels: torch.Tensor | None, null_labels: torch.Tensor | None, guidance_scale: float,
             clip_denoised: bool, amp: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, eps) at ``timestep``, with classifier-free guidance when it applies. ``amp``: the
    network runs under autocast to that dtype; the sampler's own arithmetic stays float32."""
    t = torch.full((x.shape[0],), timestep, device=x.device, dtype=torch.long)
    with torch.autocast(x.device.type, dtype=amp or torch.float32, enabled=amp is not None):
        if labels is not None and null_labels is not None and guidance_scale != 1.0:
            out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null_labels]))
            cond, uncond = out.float().chunk(2)
            output = uncond + guidance_scale * (cond - uncond)      # Ho & Salimans 2022, eq. 6
        else:
            output = (model(x, t, labels) if labels is not None else model(x, t)).float()
    x0, eps = schedule.predict_x0_eps(x, t, output, target)
    if clip_denoised:
        x0 = x0.clamp(-1, 1)
        eps = schedule.eps_from_x0(x, t, x0)
    return x0, eps


MEMORY_FORMATS = ("auto", "contiguous", "channels_last")


class _ForwardProbe:
    """The network's forward pass at the sampling batch (doubled under guidance, as
    :func:`_predict` batches both branches) on random inputs, in a given autocast dtype and
    memory format; channels_last runs on a copy, so the caller's model is never changed."""

    def __init__(self, model: nn.Module, *, channels: int, resolution: int, batch_size: int,
                 guided: bool, device: torch.device) -> None:
        self.model, self.device = model, device
        self.batch = batch_size * (2 if guided else 1)
        g = torch.Generator(device).manual_seed(0)
        self.x = torch.randn((self.batch, channels, resolution, resolution), generator=g, device=device)
        self.t = torch.randint(0, 1000, (self.batch,), generator=g, device=device)
        conditional = getattr(model, "class_emb", None) is not None
        self.labels = torch.zeros(self.batch, dtype=torch.long, device=device) if conditional else None
        self.shape = {"work": "sample", "network": _network_signature(model),
                      "image": [channels, resolution], "batch": self.batch}
        self._channels_last: nn.Module | None = None

    @torch.no_grad()
    def __call__(self, dtype: torch.dtype | None, memory_format: str = "contiguous") -> int:
        net, x = self.model, self.x
        if memory_format == "channels_last":
            if self._channels_last is None:
                self._channels_last = _as_channels_last(self.model)
            net, x = self._channels_last, x.contiguous(memory_format=torch.channels_last)
        was_training = net.training
        net.eval()
        with torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            net(x, self.t, self.labels) if self.labels is not None else net(x, self.t)
        net.train(was_training)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return self.batch


def _as_channels_last(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).to(memory_format=torch.channels_last)


def resolve_sampling_precision(model: nn.Module, requested: str, *, channels: int, resolution: int,
                               batch_size: int, guided: bool, device: torch.device | str = "cpu",
                               what: str = "evaluate.precision") -> PrecisionChoice:
    """``requested`` (auto | fp32 | bf16 | fp16) for sampling with ``model`` on ``device``: the
    probe, where one is needed, times the network's forward pass at the sampling batch."""
    probe = _ForwardProbe(model, channels=channels, resolution=resolution, batch_size=batch_size,
                          guided=guided, device=torch.device(device))
    return resolve_precision(requested, probe.device, shape=probe.shape, workload=probe, what=what)


def resolve_sampling_memory_format(model: nn.Module, requested: str, *, precision: str, channels: int,
                                   resolution: int, batch_size: int, guided: bool,
                                   device: torch.device | str = "cpu") -> tuple[str, str]:
    """(memory format, reason) for sampling: ``auto`` times the forward pass in both formats at
    the resolved ``precision`` (cached per machine and shape, like the precision probe) and keeps
    channels_last only where it is measurably faster."""
    if requested not in MEMORY_FORMATS:
        raise ValueError(f"unknown memory format {requested!r}; expected one of "
                         f"{', '.join(MEMORY_FORMATS)}")
    if requested != "auto":
        return requested, "as configured"
    probe = _ForwardProbe(model, channels=channels, resolution=resolution, batch_size=batch_size,
                          guided=guided, device=torch.device(device))
    dtype = AUTOCAST_DTYPES[precision]
    fmt, why = choose_fastest({f: (lambda f=f: probe(dtype, f)) for f in ("contiguous", "channels_last")},
                              device=probe.device, shape={**probe.shape, "precision": precision},
                              default="contiguous")
    return fmt, f"auto: {why}"


def _network_signature(model: nn.Module) -> list:
    """What the probe's timing depends on: parameter shapes (identifies the architecture)."""
    return [list(p.shape) for p in model.parameters()]


def _noise(generators: list[torch.Generator], shape: tuple[int, ...], device: torch.device | str
           ) -> torch.Tensor:
    """One standard-normal draw per sample from its own generator: (B, *shape)."""
    return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)


@torch.no_grad()
def sample(model: nn.Module, schedule: NoiseSchedule, num_images: int, *,
           channels: int, resolution: int, sampler: str = "ddim", steps: int = 50,
           eta: float = 0.0, target: str = "eps", seed: int = 0,
           labels: torch.Tensor | None = None, guidance_scale: float = 1.0,
           clip_denoised: bool = True, batch_size: int = 256,
           device: torch.device | str = "cpu", progress: bool = True,
           precision: str = "fp32", memory_format: str = "contiguous",
           spacing: str = "linspace") -> torch.Tensor:
    """Generate ``num_images`` images (N, C, H, W) in [-1, 1] (unclipped at the last step if
    ``clip_denoised`` is off). ``labels`` (N,) selects classes for a conditional model; guidance
    needs a model with ``null_class``. ``precision`` "bf16"/"fp16" runs the network under
    autocast (the update rule stays float32); "auto" resolves by :mod:`diffusion.hardware`.
    ``memory_format`` "channels_last" runs a channels_last copy of the network (the same images
    up to float rounding); "auto" measures which is faster here. ``spacing`` (linspace |
    trailing) places the timesteps of the multistep solvers (DDPM / DDIM keep their own:
    evenly spaced from T-1 down to 0, see :func:`respace`)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {', '.join(SAMPLERS)}")
    if spacing not in SPACINGS:
        raise ValueError(f"unknown timestep spacing {spacing!r}; expected one of {', '.join(SPACINGS)}")
    if labels is not None and labels.shape != (num_images,):
        raise ValueError(f"labels must have shape ({num_images},), got {tuple(labels.shape)}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        precision = resolve_sampling_precision(
            model, precision, channels=channels, resolution=resolution,
            batch_size=min(batch_size, num_images), device=device,
            guided=labels is not None and guidance_scale != 1.0).precision
    amp = AUTOCAST_DTYPES[precision]
    if memory_format == "auto":
        memory_format = resolve_sampling_memory_format(
            model, memory_format, precision=precision, channels=channels, resolution=resolution,
            batch_size=min(batch_size, num_images), device=device,
            guided=labels is not None and guidance_scale != 1.0)[0]
    elif memory_format not in MEMORY_FORMATS:
        raise ValueError(f"unknown memory format {memory_format!r}; expected one of "
                         f"{', '.join(MEMORY_FORMATS)}")
    layout = torch.channels_last if memory_format == "channels_last" else torch.contiguous_format
    if memory_format == "channels_last":
        model = _as_channels_last(model)
    rs = respace(schedule, steps)
    ss = solver_schedule(schedule, steps, spacing) if sampler in SOLVERS else None
    was_training = model.training
    model.eval()
    gens = [torch.Generator().manual_seed(seed + j) for j in range(num_images)]
    shape = (channels, resolution, resolution)
    out = []
    bar = progress_bar(total=num_images * steps, desc=f"sampling ({sampler}-{steps})", unit="img-step",
                       enabled=progress, leave=False)
    for start in range(0, num_images, batch_size):
        batch_gens = gens[start:start + batch_size]
        x = _noise(batch_gens, shape, device).contiguous(memory_format=layout)
        y = labels[start:start + batch_size].to(device) if labels is not None else None
        null = (torch.full_like(y, model.null_class) if y is not None and hasattr(model, "null_class")
                else None)
        if ss is not None:
            def denoise(x: torch.Tensor, t: int) -> torch.Tensor:
                return _predict(model, schedule, t, x, target, y, null, guidance_scale, clip_denoised,
                                amp)[0]
            x = solve(denoise, ss, x, sampler, on_step=lambda i, x: bar.update(len(batch_gens)))
            out.append(x.cpu())
            continue
        for i in reversed(range(steps)):
            x0, eps = _predict(model, schedule, int(rs.timesteps[i]), x, target, y, null, guidance_scale,
                               clip_denoised, amp)
            if sampler == "ddpm":
                x = ddpm_step(rs, i, x, x0, _noise(batch_gens, shape, device) if i > 0 else x)
            else:
                stochastic = eta > 0 and i > 0
                x = ddim_step(rs, i, x, x0, eps, eta,
                              _noise(batch_gens, shape, device) if stochastic else x)
            bar.update(len(batch_gens))
        out.append(x.cpu())
    bar.close()
    model.train(was_training)
    return torch.cat(out).contiguous()


def load_generator(checkpoint: str | Path, device: str | torch.device = "cpu", ema: bool = True
                   ) -> tuple[UNet, NoiseSchedule, Config, dict]:
    """(network with EMA or raw weights, schedule, trained config, checkpoint) from a checkpoint."""
    ckpt = load_checkpoint(checkpoint)
    cfg = checkpoint_config(ckpt, checkpoint)
    model = UNet(cfg.model, cfg.data.channels, cfg.data.resolution)
    model.load_state_dict(ckpt["ema"]["model"] if ema else ckpt["model"])
    schedule = NoiseSchedule.create(cfg.diffusion.schedule, cfg.diffusion.timesteps)
    return model.to(device).eval(), schedule.to(device), cfg, ckpt
