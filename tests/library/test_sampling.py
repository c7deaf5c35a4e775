"""Samplers against closed forms: with the exact denoiser of Gaussian data, both samplers must
reproduce that Gaussian; DDIM's eta=1 variance is DDPM's posterior variance."""

import numpy as np
import pytest
import torch
from torch import nn

from diffusion.sampling import ddim_step, ddpm_step, respace, sample
from diffusion.schedule import NoiseSchedule

MU, SD = 0.3, 0.5


class GaussianOracle(nn.Module):
    """Exact E[eps | x_t] (or E[v | x_t]) for data x0 ~ N(MU, SD^2) per pixel:
    E[eps|x_t] = sqrt(1-abar) (x_t - sqrt(abar) MU) / (abar SD^2 + 1 - abar)."""

    def __init__(self, schedule: NoiseSchedule, target: str = "eps", num_classes: int = 0):
        super().__init__()
        self.schedule, self.target = schedule, target
        self.null_class = num_classes
        self.calls = 0

    def forward(self, x, t, labels=None):
        self.calls += 1
        ab = self.schedule.alpha_bar[t].view(-1, 1, 1, 1).to(x.dtype)
        shift = labels.view(-1, 1, 1, 1).float() * 0.1 if labels is not None else 0.0
        mu = MU + shift
        resid = x - ab.sqrt() * mu
        denom = ab * SD**2 + 1 - ab
        eps = (1 - ab).sqrt() * resid / denom
        if self.target == "eps":
            return eps
        x0 = mu + ab.sqrt() * SD**2 * resid / denom
        return ab.sqrt() * eps - (1 - ab).sqrt() * x0


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule.create("linear", 1000)


@pytest.mark.parametrize("sampler, steps, eta, target, rel", [
    ("ddim", 50, 0.0, "eps", 0.10), ("ddim", 200, 0.0, "v", 0.05), ("ddim", 200, 1.0, "eps", 0.05),
    ("ddpm", 1000, 0.0, "eps", 0.05), ("ddpm", 250, 0.0, "v", 0.07),
])
def test_samplers_reproduce_gaussian_data(schedule, sampler, steps, eta, target, rel):
    # Few steps leave a discretisation error (DDIM-50 comes out ~7 % narrow), hence `rel`.
    n = 1000
    x = sample(GaussianOracle(schedule, target), schedule, n, channels=1, resolution=1,
               sampler=sampler, steps=steps, eta=eta, target=target, seed=0, clip_denoised=False,
               progress=False)
    assert x.shape == (n, 1, 1, 1)
    assert x.mean().item() == pytest.approx(MU, abs=4 * SD / n**0.5)
    assert x.std().item() == pytest.approx(SD, rel=rel)


def _numpy_chain(schedule, steps, eta, sampler, x_T, noises):
    """Independent float64 reference: Ho et al. eq. 6-7 and Song et al. eq. 12 on a respaced chain."""
    T = schedule.num_timesteps
    kept = np.round(np.linspace(0, T - 1, steps)).astype(int)
    abar_full = np.cumprod(1 - schedule.betas.numpy())
    x = x_T.astype(np.float64)
    for i in range(steps - 1, -1, -1):
        a = abar_full[kept[i]]
        ap = abar_full[kept[i - 1]] if i > 0 else 1.0
        eps = np.sqrt(1 - a) * (x - np.sqrt(a) * MU) / (a * SD**2 + 1 - a)
        x0 = (x - np.sqrt(1 - a) * eps) / np.sqrt(a)
        if sampler == "ddpm":
            beta = 1 - a / ap
            mean = np.sqrt(ap) * beta / (1 - a) * x0 + np.sqrt(1 - beta) * (1 - ap) / (1 - a) * x
            x = mean + (np.sqrt(beta * (1 - ap) / (1 - a)) * noises[i] if i > 0 else 0)
        else:
            sigma = eta * np.sqrt((1 - ap) / (1 - a) * (1 - a / ap))
            x = np.sqrt(ap) * x0 + np.sqrt(1 - ap - sigma**2) * eps + (sigma * noises[i] if i > 0 else 0)
    return x


@pytest.mark.parametrize("sampler, eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 0.5)])
def test_samplers_match_independent_numpy_chain(schedule, sampler, eta):
    n, steps, seed = 6, 25, 11
    ours = sample(GaussianOracle(schedule), schedule, n, channels=1, resolution=2, sampler=sampler,
                  steps=steps, eta=eta, seed=seed, clip_denoised=False, progress=False)
    # replay each image's generator: x_T first, then one draw per stochastic step (i = steps-1..1)
    x_T, noises = [], {i: [] for i in range(steps)}
    for j in range(n):
        g = torch.Generator().manual_seed(seed + j)
        x_T.append(torch.randn((1, 2, 2), generator=g).numpy())
        for i in range(steps - 1, 0, -1):
            if sampler == "ddpm" or eta > 0:
                noises[i].append(torch.randn((1, 2, 2), generator=g).numpy())
    noises = {i: np.stack(v) if v else 0.0 for i, v in noises.items()}
    ref = _numpy_chain(schedule, steps, eta, sampler, np.stack(x_T), noises)
    np.testing.assert_allclose(ours.numpy(), ref, rtol=5e-4, atol=5e-4)   # float32 vs float64


def test_respacing(schedule):
    full = respace(schedule, 1000)
    assert torch.equal(full.timesteps, torch.arange(1000))
    assert torch.allclose(full.betas, schedule.betas)            # N = T gives back the chain
    short = respace(schedule, 10)
    assert short.timesteps[0] == 0 and short.timesteps[-1] == 999 and len(short.timesteps) == 10
    # the shortened chain keeps the marginals: prod(1 - beta') = abar at the kept steps
    assert torch.allclose(torch.cumprod(1 - short.betas, 0), schedule.alpha_bar[short.timesteps])
    with pytest.raises(ValueError, match=r"sampling steps must be in \[1, 1000\], got 0"):
        respace(schedule, 0)
    # one step starts from pure noise at T - 1 and jumps straight to x0 (abar_prev = 1)
    one = respace(schedule, 1)
    assert one.timesteps.tolist() == [999] and one.alpha_bar_prev.tolist() == [1.0]


@pytest.mark.parametrize("steps", [1, 2, 20, 1000])
def test_ddpm_last_step_returns_x0_exactly(schedule, steps):
    """Ho et al. eq. 7 at the last step: coefficient 1 on x0 and 0 on x_t, exactly, in float32
    (computing 1 - abar after a float32 cast gave 0.99947)."""
    rs = respace(schedule, steps)
    assert rs.posterior_mean_coef_x0[0].item() == 1.0 and rs.posterior_mean_coef_xt[0].item() == 0.0
    gen = torch.Generator().manual_seed(0)
    x0, xt = torch.randn(4, 1, 5, 5, generator=gen), torch.randn(4, 1, 5, 5, generator=gen)
    assert torch.equal(ddpm_step(rs, 0, xt, x0, torch.zeros_like(xt)), x0)
    # elsewhere the float64 coefficients equal eq. 7 from the full-precision schedule
    if steps > 2:
        i = steps // 2
        ab, abp = rs.alpha_bar[i].item(), rs.alpha_bar_prev[i].item()
        beta = 1 - ab / abp
        assert rs.posterior_mean_coef_x0[i].item() == pytest.approx(abp ** 0.5 * beta / (1 - ab), rel=1e-12)
        assert rs.posterior_mean_coef_xt[i].item() == pytest.approx(
            (1 - beta) ** 0.5 * (1 - abp) / (1 - ab), rel=1e-12)


def test_ddim_eta_one_has_ddpm_posterior_variance(schedule):
    # Song et al. eq. 16: with eta = 1, sigma_t^2 equals beta tilde of the (respaced) chain.
    rs = respace(schedule, 20)
    x = torch.zeros(20000, 1, 1, 1)
    x0 = torch.zeros_like(x)
    i = 7
    eps = torch.zeros_like(x)        # zero predicted noise isolates the sigma * z term
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    out = ddim_step(rs, i, x, x0, eps, 1.0, z)
    var = rs.posterior_variance[i].item()
    assert out.var().item() == pytest.approx(var, rel=0.03)
    ddpm = ddpm_step(rs, i, x, x0, z)
    assert torch.allclose(out, ddpm, atol=1e-6)


def test_ddim_eta_zero_is_deterministic_and_batch_independent(schedule):
    oracle = GaussianOracle(schedule)
    kw = dict(channels=1, resolution=2, sampler="ddim", steps=20, progress=False)
    a = sample(oracle, schedule, 10, seed=3, batch_size=10, **kw)
    b = sample(oracle, schedule, 10, seed=3, batch_size=3, **kw)
    c = sample(oracle, schedule, 10, seed=4, batch_size=10, **kw)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    # image j depends only on seed + j
    d = sample(oracle, schedule, 4, seed=5, **kw)
    assert torch.equal(a[2:6], d)
    # with eta = 0 the only randomness is x_T: same x_T, same image, whatever else ran before
    e = sample(oracle, schedule, 10, seed=3, batch_size=10, **kw)
    assert torch.equal(a, e)


def test_ddpm_is_seed_deterministic(schedule):
    oracle = GaussianOracle(schedule)
    kw = dict(channels=1, resolution=2, sampler="ddpm", steps=30, progress=False)
    assert torch.equal(sample(oracle, schedule, 6, seed=1, **kw),
                       sample(oracle, schedule, 6, seed=1, batch_size=4, **kw))
    assert not torch.equal(sample(oracle, schedule, 6, seed=1, **kw),
                           sample(oracle, schedule, 6, seed=2, **kw))


def test_classifier_free_guidance_combination(schedule):
    # guidance w: eps = eps_null + w (eps_cond - eps_null); the oracle's class shifts its mean by
    # 0.1 * label, so with label 2 and null class 0 the guided mean is MU + w * 0.2.
    oracle = GaussianOracle(schedule, num_classes=0)
    labels = torch.full((800,), 2)
    kw = dict(channels=1, resolution=2, sampler="ddim", steps=50, clip_denoised=False, batch_size=800,
              progress=False)
    plain = sample(oracle, schedule, 800, labels=labels, guidance_scale=1.0, **kw)
    calls = oracle.calls
    guided = sample(oracle, schedule, 800, labels=labels, guidance_scale=2.0, **kw)
    assert plain.mean().item() == pytest.approx(MU + 0.2, abs=0.02)
    assert guided.mean().item() == pytest.approx(MU + 0.4, abs=0.03)
    assert oracle.calls - calls == 50          # one batched call per step (cond and null together)


def test_clipping_keeps_range_and_bad_arguments(schedule):
    class Wild(nn.Module):
        def forward(self, x, t):
            return -5 * torch.ones_like(x)
    x = sample(Wild(), schedule, 4, channels=1, resolution=2, steps=10, progress=False)
    assert x.abs().max() <= 1.0 + 1e-6
    with pytest.raises(ValueError, match="unknown sampler 'euler'"):
        sample(Wild(), schedule, 2, channels=1, resolution=2, sampler="euler", progress=False)
    with pytest.raises(ValueError, match=r"labels must have shape \(2,\)"):
        sample(Wild(), schedule, 2, channels=1, resolution=2, labels=torch.zeros(3, dtype=torch.long),
               progress=False)


def test_bf16_sampling_runs_the_network_in_bf16_and_keeps_the_law(schedule):
    class CastProbe(GaussianOracle):
        """The exact denoiser followed by an identity 1x1 convolution, which autocast runs in bf16."""

        def __init__(self, schedule):
            super().__init__(schedule)
            self.conv = nn.Conv2d(1, 1, 1, bias=False)
            nn.init.ones_(self.conv.weight)
            self.dtypes = set()

        def forward(self, x, t, labels=None):
            out = self.conv(super().forward(x, t, labels))
            self.dtypes.add(out.dtype)
            return out

    kw = dict(channels=1, resolution=4, sampler="ddim", steps=50, clip_denoised=False, batch_size=2000,
              progress=False)
    probe = CastProbe(schedule)
    x = sample(probe, schedule, 2000, precision="bf16", **kw)
    assert probe.dtypes == {torch.bfloat16} and x.dtype == torch.float32
    assert x.mean().item() == pytest.approx(MU, abs=0.03)
    assert x.std().item() == pytest.approx(SD, rel=0.10)
    exact = CastProbe(schedule)
    y = sample(exact, schedule, 2000, **kw)
    assert exact.dtypes == {torch.float32}
    assert 0 < (x - y).abs().mean().item() < 0.02        # rounding, not a different sampler
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        sample(exact, schedule, 2, channels=1, resolution=2, precision="fp8", progress=False)


def test_channels_last_sampling_gives_the_same_images_and_leaves_the_model_alone(tmp_path, monkeypatch):
    import json
    from diffusion import hardware
    from diffusion.config import load_config
    from diffusion.sampling import resolve_sampling_memory_format
    from diffusion.unet import UNet
    cfg = load_config(None, ["model.preset=tiny", "model.num_classes=10", "data.resolution=8"])
    torch.manual_seed(0)
    net = UNet(cfg.model, 1, 8).eval()
    sched = NoiseSchedule.create("cosine", 1000)
    labels = torch.arange(6) % 10
    kw = dict(channels=1, resolution=8, steps=5, labels=labels, guidance_scale=2.0, progress=False)
    plain = sample(net, sched, 6, memory_format="contiguous", **kw)
    cl = sample(net, sched, 6, memory_format="channels_last", **kw)
    assert cl.is_contiguous() and torch.allclose(plain, cl, atol=1e-4)
    assert all(p.is_contiguous() for p in net.parameters())          # the caller's model is unchanged
    # auto: what this machine measured decides (channels_last only when 5 % faster), and the
    # rates in the cache decide a later resolution
    monkeypatch.setenv(hardware.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(hardware, "PROBE_SECONDS", 0.05)
    cache = tmp_path / "cache" / "precision.json"

    def resolve():
        return resolve_sampling_memory_format(net, "auto", precision="fp32", channels=1, resolution=8,
                                              batch_size=6, guided=True)
    fmt, why = resolve()
    ((key, rates),) = json.loads(cache.read_text()).items()
    faster = rates["channels_last"] >= rates["contiguous"] * hardware.BF16_MIN_SPEEDUP
    assert fmt == ("channels_last" if faster else "contiguous") and why.startswith("auto: measured: ")
    for rates, expected in (({"contiguous": 100.0, "channels_last": 300.0}, "channels_last"),
                            ({"contiguous": 300.0, "channels_last": 100.0}, "contiguous"),
                            ({"contiguous": 100.0, "channels_last": 104.0}, "contiguous")):
        cache.write_text(json.dumps({key: rates}))
        assert resolve() == (expected, f"auto: cached measurement: contiguous {rates['contiguous']:.0f} "
                                       f"img/s, channels_last {rates['channels_last']:.0f} img/s")
    with pytest.raises(ValueError, match="unknown memory format 'nhwc'; expected one of auto, contiguous"):
        sample(net, sched, 2, memory_format="nhwc", **{**kw, "labels": labels[:2]})
