"""Exponential moving average of model weights with the usual warm-up of the decay."""

from __future__ import annotations

import copy

import torch
from torch import nn


def ema_decay_at(num_updates: int, decay: float, warmup: bool) -> float:
    """decay_n = min(decay, (1 + n) / (10 + n)) with warm-up, else ``decay``."""
    return min(decay, (1 + num_updates) / (10 + num_updates)) if warmup else decay


class EMA:
    """Shadow copy of a module's parameters: p_ema <- d * p_ema + (1 - d) * p after each step."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True) -> None:
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = ema_decay_at(self.num_updates, self.decay, self.warmup)
        ema_params = [p for p in self.model.parameters()]
        params = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - d)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)
        self.num_updates += 1

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "num_updates": self.num_updates}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.num_updates = int(state["num_updates"])
