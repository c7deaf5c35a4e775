"""Checkpoints: written atomically (temp file + fsync + rename), read with ``weights_only=True``."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from diffusion.config import Config, config_from_dict

FORMAT = "ddpm-pipeline/checkpoint-v1"
REQUIRED_KEYS = ("format", "step", "config", "config_hash", "model", "ema")


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable, or does not belong to this configuration."""


def save_atomic(obj: dict[str, Any], path: str | Path) -> Path:
    """``torch.save`` to a temp file in the same directory, fsync, then rename over ``path``.

    A crash at any point leaves either the old file or the new one, never a torn file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)         # mkstemp creates 0600; use the usual file mode
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely (no unpickling of arbitrary objects) and check its layout."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:   # weights_only refused something: say what, never "how"
        raise CheckpointError(f"{path}: not a readable checkpoint: refused to load {_refused(exc)}; "
                              "a checkpoint holds only tensors and plain values, and anything else "
                              "could run code while loading") from None
    except Exception as exc:  # torch raises several types for corrupt files
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else 'no detail'})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} checkpoint")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks keys {', '.join(missing)}")
    return ckpt


def checkpoint_step(path: str | Path) -> int | None:
    """The step a checkpoint file holds, or None when there is none; memory-mapped, so the
    weights are not read."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - unreadable: the trainer names the problem when it loads it
        return None
    return int(ckpt["step"]) if isinstance(ckpt, dict) and "step" in ckpt else None


_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def _refused(exc: pickle.UnpicklingError) -> str:
    """What torch's safe unpickler refused, from its message (which also advises switching the
    protection off: that advice is dropped)."""
    found = _GLOBAL.search(str(exc))
    return f"the pickled global {found.group(1)}" if found else "unsafe pickled content"


def checkpoint_config(ckpt: dict[str, Any], path: str | Path = "checkpoint") -> Config:
    """The configuration a checkpoint was trained with."""
    return config_from_dict(json.loads(ckpt["config"]), f"{path} (stored config)")


def weights_sha256(ckpt: dict[str, Any]) -> str:
    """sha256 of the weights a checkpoint samples with (the EMA network): each tensor's name,
    dtype, shape and bytes in name order. Two checkpoints with one digest generate the same
    images, whatever else (step, optimizer state, file layout) differs."""
    h = hashlib.sha256()
    for name, tensor in sorted(ckpt["ema"]["model"].items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
