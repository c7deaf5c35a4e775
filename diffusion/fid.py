"""Fréchet distance (FID) and kernel inception distance (KID) between feature sets.

Feature statistics accumulate in float64 in a streaming way: memory O(d^2), never O(N d).
The matrix square root follows the reference implementation (pytorch-fid's
``calculate_frechet_distance``): scipy's ``sqrtm``; only if its result is not finite is ``eps``
added to both diagonals (a warning that the product is nearly singular changes nothing); a tiny
imaginary part from numerical error is dropped, a large one is an error. Each such event is
reported in ``FrechetResult.notes``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import scipy.linalg


class FeatureStats:
    """Running count, sum and sum of outer products of feature vectors (float64)."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.n = 0
        self._sum = np.zeros(dim, dtype=np.float64)
        self._outer = np.zeros((dim, dim), dtype=np.float64)

    def update(self, features: np.ndarray) -> None:
        """Add a batch (B, d)."""
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"features must have shape (B, {self.dim}), got {x.shape}")
        self.n += x.shape[0]
        self._sum += x.sum(0)
        self._outer += x.T @ x

    @property
    def mean(self) -> np.ndarray:
        return self._sum / self.n

    @property
    def cov(self) -> np.ndarray:
        """Unbiased covariance (N - 1 in the denominator), as numpy.cov."""
        if self.n < 2:
            raise ValueError("covariance needs at least 2 feature vectors")
        mu = self.mean
        return (self._outer - self.n * np.outer(mu, mu)) / (self.n - 1)


@dataclass(frozen=True)
class FrechetResult:
    value: float
    notes: tuple[str, ...] = field(default_factory=tuple)


def _sqrtm(m: np.ndarray) -> np.ndarray:
    """scipy's matrix square root; its "nearly singular" warnings are not acted on (the
    reference rule looks at the result only), so they are silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return scipy.linalg.sqrtm(m)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6, max_imag: float = 1e-3) -> FrechetResult:
    """d^2 = ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2}) (Dowson & Landau 1982)."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    s1, s2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape} / {mu2.shape}, sigma {s1.shape} / {s2.shape}")
    notes = []
    covmean = _sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        notes.append(f"product of covariances is singular; added {eps} to both diagonals")
        offset = np.eye(s1.shape[0]) * eps
        covmean = _sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        imag = float(np.max(np.abs(covmean.imag)))
        if imag > max_imag:
            raise ValueError(f"matrix square root has a large imaginary part ({imag:.3g}); "
                             "the feature covariances are badly conditioned")
        if imag > 0:
            notes.append(f"dropped an imaginary part of at most {imag:.3g} from the matrix square root")
        covmean = covmean.real
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))
    return FrechetResult(max(value, 0.0), tuple(notes))


def frechet_from_stats(a: FeatureStats, b: FeatureStats) -> FrechetResult:
    return frechet_distance(a.mean, a.cov, b.mean, b.cov)


def kernel_inception_distance(x: np.ndarray, y: np.ndarray, num_subsets: int = 100,
                              subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Unbiased MMD^2 with the cubic polynomial kernel k(a, b) = (a.b / d + 1)^3 (Binkowski et
    al. 2018), averaged over random subsets; returns (mean, std over subsets)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    m = min(len(x), len(y), subset_size)
    if m < 2:
        raise ValueError("KID needs at least 2 feature vectors on each side")
    d = x.shape[1]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(num_subsets):
        a = x[rng.choice(len(x), m, replace=False)]
        b = y[rng.choice(len(y), m, replace=False)]
        kxx = (a @ a.T / d + 1) ** 3
        kyy = (b @ b.T / d + 1) ** 3
        kxy = (a @ b.T / d + 1) ** 3
        values.append((kxx.sum() - np.trace(kxx)) / (m * (m - 1))
                      + (kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean())
    return float(np.mean(values)), float(np.std(values))
