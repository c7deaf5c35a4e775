"""Training data: the prepared dataset (see :mod:`diffusion.prepare`) as uint8 tensors."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from diffusion.config import ConfigError, DataConfig


@dataclass(frozen=True)
class ImageSet:
    images: torch.Tensor   # (N, C, H, W) uint8
    labels: torch.Tensor   # (N,) int64, -1 = unlabelled
    num_classes: int

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be a uint8 (N, C, H, W) tensor, got {self.images.dtype} "
                             f"{tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels must have shape ({self.images.shape[0]},), "
                             f"got {tuple(self.labels.shape)}")


def load_prepared(directory: str | Path, split: str = "train") -> ImageSet:
    """Read one split of a prepared dataset directory (shards in manifest order)."""
    directory = Path(directory)
    manifest_path = directory / "manifest.csv"
    if not manifest_path.is_file():
        raise ConfigError(f"data.prepared_dir = {str(directory)!r}: no manifest.csv; run the prepare "
                          "stage first (python -m diffusion prepare, or dvc repro)")
    manifest = pd.read_csv(manifest_path, usecols=["label", "split", "shard", "index"])
    rows = manifest[manifest["split"] == split].sort_values(["shard", "index"])
    if rows.empty:
        raise ConfigError(f"{manifest_path}: split {split!r} is empty")
    shards = [np.load(directory / f"{split}-{int(s):05d}.npy", allow_pickle=False)
              for s in sorted(rows["shard"].unique())]
    images = np.concatenate(shards)
    if images.shape[0] != len(rows):
        raise ConfigError(f"{directory}: {split} shards hold {images.shape[0]} images, the manifest "
                          f"lists {len(rows)}; prepare again")
    classes = json.loads((directory / "stats.json").read_text()).get("classes", [])
    labels = rows["label"].to_numpy(np.int64).copy()     # pandas 3 hands out read-only arrays
    return ImageSet(torch.from_numpy(images), torch.from_numpy(labels),
                    num_classes=len(classes))


def load_dataset(cfg: DataConfig, split: str = "train") -> ImageSet:
    return load_prepared(cfg.prepared_dir, split)


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]."""
    return images.float() / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255] (clipped)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
