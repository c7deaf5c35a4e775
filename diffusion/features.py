"""Feature extractors for FID: an offline domain classifier, or the standard TorchScript Inception.

- ``DomainClassifier``: a small CNN trained on the versioned training split (its own pipeline
  stage); its penultimate 128-d activations are the features. The weights file is versioned and
  its sha256 goes into every FID record.
- ``InceptionExtractor``: the StyleGAN/EDM ``inception-2015-12-05.pt`` TorchScript file (uint8
  NCHW in, 2048-d pool features out with ``return_features=True``), read from a local path; images
  are resized to 299x299 (bilinear) and grey is repeated to RGB, as that tooling does.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from diffusion.checkpoint import CheckpointError, save_atomic
from diffusion.data import ImageSet
from diffusion.progress import progress_bar

CLASSIFIER_FORMAT = "ddpm-pipeline/domain-classifier-v1"


class FeatureExtractor(Protocol):
    name: str
    sha256: str
    dim: int

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        """uint8 (B, C, H, W) -> float features (B, dim)."""

    device: str                    # where it computes, e.g. "cpu" or "cuda:0"

    def to(self, device: str | torch.device) -> "FeatureExtractor":
        """Compute on ``device`` from now on; returns the extractor."""


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class DomainClassifier(nn.Module):
    """conv-conv-pool, conv-conv-pool (BatchNorm, ReLU), 128-d feature layer, linear classifier."""

    def __init__(self, channels: int, resolution: int, num_classes: int, width: int = 32) -> None:
        super().__init__()
        self.meta = {"channels": channels, "resolution": resolution, "num_classes": num_classes,
                     "width": width}
        w = width
        def conv(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
        self.body = nn.Sequential(
            *conv(channels, w), *conv(w, w), nn.MaxPool2d(2), nn.Dropout(0.1),
            *conv(w, 2 * w), *conv(2 * w, 2 * w), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Linear(2 * w * 16, 128), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(128, num_classes))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images.float() / 127.5 - 1.0)                # (B, 128)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))                       # (B, classes)


def _shift(images: torch.Tensor, g: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random translation by up to ``max_shift`` pixels (zero fill): light augmentation."""
    pad = F.pad(images, (max_shift,) * 4)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2,), generator=g).tolist()
    return pad[..., dy:dy + images.shape[-2], dx:dx + images.shape[-1]]


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


@torch.no_grad()
def accuracy(model: DomainClassifier, data: ImageSet, batch_size: int = 512) -> float:
    model.eval()
    device = _device_of(model)
    correct = sum(int((model(data.images[i:i + batch_size].to(device)).argmax(1).cpu()
                       == data.labels[i:i + batch_size]).sum())
                  for i in range(0, len(data.labels), batch_size))
    return correct / len(data.labels)


@contextlib.contextmanager
def _full_fp32(device: torch.device) -> Iterator[None]:
    """Features in full fp32 on a GPU (TF32 off for the block), so that they match the CPU's to
    float rounding: the reference statistics and the samples' features are on one scale."""
    if device.type != "cuda":
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def train_classifier(train: ImageSet, heldout: ImageSet, *, epochs: int = 12, batch_size: int = 128,
                     lr: float = 2e-3, seed: int = 0, progress: bool = True,
                     device: str | torch.device = "cpu") -> tuple[DomainClassifier, float]:
    """Train the domain classifier on the training split; return it on the CPU and its held-out
    accuracy. Bit-reproducible on the CPU (the pipeline's extractor stage trains there); on
    CUDA the pooling backward is not deterministic, so each run gives other weights."""
    device = torch.device(device)
    model, acc = _train_classifier(train, heldout, epochs, batch_size, lr, seed, progress, device)
    return model.cpu(), acc


def _train_classifier(train: ImageSet, heldout: ImageSet, epochs: int, batch_size: int, lr: float,
                      seed: int, progress: bool, device: torch.device
                      ) -> tuple[DomainClassifier, float]:
    if train.num_classes < 2 or bool((train.labels < 0).any()):
        raise ValueError("the domain extractor needs labelled data with at least 2 classes; "
                         "use the Inception extractor for unlabelled data")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    _, c, h, _ = train.images.shape
    model = DomainClassifier(c, h, train.num_classes).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(train.labels) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    bar = progress_bar(total=steps, desc="extractor", unit="step", enabled=progress, leave=False)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(train.labels), generator=g)
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            loss = F.cross_entropy(model(_shift(train.images[idx], g).to(device)),
                                   train.labels[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
    bar.close()
    return model.eval(), accuracy(model, heldout)


def save_classifier(model: DomainClassifier, path: str | Path, info: dict) -> str:
    """Write the classifier atomically; return the file's sha256 (the extractor hash)."""
    save_atomic({"format": CLASSIFIER_FORMAT, "meta": json.dumps(model.meta),
                 "info": json.dumps(info, sort_keys=True), "state": model.state_dict()}, path)
    return file_sha256(path)


@dataclass
class DomainExtractor:
    model: DomainClassifier
    sha256: str
    name: str = "domain"
    dim: int = 128

    @property
    def device(self) -> str:
        return str(_device_of(self.model))

    def to(self, device: str | torch.device) -> "DomainExtractor":
        """Compute on ``device`` from now on (moves the network; features still come back as
        NumPy); returns the extractor."""
        self.model.to(device)
        return self

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        device = _device_of(self.model)
        with _full_fp32(device):
            return self.model.features(images.to(device)).double().cpu().numpy()

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor, batch_size: int = 500) -> np.ndarray:
        """Class probabilities (N, classes) of uint8 images (softmax of the classifier head)."""
        device = _device_of(self.model)
        with _full_fp32(device):
            return np.concatenate([torch.softmax(self.model(images[i:i + batch_size].to(device)).double(),
                                                 1).cpu().numpy()
                                   for i in range(0, images.shape[0], batch_size)])


def load_domain_extractor(path: str | Path) -> DomainExtractor:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: domain extractor not found; run the extractor stage first")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        model = DomainClassifier(**json.loads(blob["meta"]))
        model.load_state_dict(blob["state"])
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable domain extractor ({type(exc).__name__})") from None
    if blob.get("format") != CLASSIFIER_FORMAT:
        raise CheckpointError(f"{path}: not a {CLASSIFIER_FORMAT} file")
    return DomainExtractor(model.eval(), file_sha256(path))


@dataclass
class InceptionExtractor:
    module: torch.jit.ScriptModule
    sha256: str
    name: str = "inception"
    dim: int = 2048
    size: int = 299

    device: str = "cpu"

    def to(self, device: str | torch.device) -> "InceptionExtractor":
        """Compute on ``device`` from now on (moves the network; features still come back as
        NumPy); returns the extractor."""
        self.module.to(device)
        self.device = str(device)
        return self

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        x = images.to(self.device)
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x.float(), size=(self.size, self.size), mode="bilinear",
                              align_corners=False).round().clamp(0, 255).to(torch.uint8)
        with _full_fp32(x.device):
            feats = self.module(x, return_features=True)
        if feats.dim() != 2 or feats.shape[1] != self.dim:
            raise ValueError(f"Inception network returned features of shape {tuple(feats.shape)}, "
                             f"expected (B, {self.dim})")
        return feats.double().cpu().numpy()


def load_inception(path: str | Path) -> InceptionExtractor:
    """The TorchScript Inception-v3 of StyleGAN/EDM tooling from a local file (TorchScript is
    not pickle: loading it runs no arbitrary Python)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"evaluate.inception_path = {str(path)!r}: file not found (it cannot "
                              "be downloaded here; copy inception-2015-12-05.pt there)")
    try:
        with warnings.catch_warnings():          # TorchScript is deprecated, but it is the format
            warnings.simplefilter("ignore", DeprecationWarning)   # the standard weights ship in
            module = torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as exc:
        raise CheckpointError(f"{path}: not a TorchScript module ({type(exc).__name__})") from None
    return InceptionExtractor(module, file_sha256(path))
