"""Noise schedules and forward-process maths against closed forms."""

import math

import numpy as np
import pytest
import torch

from diffusion.schedule import NoiseSchedule, extract


@pytest.fixture(scope="module", params=["linear", "cosine"])
def schedule(request):
    return NoiseSchedule.create(request.param, 1000)


def test_linear_betas_closed_form():
    s = NoiseSchedule.create("linear", 1000)
    np.testing.assert_allclose(s.betas.numpy(), np.linspace(1e-4, 0.02, 1000), rtol=0, atol=1e-15)
    # alpha_bar_t = exp(sum log(1 - beta)) computed independently in numpy
    ref = np.exp(np.cumsum(np.log1p(-np.linspace(1e-4, 0.02, 1000))))
    np.testing.assert_allclose(s.alpha_bar.numpy(), ref, rtol=1e-12)
    # Ho et al. quote alpha_bar_T ~ 4.0e-5 for this schedule (SNR at t=T near zero)
    assert 3e-5 < s.alpha_bar[-1] < 5e-5
    # T=250 rescales beta so the chain still ends near pure noise
    assert NoiseSchedule.create("linear", 250).betas[-1] == pytest.approx(0.08)


def test_cosine_alpha_bar_closed_form():
    T, s_ = 1000, 0.008
    s = NoiseSchedule.create("cosine", T)
    f = lambda t: math.cos((t / T + s_) / (1 + s_) * math.pi / 2) ** 2  # noqa: E731
    ref = np.array([f(t + 1) / f(0) for t in range(T)])
    # identical wherever beta was not clipped at 0.999 (only the very last steps)
    unclipped = s.betas.numpy() < 0.999
    assert unclipped[:990].all()
    np.testing.assert_allclose(s.alpha_bar.numpy()[unclipped], ref[unclipped], rtol=1e-10)
    assert s.betas.max() <= 0.999


def test_schedule_is_immutable_and_to_returns_new(schedule):
    with pytest.raises(Exception):
        schedule.betas = torch.zeros(3)
    moved = schedule.to("cpu")
    assert moved is not schedule and moved.alpha_bar.dtype == torch.float64
    assert torch.equal(moved.alpha_bar, schedule.alpha_bar)


def test_bad_schedule_arguments():
    with pytest.raises(ValueError, match="unknown schedule 'sigmoid'; expected one of linear, cosine"):
        NoiseSchedule.create("sigmoid", 10)
    with pytest.raises(ValueError, match="timesteps must be >= 2"):
        NoiseSchedule.create("linear", 1)
    with pytest.raises(ValueError, match=r"betas must lie in \(0, 1\)"):
        NoiseSchedule.from_betas(torch.tensor([0.1, 1.5]))


def test_extract_broadcasts():
    coef = torch.arange(10, dtype=torch.float64)
    x = torch.zeros(3, 2, 4, 4)
    out = extract(coef, torch.tensor([1, 5, 9]), x)
    assert out.shape == (3, 1, 1, 1) and out.dtype == torch.float32
    assert out.flatten().tolist() == [1.0, 5.0, 9.0]


def test_q_sample_statistics(schedule):
    # x_t | x0 ~ N(sqrt(abar) x0, (1 - abar) I): check mean and variance over many draws
    g = torch.Generator().manual_seed(0)
    n = 200_000
    for t_ in (0, 300, 999):
        x0 = torch.full((n, 1, 1, 1), 0.7)
        t = torch.full((n,), t_)
        xt = schedule.q_sample(x0, t, torch.randn(x0.shape, generator=g))
        abar = float(schedule.alpha_bar[t_])
        assert xt.mean().item() == pytest.approx(math.sqrt(abar) * 0.7, abs=4 * math.sqrt((1 - abar) / n) + 1e-6)
        assert xt.var().item() == pytest.approx(1 - abar, rel=0.02, abs=1e-6)


def test_posterior_matches_bayes_rule(schedule):
    """q(x_{t-1}|x_t,x0) ∝ N(x_t; sqrt(a_t) x_{t-1}, b_t) N(x_{t-1}; sqrt(abar_{t-1}) x0, 1-abar_{t-1}):
    precision = a_t/b_t + 1/(1-abar_{t-1}); mean = (sqrt(a_t) x_t/b_t + sqrt(abar_{t-1}) x0/(1-abar_{t-1}))/precision."""
    b = schedule.betas.numpy()
    abar = np.cumprod(1 - b)
    t = torch.tensor([1, 10, 500, 999])
    x0 = torch.tensor([0.3, -0.8, 0.5, 1.0], dtype=torch.float64).view(4, 1, 1, 1)
    xt = torch.tensor([1.2, 0.1, -2.0, 0.4], dtype=torch.float64).view(4, 1, 1, 1)
    mean, var, logvar = schedule.q_posterior(x0, xt, t)
    for i, ti in enumerate(t.tolist()):
        a_t, ab_prev = 1 - b[ti], abar[ti - 1]
        precision = a_t / b[ti] + 1 / (1 - ab_prev)
        ref_mean = (math.sqrt(a_t) * xt[i].item() / b[ti] + math.sqrt(ab_prev) * x0[i].item() / (1 - ab_prev)) / precision
        assert mean[i].item() == pytest.approx(ref_mean, rel=1e-9)
        assert var[i].item() == pytest.approx(1 / precision, rel=1e-9)
        assert logvar[i].item() == pytest.approx(math.log(1 / precision), rel=1e-9)


def test_posterior_at_first_step_is_x0(schedule):
    # At t=0 the posterior collapses onto x0; the stored log-variance is clipped to stay finite.
    x0, xt = torch.full((1, 1, 2, 2), 0.25, dtype=torch.float64), torch.randn(1, 1, 2, 2, dtype=torch.float64)
    mean, var, logvar = schedule.q_posterior(x0, xt, torch.tensor([0]))
    assert torch.allclose(mean, x0) and var.item() == 0 and math.isfinite(logvar.item())


@pytest.mark.parametrize("target", ["eps", "v"])
def test_parameterisations_round_trip(schedule, target):
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(8, 1, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(8, 1, 4, 4, generator=g, dtype=torch.float64)
    t = torch.randint(0, 1000, (8,), generator=g)
    xt = schedule.q_sample(x0, t, eps)
    output = eps if target == "eps" else schedule.v_target(x0, eps, t)
    x0_hat, eps_hat = schedule.predict_x0_eps(xt, t, output, target)
    assert torch.allclose(eps_hat, eps, atol=1e-9)
    tol = 1e-9 if target == "v" else 1e-4     # eps -> x0 divides by sqrt(abar), tiny near t=T
    assert torch.allclose(x0_hat, x0, atol=tol)
    # v = sqrt(abar) eps - sqrt(1-abar) x0 (Salimans & Ho): check one element by hand
    if target == "v":
        ab = schedule.alpha_bar[t[0]].item()
        assert output[0, 0, 0, 0].item() == pytest.approx(math.sqrt(ab) * eps[0, 0, 0, 0].item()
                                                          - math.sqrt(1 - ab) * x0[0, 0, 0, 0].item())
