"""Training objective against closed forms."""

import math

import pytest
import torch

from diffusion.losses import DiffusionLoss, UniformTimestepSampler, min_snr_weight
from diffusion.schedule import NoiseSchedule


def test_min_snr_weights_closed_form():
    snr = torch.tensor([0.01, 1.0, 5.0, 100.0])
    g = 5.0
    assert torch.allclose(min_snr_weight(snr, g, "eps"), torch.tensor([1.0, 1.0, 1.0, 0.05]))
    assert torch.allclose(min_snr_weight(snr, g, "v"),
                          torch.tensor([0.01 / 1.01, 0.5, 5 / 6, 5 / 101]))
    with pytest.raises(ValueError, match="unknown target 'x0'"):
        min_snr_weight(snr, g, "x0")


def test_uniform_sampler_covers_range_uniformly():
    s = UniformTimestepSampler(10)
    t, w = s.sample(100_000, torch.Generator().manual_seed(0))
    assert t.min() == 0 and t.max() == 9 and torch.all(w == 1)
    counts = torch.bincount(t, minlength=10).double()
    chi2 = ((counts - 10_000) ** 2 / 10_000).sum().item()
    assert chi2 < 27.9            # chi-square, 9 dof, p = 0.001


def _zero_net(x, t, labels=None):
    return torch.zeros_like(x)


def test_loss_is_per_sample_mse_of_the_target():
    sched = NoiseSchedule.create("linear", 100)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 1, 3, 3, generator=g) * 2 - 1
    noise = torch.randn(4, 1, 3, 3, generator=g)
    t = torch.tensor([0, 10, 50, 99])
    ones = torch.ones(4)
    eps_loss = DiffusionLoss(sched, "eps")(_zero_net, x0, t, noise, ones)
    assert eps_loss.shape == (4,)
    assert torch.allclose(eps_loss, noise.pow(2).flatten(1).mean(1))
    v_loss = DiffusionLoss(sched, "v")(_zero_net, x0, t, noise, ones)
    ab = sched.alpha_bar[t].float().view(4, 1, 1, 1)
    v = ab.sqrt() * noise - (1 - ab).sqrt() * x0
    assert torch.allclose(v_loss, v.pow(2).flatten(1).mean(1), atol=1e-6)
    weighted = DiffusionLoss(sched, "eps", "min_snr", 5.0)(_zero_net, x0, t, noise, ones * 2)
    snr = sched.snr[t].float()
    assert torch.allclose(weighted, 2 * eps_loss * snr.clamp(max=5) / snr, rtol=1e-5)


def test_perfect_eps_prediction_has_zero_loss():
    sched = NoiseSchedule.create("cosine", 50)
    x0 = torch.zeros(2, 1, 2, 2)
    noise = torch.randn(2, 1, 2, 2)
    t = torch.tensor([3, 40])
    # for x0 = 0, x_t = sqrt(1 - abar) eps, so eps = x_t / sqrt(1 - abar)
    oracle = lambda x, tt: x / (1 - sched.alpha_bar[tt].float()).sqrt().view(-1, 1, 1, 1)  # noqa: E731
    loss = DiffusionLoss(sched, "eps")(oracle, x0, t, noise, torch.ones(2))
    assert loss.max().item() < 1e-10


def test_bad_options_are_named():
    sched = NoiseSchedule.create("linear", 10)
    with pytest.raises(ValueError, match="unknown target 'x0'; expected one of eps, v"):
        DiffusionLoss(sched, "x0")
    with pytest.raises(ValueError, match="unknown loss weighting 'p2'; expected one of none, min_snr"):
        DiffusionLoss(sched, "eps", "p2")
    assert math.isfinite(DiffusionLoss(sched).min_snr_gamma)
