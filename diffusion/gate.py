"""The champion gate's statistics: is a challenger better than the champion by a margin, with a
stated one-sided confidence?

Both models are sampled under one *yardstick* (:func:`diffusion.evaluate.yardstick`): the same
extractor and reference statistics, sampler, steps, guidance, precision, seeds and sample count.
Image ``i`` of either model then starts from the same noise and class label, so the feature rows
are paired. The gain is ``FID(champion) - FID(challenger)`` over all rows, both against the one
reference. Its standard error comes from a delete-one-block jackknife over ``blocks`` blocks of
paired rows, drawn by a fixed permutation since rows carry class and seed structure (Efron &
Stein 1981: the jackknife variance errs on the large side, the safe side for a gate); the
one-sided lower confidence bound is
``gain - t(confidence, blocks - 1) * se``. The challenger is promoted only when that bound exceeds
``margin``. Pairing removes the noise the two models share; with unrelated rows the estimate is
still valid, only wider.

Measured on synthetic Gaussian features (d = 128, N = 1000, two equal models, 100 trials): the
jackknife's standard error was 1.4x the gains' true spread, a percentile bootstrap's 1.7x, at a
tenth of the bootstrap's cost; so the jackknife decides. Nothing is random: the same features
give the same decision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


class FastFrechet:
    """FID of feature sets against one fixed reference (mu_r, S_r), for many sets.

    tr((S S_r)^{1/2}) equals the sum of the square roots of the eigenvalues of the symmetric
    R S R with R = S_r^{1/2} (S S_r and R S R are similar). R is computed once, so each set
    costs one covariance and one symmetric eigendecomposition instead of a general ``sqrtm``."""

    def __init__(self, mu: np.ndarray, sigma: np.ndarray) -> None:
        self.mu = np.asarray(mu, np.float64)
        sigma = np.asarray(sigma, np.float64)
        w, v = np.linalg.eigh((sigma + sigma.T) / 2)
        self.root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
        self.trace = float(np.trace(sigma))

    def __call__(self, features: np.ndarray) -> float:
        x = np.asarray(features, np.float64)
        mu = x.mean(0)
        xc = x - mu
        s = xc.T @ xc / (x.shape[0] - 1)
        m = self.root @ s @ self.root
        eig = np.linalg.eigvalsh((m + m.T) / 2)
        diff = mu - self.mu
        return float(max(diff @ diff + np.trace(s) + self.trace - 2 * np.sqrt(np.clip(eig, 0, None)).sum(),
                         0.0))


@dataclass(frozen=True)
class Comparison:
    promote: bool
    gain: float                  # FID(champion) - FID(challenger), all rows pooled
    lower: float                 # one-sided lower confidence bound of the gain
    stderr: float                # jackknife standard error of the gain
    confidence: float
    margin: float
    champion_fid: float          # all rows pooled
    challenger_fid: float
    blocks: int

    @property
    def reason(self) -> str:
        pct = f"{self.confidence:.0%}"
        how = f"(paired jackknife over {self.blocks} blocks, standard error {self.stderr:.4f})"
        if not math.isfinite(self.gain):
            return "features are not finite: no decision, not promoted"
        if self.promote:
            return (f"FID {self.challenger_fid:.4f} (all seeds pooled) beats champion "
                    f"{self.champion_fid:.4f}: gain "
                    f"{self.gain:.4f}, {pct} lower bound {self.lower:.4f} > margin {self.margin:g} {how}")
        return (f"FID {self.challenger_fid:.4f} (all seeds pooled) does not beat champion "
                f"{self.champion_fid:.4f} with "
                f"{pct} confidence: gain {self.gain:.4f}, {pct} lower bound {self.lower:.4f} <= "
                f"margin {self.margin:g} {how}")


def compare(champion: np.ndarray, challenger: np.ndarray, mu: np.ndarray, sigma: np.ndarray, *,
            margin: float, confidence: float, blocks: int = 20) -> Comparison:
    """The gate's decision on paired feature rows (N, d) of both models (row i of each from the
    same noise and label) against the reference (mu, sigma)."""
    from scipy.stats import t as student_t
    a, b = np.asarray(champion, np.float64), np.asarray(challenger, np.float64)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"paired features must have one shape (N, d); got champion {a.shape}, "
                         f"challenger {b.shape}")
    n = a.shape[0]
    blocks = min(blocks, n // 2)
    if blocks < 2:
        raise ValueError(f"the gate needs at least 4 samples per model, got {n}")
    if not 0.5 <= confidence < 1:
        raise ValueError(f"confidence must be in [0.5, 1), got {confidence}")
    nan = float("nan")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return Comparison(False, nan, nan, nan, confidence, margin, nan, nan, blocks)
    fid = FastFrechet(mu, sigma)
    champion_fid, challenger_fid = fid(a), fid(b)
    gain = champion_fid - challenger_fid
    # blocks from a fixed permutation: rows i and i + k carry structure (class labels cycle,
    # seeds follow each other), so neither contiguous nor interleaved blocks would be exchangeable
    block = np.random.default_rng(0).permutation(n) % blocks
    left_out = np.array([fid(a[block != k]) - fid(b[block != k]) for k in range(blocks)])
    stderr = float(np.sqrt((blocks - 1) / blocks * ((left_out - left_out.mean()) ** 2).sum()))
    lower = float(gain - student_t.ppf(confidence, blocks - 1) * stderr)
    return Comparison(bool(lower > margin), float(gain), lower, stderr, confidence, margin,
                      champion_fid, challenger_fid, blocks)


def per_seed_fid(features: np.ndarray, mu: np.ndarray, sigma: np.ndarray) -> tuple[float, float]:
    """Mean and spread (standard deviation, ddof 1) of the FID of each seed's samples
    (features (seeds, N, d)); the spread is 0 for one seed."""
    fid = FastFrechet(mu, sigma)
    values = [fid(f) for f in np.asarray(features)]
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
