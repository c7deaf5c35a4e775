"""What each rank trains on at step k: :class:`BatchPlan` draws the samples and their timesteps,
noise and label dropout as functions of (seed, k, position), so a run is reproducible across
resumes and 2 workers x batch b see exactly what 1 worker x batch 2b sees."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from diffusion import counter_rng
from diffusion.config import Config, ConfigError
from diffusion.data import ImageSet, to_model_range


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1

    @classmethod
    def current(cls) -> "DistContext":
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def is_main(self) -> bool:
        return self.rank == 0



@dataclass(frozen=True)
class MicroBatch:
    x0: torch.Tensor        # (b, C, H, W) in [-1, 1]
    labels: torch.Tensor | None
    t: torch.Tensor         # (b,)
    noise: torch.Tensor     # (b, C, H, W)
    weights: torch.Tensor   # (b,) importance weights of the timestep sampler


class BatchPlan:
    """Deterministic, stateless batches: everything step k trains on is a function of (seed, k).

    Step k covers positions 0 .. accum x world x b - 1 of the epoch's seeded permutation;
    micro-batch m of rank r takes positions [(m * world + r) * b, +b). The image at a position
    comes from the permutation, and its timestep, noise and label dropout are functions of
    (seed, k, position) alone (:mod:`diffusion.counter_rng`), computed only by the rank that
    trains on it. So 2 workers x b, 1 worker x 2b and 1 worker x b x 2 accumulation steps train
    on the same samples, and a run resumed at any step continues exactly.

    Images are read per micro-batch from the dataset (on demand from the shards, see
    :class:`diffusion.data.ShardReader`) and moved to the device; nothing else of the dataset
    is held but its labels and the epoch's permutation.
    """

    def __init__(self, data: ImageSet, cfg: Config, ctx: DistContext, device: torch.device,
                 null_class: int | None) -> None:
        self.images = data.images
        self.labels = data.labels
        self.cfg, self.ctx, self.device, self.null_class = cfg, ctx, device, null_class
        self.local = cfg.train.batch_size
        self.step_size = self.local * ctx.world_size * cfg.train.grad_accum
        n = self.images.shape[0]
        if n < self.step_size:
            raise ConfigError(f"train.batch_size = {self.local}: the samples per step ({self.step_size}"
                              f" = batch_size x grad_accum x {ctx.world_size} workers) exceed the "
                              f"{n} training images")
        self.per_epoch = n // self.step_size
        self._perm_epoch, self._perm = -1, torch.empty(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.cfg.train.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(self.images.shape[0], generator=g)
            self._perm_epoch = epoch
        return self._perm

    def read(self, step: int) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """The host side of step k: per micro-batch of this rank, (first position, images,
        labels) read from the dataset; in pinned memory when training on CUDA, so the copy to
        the device does not block (:class:`diffusion.throughput.Prefetcher` runs this ahead)."""
        epoch, offset = divmod(step, self.per_epoch)
        index = self._permutation(epoch)[offset * self.step_size:(offset + 1) * self.step_size]
        pin = self.device.type == "cuda"
        out = []
        for m in range(self.cfg.train.grad_accum):
            start = (m * self.ctx.world_size + self.ctx.rank) * self.local
            mine = index[start:start + self.local]
            images, labels = self.images[mine], self.labels[mine]
            out.append((start, images.pin_memory() if pin else images,
                        labels.pin_memory() if pin else labels))
        return out

    def micro_batches(self, step: int, host: list[tuple[int, torch.Tensor, torch.Tensor]] | None = None
                      ) -> list[MicroBatch]:
        """Step k's micro-batches on the device, from ``host`` (:meth:`read` of the same step)."""
        seed, shape = self.cfg.train.seed, tuple(self.images.shape[1:])
        out = []
        for start, images, labels in (host if host is not None else self.read(step)):
            positions = torch.arange(start, start + self.local, device=self.device)
            x0 = to_model_range(images.to(self.device, non_blocking=True))
            t = counter_rng.randint(seed, step, counter_rng.STREAM_TIMESTEP, positions,
                                    self.cfg.diffusion.timesteps)
            noise = counter_rng.normal(seed, step, counter_rng.STREAM_NOISE, positions, shape)
            y = None
            if self.null_class is not None:
                drop = counter_rng.uniform(seed, step, counter_rng.STREAM_DROPOUT, positions)
                y = torch.where(drop < self.cfg.model.class_dropout,
                                torch.full((self.local,), self.null_class, device=self.device),
                                labels.to(self.device, non_blocking=True))
            out.append(MicroBatch(x0, y, t, noise, torch.ones(self.local, device=self.device)))
        return out

