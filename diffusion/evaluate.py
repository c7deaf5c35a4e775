"""Evaluation: FID and KID of generated samples against cached real-data statistics, and with
the domain classifier the share of samples it recognises (:mod:`diffusion.quality`).

Reference statistics are cached under a key made of the dataset version, the extractor's sha256,
the resolution, the split and the number of images; any change gives a new key, so stale numbers
are never reused. The report repeats generation over K seeds (mean and spread) and gives the
real-vs-real floor (held-out vs train) so that a user sees what "good" means for this data.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from diffusion.config import Config
from diffusion.data import ImageSet, load_prepared, to_uint8
from diffusion.features import FeatureExtractor
from diffusion.gate import FastFrechet
from diffusion.fid import FeatureStats, frechet_distance, kernel_inception_distance
from diffusion.grid import save_grid
from diffusion.prepare import dataset_version
from diffusion.quality import classifier_quality
from diffusion.sampling import (load_generator, resolve_sampling_memory_format,
                                resolve_sampling_precision, sample)


@dataclass(frozen=True)
class Reference:
    key: str
    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray      # kept (float32) for KID
    n: int


KID_REFERENCE_MAX = 10_000   # real images whose features are kept for KID (all of a smaller set)


def extract(extractor: FeatureExtractor, images: torch.Tensor, batch_size: int = 500) -> np.ndarray:
    """uint8 (N, C, H, W) -> (N, d) features, batch by batch."""
    return np.concatenate([extractor(images[i:i + batch_size])
                           for i in range(0, images.shape[0], batch_size)])


def summarize(extractor: FeatureExtractor, images, batch_size: int = 500,
              keep: int = KID_REFERENCE_MAX) -> tuple[FeatureStats, np.ndarray]:
    """Streaming feature statistics of uint8 (N, C, H, W) images (a tensor or a
    :class:`~diffusion.data.ShardReader`, read ``batch_size`` at a time), and the features of at
    most ``keep`` of them, evenly spread over the set, for KID. Memory: O(batch + keep), not O(N)."""
    n = images.shape[0]
    kept = np.arange(min(n, keep), dtype=np.int64) * n // min(n, keep)   # all when n <= keep
    stats, subset, dim = None, [], 0
    for i in range(0, n, batch_size):
        feats = extractor(images[i:i + batch_size])
        if stats is None:
            stats, dim = FeatureStats(feats.shape[1]), feats.shape[1]
        stats.update(feats)
        local = kept[(kept >= i) & (kept < i + feats.shape[0])] - i
        subset.append(np.asarray(feats, dtype=np.float64)[local])
    return stats, (np.concatenate(subset) if subset else np.zeros((0, dim)))


def reference_key(dataset: str, extractor_sha256: str, resolution: int, split: str, n: int,
                  device: str = "cpu") -> str:
    fields = {"dataset": dataset, "extractor": extractor_sha256, "resolution": resolution,
              "split": split, "n": n}
    if device != "cpu":                      # another device's arithmetic: its own statistics
        fields["device"] = device
    if n > KID_REFERENCE_MAX:                # only a subset of the features is kept for KID
        fields["kid_reference"] = KID_REFERENCE_MAX
    blob = json.dumps(fields, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def reference_stats(cache_dir: str | Path, images: ImageSet, extractor: FeatureExtractor, *,
                    dataset: str, split: str) -> tuple[Reference, bool]:
    """Statistics of real images, from the cache when the key matches; returns (stats, cache_hit)."""
    n, resolution = images.images.shape[0], images.images.shape[-1]
    key = reference_key(dataset, extractor.sha256, resolution, split, n,
                        torch.device(getattr(extractor, "device", "cpu")).type)
    path = Path(cache_dir) / f"{split}-{key[:24]}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) == key:
                return Reference(key, z["mu"], z["sigma"], z["features"], int(z["n"])), True
    stats, kept = summarize(extractor, images.images)
    ref = Reference(key, stats.mean, stats.cov, kept.astype(np.float32), n)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz")
    with os.fdopen(fd, "wb") as f:
        np.savez(f, key=np.array(key), mu=ref.mu, sigma=ref.sigma, features=ref.features,
                 n=np.array(n))
    os.replace(tmp, path)
    return ref, False


YARDSTICK_PARTS = ("extractor_sha256", "reference", "dataset_version", "sampler", "steps", "spacing",
                   "eta", "guidance_scale", "clip_denoised", "samples_per_seed", "seeds", "seed",
                   "precision")


def yardstick(parts: dict) -> str:
    """The digest of what makes two FIDs comparable: the extractor, the reference statistics (a
    key of the dataset version, extractor, resolution, split and size), the sampler and its
    settings, the seeds and sample count, and the sampling precision. Two evaluations under one
    yardstick sampled image i from the same noise and label. Raises ``KeyError`` naming a
    missing part."""
    missing = [k for k in YARDSTICK_PARTS if k not in parts]
    if missing:
        raise KeyError(f"yardstick part(s) missing: {', '.join(missing)}")
    blob = json.dumps({k: parts[k] for k in YARDSTICK_PARTS}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def features_path(metrics_path: str | Path) -> Path:
    """Where :func:`evaluate` keeps the generated samples' features and the reference statistics
    (beside the metrics JSON: ``metrics/eval.json`` -> ``metrics/eval.features.npz``)."""
    p = Path(metrics_path)
    return p.with_name(p.stem + ".features.npz")


def save_features(path: str | Path, features: np.ndarray, ref: Reference, stick: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz")
    with os.fdopen(fd, "wb") as f:
        np.savez(f, features=features.astype(np.float32), mu=ref.mu, sigma=ref.sigma,
                 yardstick=np.array(stick))
    os.replace(tmp, path)


def load_features(path: str | Path) -> dict[str, np.ndarray | str]:
    """The arrays :func:`save_features` wrote (no pickles); a clear error for another file."""
    try:
        with np.load(path, allow_pickle=False) as z:
            out = {k: z[k] for k in ("features", "mu", "sigma", "yardstick")}
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"{path}: not an evaluation features file ({exc})") from None
    if out["features"].ndim != 3:
        raise ValueError(f"{path}: features must be (seeds, samples, d), got {out['features'].shape}")
    out["yardstick"] = str(out["yardstick"])
    return out


def fid_against(features: np.ndarray, ref: Reference, kid_subset: int,
                stats: FeatureStats | None = None) -> dict[str, float | list]:
    """FID of ``features`` (or of ``stats`` when given, ``features`` then being the KID subset)
    against ``ref``, and KID over subsets of ``kid_subset``."""
    if stats is None:
        stats = FeatureStats(features.shape[1])
        stats.update(features)
    fd = frechet_distance(stats.mean, stats.cov, ref.mu, ref.sigma)
    kid, _ = kernel_inception_distance(features, ref.features, num_subsets=50, subset_size=kid_subset)
    return {"fid": fd.value, "kid": kid, "notes": list(fd.notes)}


def evaluate(checkpoint: str | Path, cfg: Config, extractor: FeatureExtractor, *,
             progress: bool = True, device: str | torch.device = "cpu",
             on_setup: Callable[[dict], None] | None = None) -> dict:
    """FID / KID over ``evaluate.fid_seeds`` seeds of ``evaluate.fid_samples`` images, the
    real-vs-real floor, a metrics JSON and a fixed-seed sample grid. ``evaluate.precision`` is
    resolved once for this device; ``on_setup`` receives the choice and its reason (with
    ``progress`` and no callback, it is printed)."""
    ev = cfg.evaluate
    if torch.device(device).type != "cpu":        # features on the sampling device too
        extractor = extractor.to(device)
    model, schedule, trained_cfg, ckpt = load_generator(checkpoint, device)
    choice = resolve_sampling_precision(
        model, ev.precision, channels=trained_cfg.data.channels,
        resolution=trained_cfg.data.resolution, batch_size=min(ev.batch_size, ev.fid_samples),
        guided=bool(trained_cfg.model.num_classes) and ev.guidance_scale != 1.0, device=device)
    memory_format, format_reason = resolve_sampling_memory_format(
        model, ev.memory_format, precision=choice.precision, channels=trained_cfg.data.channels,
        resolution=trained_cfg.data.resolution, batch_size=min(ev.batch_size, ev.fid_samples),
        guided=bool(trained_cfg.model.num_classes) and ev.guidance_scale != 1.0, device=device)
    setup = {"precision": choice.precision, "precision_requested": choice.requested,
             "precision_reason": choice.reason, "precision_warning": choice.warning,
             "memory_format": memory_format, "memory_format_reason": format_reason}
    if on_setup is not None:
        on_setup(setup)
    elif progress:
        print(f"sampling precision {choice.precision} ({choice.reason}), memory format "
              f"{memory_format} ({format_reason})"
              + (f"\nwarning: {choice.warning}" if choice.warning else ""), file=sys.stderr)
    prepared = Path(cfg.data.prepared_dir)
    version = dataset_version(prepared)
    train_ref, hit = reference_stats(ev.reference_cache, load_prepared(prepared, "train"), extractor,
                                     dataset=version, split="train")
    heldout_stats, heldout_kept = summarize(extractor, load_prepared(prepared, "heldout").images)
    floor = fid_against(heldout_kept, train_ref, min(ev.kid_subset_size, len(heldout_kept)),
                        stats=heldout_stats)
    per_seed, features, probabilities, requested, sampling_seconds = [], [], [], [], 0.0
    for k in range(ev.fid_seeds):
        n = ev.fid_samples
        classes = trained_cfg.model.num_classes
        labels = torch.arange(n) % classes if classes else None
        clock = time.perf_counter()
        images = sample(model, schedule, n, channels=trained_cfg.data.channels,
                        resolution=trained_cfg.data.resolution, sampler=ev.sampler, steps=ev.steps,
                        eta=ev.eta, target=trained_cfg.diffusion.target, seed=ev.seed + k * 1_000_003,
                        labels=labels, guidance_scale=ev.guidance_scale, clip_denoised=ev.clip_denoised,
                        batch_size=ev.batch_size, device=device, progress=progress,
                        precision=choice.precision, memory_format=memory_format,
                        spacing=ev.spacing)
        sampling_seconds += time.perf_counter() - clock
        if k == 0:
            save_grid(images[:min(n, 100)], ev.grid_path)
        pixels = to_uint8(images)
        features.append(extract(extractor, pixels))
        per_seed.append(fid_against(features[-1], train_ref, min(ev.kid_subset_size, n)))
        if hasattr(extractor, "probabilities"):      # the domain classifier: recognisability
            probabilities.append(extractor.probabilities(pixels))
            requested.append(labels.numpy() if labels is not None else np.full(n, -1))
    fids = [r["fid"] for r in per_seed]
    kids = [r["kid"] for r in per_seed]
    parts = {"extractor_sha256": extractor.sha256, "dataset_version": version,
             # the reference set's identity, whichever device computed its statistics
             "reference": reference_key(version, extractor.sha256, trained_cfg.data.resolution, "train",
                                        train_ref.n),
             "sampler": ev.sampler, "steps": ev.steps, "spacing": ev.spacing, "eta": ev.eta,
             "guidance_scale": ev.guidance_scale, "clip_denoised": ev.clip_denoised,
             "samples_per_seed": ev.fid_samples, "seeds": ev.fid_seeds, "seed": ev.seed,
             "precision": choice.precision}
    stick = yardstick(parts)
    save_features(features_path(ev.metrics_path), np.stack(features), train_ref, stick)
    spread = float(np.std(fids, ddof=1)) if len(fids) > 1 else 0.0
    metrics = {
        "fid": float(np.mean(fids)), "fid_std": spread, "fid_per_seed": fids,
        "kid": float(np.mean(kids)), "kid_std": float(np.std(kids, ddof=1)) if len(kids) > 1 else 0.0,
        "yardstick": stick, "yardstick_parts": parts,
        "floor_fid": floor["fid"], "floor_kid": floor["kid"],
        "fid_over_floor": float(np.mean(fids) / max(floor["fid"], 1e-12)),
        "samples_per_seed": ev.fid_samples, "seeds": ev.fid_seeds, "sampler": ev.sampler,
        "spacing": ev.spacing,
        "steps": ev.steps, "guidance_scale": ev.guidance_scale, "checkpoint_step": int(ckpt["step"]),
        "extractor": extractor.name, "extractor_sha256": extractor.sha256,
        "dataset_version": version, "reference_cache_hit": hit,
        "notes": sorted({n for r in per_seed + [floor] for n in r["notes"]}),
        **setup, "sampling_seconds": sampling_seconds,
        "sampling_img_per_s": ev.fid_seeds * ev.fid_samples / max(sampling_seconds, 1e-9),
    }
    if probabilities:    # over all seeds' samples together
        metrics.update(classifier_quality(np.concatenate(probabilities), np.concatenate(requested),
                                          ev.confidence_threshold))
    path = Path(ev.metrics_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def quick_fid(checkpoint: str | Path, cfg: Config, extractor: FeatureExtractor, *, samples: int,
              device: str | torch.device = "cpu") -> dict:
    """A cheap FID for comparing the checkpoints of one sweep: one seed of ``samples`` images
    with ``evaluate``'s sampler, steps, guidance and seed, in fp32 and contiguous memory (no
    hardware probe, so every trial on every node is measured alike), against the cached
    training-set statistics of :func:`evaluate`. No floor, KID or files. The Frechet distance
    is :class:`diffusion.gate.FastFrechet`'s (an eigendecomposition: an untrained model's
    degenerate features give a large FID, not an error). Equal ``cfg.evaluate``, ``samples``,
    extractor and data give equal ``yardstick``. Returns ``{"fid", "yardstick", "step"}``."""
    ev = cfg.evaluate
    model, schedule, trained_cfg, ckpt = load_generator(checkpoint, device)
    prepared = Path(cfg.data.prepared_dir)
    version = dataset_version(prepared)
    ref, _ = reference_stats(ev.reference_cache, load_prepared(prepared, "train"), extractor,
                             dataset=version, split="train")
    classes = trained_cfg.model.num_classes
    images = sample(model, schedule, samples, channels=trained_cfg.data.channels,
                    resolution=trained_cfg.data.resolution, sampler=ev.sampler, steps=ev.steps, eta=ev.eta,
                    target=trained_cfg.diffusion.target, seed=ev.seed,
                    labels=torch.arange(samples) % classes if classes else None,
                    guidance_scale=ev.guidance_scale, clip_denoised=ev.clip_denoised,
                    batch_size=ev.batch_size, device=device, progress=False, precision="fp32",
                    memory_format="contiguous", spacing=ev.spacing)
    features = extract(extractor, to_uint8(images))
    parts = {"extractor_sha256": extractor.sha256, "dataset_version": version,
             "reference": reference_key(version, extractor.sha256, trained_cfg.data.resolution, "train", ref.n),
             "sampler": ev.sampler, "steps": ev.steps, "spacing": ev.spacing, "eta": ev.eta,
             "guidance_scale": ev.guidance_scale, "clip_denoised": ev.clip_denoised,
             "samples_per_seed": samples, "seeds": 1, "seed": ev.seed, "precision": "fp32"}
    fid = FastFrechet(ref.mu, ref.sigma)(features) if np.isfinite(features).all() else float("inf")
    return {"fid": fid, "yardstick": yardstick(parts), "step": int(ckpt["step"])}
