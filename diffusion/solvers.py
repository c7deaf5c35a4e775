"""Multistep ODE solvers for the probability-flow ODE in data prediction: DPM-Solver++(2M)
(Lu et al. 2022, "DPM-Solver++", Algorithm 2) and UniPC with B(h) = e^h - 1 ("bh2", Zhao et al.
2023, Algorithms 1-3), both second order, for any number of steps.

Conventions (the same as diffusers' ``DPMSolverMultistepScheduler`` / ``UniPCMultistepScheduler``
with their defaults, so trajectories can be compared):

- timesteps: ``linspace`` = round(linspace(0, T-1, N+1)) reversed, without the last (0), i.e. N
  network evaluations from t = T-1 down; ``trailing`` = round(arange(T, 0, -T/N)) - 1. After the
  last evaluation the solver steps to sigma = 0 (``final_sigmas_type="zero"``), so the last
  update returns the data prediction itself.
- first order at the first step (no history yet) and at the last (``lower_order_final``);
  UniPC's corrector runs after every step but the first, reusing the network evaluation of the
  next step (no extra NFE).

With alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t) and lambda_t = log(alpha_t / sigma_t),
every coefficient is computed in float64 and applied to the float32 samples. Each update is a
pure function of (schedule, index, samples, data predictions); :func:`solve` is the loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch

from diffusion.schedule import NoiseSchedule

SolverName = Literal["dpmpp_2m", "unipc"]
SOLVERS = ("dpmpp_2m", "unipc")
SPACINGS = ("linspace", "trailing")

# x0 prediction of the network at (x, integer timestep), in float32, same shape as x
Denoiser = Callable[[torch.Tensor, int], torch.Tensor]


@dataclass(frozen=True)
class SolverSchedule:
    timesteps: tuple[int, ...]   # (N,) network evaluation times, descending
    alpha: tuple[float, ...]     # (N+1,) sqrt(abar) at each time, then 1 (clean data)
    sigma: tuple[float, ...]     # (N+1,) sqrt(1 - abar), then 0
    lam: tuple[float, ...]       # (N+1,) log(alpha / sigma) (half log-SNR), then +inf

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)


def solver_timesteps(total: int, num_steps: int, spacing: str = "linspace") -> list[int]:
    """The N evaluation times of the common conventions (Lin et al. 2024, table 2)."""
    if not 1 <= num_steps <= total:
        raise ValueError(f"sampling steps must be in [1, {total}], got {num_steps}")
    if spacing == "linspace":
        grid = torch.linspace(0, total - 1, num_steps + 1, dtype=torch.float64).round()
        return [int(v) for v in grid.flip(0)[:-1]]
    if spacing == "trailing":
        return [int(round(total - k * total / num_steps)) - 1 for k in range(num_steps)]
    raise ValueError(f"unknown timestep spacing {spacing!r}; expected one of {', '.join(SPACINGS)}")


def solver_schedule(schedule: NoiseSchedule, num_steps: int, spacing: str = "linspace") -> SolverSchedule:
    times = solver_timesteps(schedule.num_timesteps, num_steps, spacing)
    abar = schedule.alpha_bar.detach().cpu().double()
    alpha = [math.sqrt(float(abar[t])) for t in times] + [1.0]
    sigma = [math.sqrt(1.0 - float(abar[t])) for t in times] + [0.0]
    lam = [math.log(a) - math.log(s) for a, s in zip(alpha[:-1], sigma[:-1])] + [math.inf]
    return SolverSchedule(tuple(times), tuple(alpha), tuple(sigma), tuple(lam))


def dpmpp_2m_update(ss: SolverSchedule, i: int, x: torch.Tensor, x0: list[torch.Tensor],
                    order: int) -> torch.Tensor:
    """From time i to i+1 with the data predictions ``x0`` (newest last). DPM-Solver++ eq. (9)
    (first order, = DDIM) and the multistep second-order update (Algorithm 2, midpoint form):
    x_t = (s_t/s_s) x - a_t (e^{-h} - 1) D0 - a_t (e^{-h} - 1) D1 / 2, D1 = (m0 - m1) / r0."""
    h = ss.lam[i + 1] - ss.lam[i]
    ratio, phi = ss.sigma[i + 1] / ss.sigma[i], math.expm1(-h)         # e^{-inf} - 1 = -1 at the end
    out = ratio * x - (ss.alpha[i + 1] * phi) * x0[-1]
    if order == 2:
        r0 = (ss.lam[i] - ss.lam[i - 1]) / h
        out = out - (0.5 * ss.alpha[i + 1] * phi / r0) * (x0[-1] - x0[-2])
    return out


def _unipc_coefficients(ss: SolverSchedule, s0: int, t: int, order: int
                        ) -> tuple[float, float, list[float], list[float]]:
    """(h phi_1, B(h), r_k, the right-hand side b of UniPC's linear system) from s0 to t
    (Zhao et al. 2023, Algorithm 1 with B(h) = e^h - 1 in data prediction, hh = -h)."""
    h = ss.lam[t] - ss.lam[s0]
    hh = -h
    h_phi_1 = math.expm1(hh)
    b_h = math.expm1(hh)
    rks = [(ss.lam[s0 - k] - ss.lam[s0]) / h for k in range(1, order)] + [1.0]
    b, h_phi_k, factorial = [], h_phi_1 / hh - 1.0, 1
    for k in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    return h_phi_1, b_h, rks, b


def unipc_predict(ss: SolverSchedule, i: int, x: torch.Tensor, x0: list[torch.Tensor],
                  order: int) -> torch.Tensor:
    """UniP-p from time i to i+1 (order 1 or 2; rho = 1/2 for order 2, as the paper sets)."""
    h_phi_1, b_h, rks, _ = _unipc_coefficients(ss, i, i + 1, order)
    out = (ss.sigma[i + 1] / ss.sigma[i]) * x - (ss.alpha[i + 1] * h_phi_1) * x0[-1]
    if order == 2:
        d1 = (x0[-2] - x0[-1]) / rks[0]
        out = out - (ss.alpha[i + 1] * b_h * 0.5) * d1
    return out


def unipc_correct(ss: SolverSchedule, i: int, x_prev: torch.Tensor, x0: list[torch.Tensor],
                  x0_new: torch.Tensor, order: int) -> torch.Tensor:
    """UniC-p: the sample at time i recomputed from the one at i-1 (``x_prev``), the earlier data
    predictions ``x0`` (newest = at i-1) and the new one at i, of order ``order`` + 1."""
    h_phi_1, b_h, rks, b = _unipc_coefficients(ss, i - 1, i, order)
    if order == 1:
        rhos = [0.5]
    else:
        r = torch.tensor([[rk ** (k - 1) for rk in rks] for k in range(1, order + 1)], dtype=torch.float64)
        rhos = torch.linalg.solve(r, torch.tensor(b, dtype=torch.float64)).tolist()
    m0 = x0[-1]
    out = (ss.sigma[i] / ss.sigma[i - 1]) * x_prev - (ss.alpha[i] * h_phi_1) * m0
    correction = rhos[-1] * (x0_new - m0)
    for k in range(1, order):
        correction = correction + rhos[k - 1] * (x0[-(k + 1)] - m0) / rks[k - 1]
    return out - (ss.alpha[i] * b_h) * correction


def solve(denoise: Denoiser, ss: SolverSchedule, x: torch.Tensor, solver: str,
          on_step: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Integrate from pure noise ``x`` at ``ss.timesteps[0]`` to data: N network evaluations.
    ``on_step(i, x)`` sees the sample after each update (for tests and progress)."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; expected one of {', '.join(SOLVERS)}")
    n = ss.num_steps
    history: list[torch.Tensor] = []             # data predictions, newest last
    x_prev, prev_order = x, 1
    for i in range(n):
        x0 = denoise(x, ss.timesteps[i])
        if solver == "unipc" and i > 0:
            x = unipc_correct(ss, i, x_prev, history, x0, prev_order)
        history = (history + [x0])[-2:]
        order = 1 if i == 0 or i == n - 1 else 2     # warm-up and lower_order_final
        if solver == "dpmpp_2m":
            x = dpmpp_2m_update(ss, i, x, history, order)
        else:
            x_prev, prev_order = x, order
            x = unipc_predict(ss, i, x, history, order)
        if on_step is not None:
            on_step(i, x)
    return x
