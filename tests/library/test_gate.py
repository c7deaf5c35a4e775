"""The gate's decision rule on synthetic features with known answers, and its FID against the
reference implementation (diffusion.fid, scipy's sqrtm)."""

import numpy as np
import pytest

from diffusion.fid import frechet_distance
from diffusion.gate import FastFrechet, compare, per_seed_fid

D = 16


def _reference(seed: int = 0):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(D, D)) / np.sqrt(D)
    sigma = a @ a.T + 0.2 * np.eye(D)
    return rng.normal(size=D), sigma, np.linalg.cholesky(sigma)


def _draw(rng, n, mu, chol, shift=0.0):
    return rng.normal(size=(n, D)) @ chol.T + mu + shift


def test_fast_frechet_is_the_reference_fid():
    mu, sigma, chol = _reference()
    rng = np.random.default_rng(1)
    for shift in (0.0, 0.3):
        x = _draw(rng, 300, mu, chol, shift) * np.linspace(0.8, 1.2, D)
        expected = frechet_distance(x.mean(0), np.cov(x, rowvar=False), mu, sigma).value
        assert FastFrechet(mu, sigma)(x) == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_identical_samples_are_never_promoted():
    mu, sigma, chol = _reference()
    x = _draw(np.random.default_rng(2), 400, mu, chol, 0.5)
    c = compare(x, x.copy(), mu, sigma, margin=0.0, confidence=0.95)
    assert not c.promote and c.gain == 0 and c.stderr == 0
    assert "does not beat" in c.reason and "95%" in c.reason


def test_a_clearly_better_challenger_is_promoted_and_the_margin_holds_it_back():
    mu, sigma, chol = _reference()
    rng = np.random.default_rng(3)
    noise = rng.normal(size=(400, D)) @ chol.T
    champion, challenger = noise + mu + 0.4, noise + mu      # paired rows: same noise, one is off
    gain = FastFrechet(mu, sigma)(champion) - FastFrechet(mu, sigma)(challenger)
    assert gain == pytest.approx(D * 0.4 ** 2, rel=0.15)     # a shift of 0.4 in each of D dims
    c = compare(champion, challenger, mu, sigma, margin=0.0, confidence=0.95)
    assert c.promote and c.lower > 0 and c.gain == pytest.approx(gain)
    assert "beats champion" in c.reason
    # the same evidence, but a margin above the gain: kept out
    assert not compare(champion, challenger, mu, sigma, margin=gain + 0.1, confidence=0.95).promote


def test_equal_models_are_rarely_promoted_and_the_stated_error_is_not_too_small():
    """Two models of equal quality (independent draws of one distribution): a 95 % gate may
    promote about 5 % of them (binomial: 10 of 200, more than 16 has odds of about 1 in 40; a
    90 % rule would promote about 20); the jackknife's standard error must cover the gains' real
    spread. Deterministic: the draws are seeded."""
    mu, sigma, chol = _reference()
    rng = np.random.default_rng(4)
    promoted, gains, errors = 0, [], []
    for _ in range(200):
        c = compare(_draw(rng, 300, mu, chol, 0.2), _draw(rng, 300, mu, chol, 0.2), mu, sigma,
                    margin=0.0, confidence=0.95)
        promoted += c.promote
        gains.append(c.gain)
        errors.append(c.stderr)
    assert promoted <= 16
    assert np.mean(errors) >= 0.8 * np.std(gains)         # not overconfident


def test_pairing_sees_a_small_gain_that_unpaired_samples_hide():
    mu, sigma, chol = _reference()
    rng = np.random.default_rng(5)
    noise = rng.normal(size=(300, D)) @ chol.T
    paired = compare(noise + mu + 0.25, noise + mu + 0.15, mu, sigma, margin=0.0, confidence=0.95)
    other = rng.normal(size=(300, D)) @ chol.T
    unpaired = compare(noise + mu + 0.25, other + mu + 0.15, mu, sigma, margin=0.0, confidence=0.95)
    assert paired.promote and paired.stderr < unpaired.stderr / 3


def test_per_seed_fid_uses_the_sample_standard_deviation():
    mu, sigma, chol = _reference()
    rng = np.random.default_rng(6)
    seeds = np.stack([_draw(rng, 200, mu, chol, s) for s in (0.1, 0.2, 0.3)])
    values = [frechet_distance(f.mean(0), np.cov(f, rowvar=False), mu, sigma).value for f in seeds]
    mean, std = per_seed_fid(seeds, mu, sigma)
    assert mean == pytest.approx(np.mean(values)) and std == pytest.approx(np.std(values, ddof=1))
    assert per_seed_fid(seeds[:1], mu, sigma)[1] == 0.0


def test_bad_input_is_refused_with_the_reason():
    mu, sigma, chol = _reference()
    x = _draw(np.random.default_rng(7), 50, mu, chol)
    with pytest.raises(ValueError, match="one shape"):
        compare(x, x[:40], mu, sigma, margin=0.0, confidence=0.95)
    with pytest.raises(ValueError, match="confidence"):
        compare(x, x, mu, sigma, margin=0.0, confidence=1.0)
    bad = x.copy()
    bad[3, 2] = np.nan
    assert not compare(x, bad, mu, sigma, margin=0.0, confidence=0.95).promote
