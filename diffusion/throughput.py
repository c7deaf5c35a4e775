"""What keeps an accelerator busy, and how busy it is.

- :func:`train_flops_per_image`: the FLOPs of one training step per image, counted by
  ``torch.utils.flop_counter`` on the real network (forward + backward), never a constant.
  Achieved TFLOP/s = img/s x this; MFU = that over the device's peak.
- :func:`peak_flops`: the device's dense peak for a precision, from the vendor's data sheet for
  the GPUs named there, and :func:`measured_matmul_flops` for a measured one (any device).
- :class:`Prefetcher`: reads the next step's images (page cache or disk, into pinned memory) in
  a background thread while the GPU runs the current step.
- :func:`use_persistent_inductor_cache`: ``torch.compile``'s kernels kept across runs.
"""

from __future__ import annotations

import copy
import os
import re
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Generic, TypeVar

import torch
from torch.utils.flop_counter import FlopCounterMode

# Dense (no sparsity) peak FLOP/s from the vendors' data sheets, by a substring of
# torch.cuda.get_device_name(); (bf16/fp16 tensor core, tf32 tensor core). SXM parts; PCIe and
# NVL parts clock lower, so their MFU reads slightly low.
DATASHEET_PEAK = {
    "H200": (989.4e12, 494.7e12),
    "H100": (989.4e12, 494.7e12),
    "A100": (312e12, 156e12),
    "L40S": (362e12, 183e12),
    "A10G": (70e12, 35e12),
    "L4": (121e12, 60e12),
}


def train_flops_per_image(model: torch.nn.Module, loss_fn: Callable[..., torch.Tensor],
                          shape: tuple[int, int, int], num_timesteps: int,
                          labels: int | None, device: torch.device, batch: int = 2) -> float:
    """FLOPs of one forward + backward of ``loss_fn`` on a copy of ``model`` per image, counted
    at ``batch`` images of ``shape`` (C, H, W) on ``device`` (fp32; autocast does not change
    the count). ``labels``: the number of classes for a class-conditional model, else None."""
    probe = copy.deepcopy(model).train()
    g = torch.Generator(device).manual_seed(0)
    x0 = torch.rand((batch, *shape), generator=g, device=device) * 2 - 1
    t = torch.randint(0, num_timesteps, (batch,), generator=g, device=device)
    noise = torch.randn((batch, *shape), generator=g, device=device)
    y = (torch.randint(0, labels, (batch,), generator=g, device=device)
         if labels is not None else None)
    counter = FlopCounterMode(display=False)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), counter:
        loss_fn(probe, x0, t, noise, torch.ones(batch, device=device), y).mean().backward()
    return counter.get_total_flops() / batch


def peak_flops(device: torch.device, precision: str) -> float | None:
    """The data-sheet dense peak of a CUDA device for ``precision`` (bf16 and fp16: tensor
    cores; fp32: TF32 tensor cores, as PyTorch's default matmul precision permits), or None when
    the device is not in :data:`DATASHEET_PEAK` (CPUs: use :func:`measured_matmul_flops`)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (half, tf32) in DATASHEET_PEAK.items():
        if re.search(rf"\b{key}\b", name):              # "L4" is not "L40S"
            return half if precision in ("bf16", "fp16") else tf32
    return None


def measured_matmul_flops(device: torch.device, dtype: torch.dtype, n: int | None = None,
                          seconds: float = 1.0) -> float:
    """FLOP/s of square matrix products in ``dtype`` on ``device`` (8192 on CUDA, 1024 on CPUs),
    timed after a warm-up: what the device reaches on the easiest dense work."""
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or calls < 3:
        a @ b
        calls += 1
        if device.type == "cuda" and calls % 10 == 0:
            sync()
    sync()
    return 2 * n**3 * calls / (time.perf_counter() - start)


T = TypeVar("T")


class Prefetcher(Generic[T]):
    """``get(k)`` returns ``read(k)``; with ``enabled``, ``read(k + 1)`` then starts in a
    background thread, so the next step's images are read while the current step computes.
    ``read`` must be a pure function of ``k`` (every call happens on the one worker thread)."""

    def __init__(self, read: Callable[[int], T], enabled: bool) -> None:
        self.read, self.enabled = read, enabled
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="prefetch") if enabled else None
        self._next: tuple[int, Future[T]] | None = None

    def get(self, step: int) -> T:
        if self._pool is None:
            return self.read(step)
        if self._next is not None and self._next[0] == step:
            value = self._next[1].result()
        else:
            value = self._pool.submit(self.read, step).result()
        self._next = (step + 1, self._pool.submit(self.read, step + 1))
        return value

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def use_persistent_inductor_cache(cache_root: str | os.PathLike | None = None) -> str:
    """Point Inductor's cache (compiled kernels, FX graphs, autotuning) at a directory that
    outlives the process and the machine's /tmp, unless ``TORCHINDUCTOR_CACHE_DIR`` is set:
    ``$DDPM_CACHE_DIR/inductor`` (default ``~/.cache/ddpm-pipeline/inductor``). Returns it."""
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return os.environ["TORCHINDUCTOR_CACHE_DIR"]
    root = cache_root or os.environ.get("DDPM_CACHE_DIR") or Path.home() / ".cache" / "ddpm-pipeline"
    path = str(Path(root) / "inductor")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = path
    return path
