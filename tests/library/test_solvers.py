"""DPM-Solver++(2M) and UniPC against an independent implementation (diffusers' schedulers,
configured to the same conventions) step by step, and against the closed form: on Gaussian data
with the exact denoiser the probability-flow ODE maps N(0, 1) to the data's Gaussian."""

import pytest
import torch

from diffusion.sampling import respace, sample
from diffusion.schedule import NoiseSchedule
from diffusion.solvers import SPACINGS, solve, solver_schedule, solver_timesteps
from tests.library.test_sampling import MU, SD, GaussianOracle

diffusers = pytest.importorskip("diffusers")

CONFIG = {"dpmpp_2m": ("DPMSolverMultistepScheduler",
                       {"algorithm_type": "dpmsolver++", "solver_type": "midpoint", "solver_order": 2}),
          "unipc": ("UniPCMultistepScheduler",
                    {"solver_type": "bh2", "predict_x0": True, "solver_order": 2})}


def diffusers_trajectory(solver, schedule, target, steps, spacing, x):
    name, extra = CONFIG[solver]
    sched = getattr(diffusers, name)(
        num_train_timesteps=schedule.num_timesteps, trained_betas=schedule.betas.double().numpy(),
        prediction_type={"eps": "epsilon", "v": "v_prediction"}[target], lower_order_final=True,
        final_sigmas_type="zero", timestep_spacing=spacing, thresholding=False, **extra)
    sched.set_timesteps(steps)
    oracle, states = GaussianOracle(schedule, target), []
    for t in sched.timesteps:
        out = oracle(x, torch.full((x.shape[0],), int(t)))
        x = sched.step(out, t, x).prev_sample
        states.append(x.clone())
    return [int(t) for t in sched.timesteps], states


def our_trajectory(solver, schedule, target, steps, spacing, x):
    oracle, states = GaussianOracle(schedule, target), []

    def denoise(x, t):
        tt = torch.full((x.shape[0],), t)
        return schedule.predict_x0_eps(x, tt, oracle(x, tt), target)[0]
    ss = solver_schedule(schedule, steps, spacing)
    solve(denoise, ss, x, solver, on_step=lambda i, x: states.append(x.clone()))
    return list(ss.timesteps), states


@pytest.mark.parametrize("solver", ["dpmpp_2m", "unipc"])
@pytest.mark.parametrize("schedule_name, target", [("cosine", "v"), ("linear", "eps"), ("cosine", "eps"),
                                                   ("linear", "v")])
@pytest.mark.parametrize("steps, spacing", [(5, "linspace"), (10, "linspace"), (20, "trailing"), (1, "linspace")])
def test_trajectories_match_diffusers(solver, schedule_name, target, steps, spacing):
    schedule = NoiseSchedule.create(schedule_name, 1000)
    x = torch.randn(64, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    ref_times, ref = diffusers_trajectory(solver, schedule, target, steps, spacing, x)
    times, ours = our_trajectory(solver, schedule, target, steps, spacing, x)
    assert times == ref_times and len(ours) == len(ref) == steps
    # diffusers keeps abar and its coefficients in float32, ours are float64: ~1e-6 apart. With
    # eps on the cosine schedule, x0 = (x - sigma eps) / alpha multiplies that rounding by
    # 1 / sqrt(abar_999) = 2e4 at the first step (both solvers alike: it is the conversion).
    atol = 1e-2 if (schedule_name, target) == ("cosine", "eps") else 1e-4
    for i, (a, b) in enumerate(zip(ours, ref)):
        torch.testing.assert_close(a, b, rtol=0, atol=atol, msg=f"step {i}")


def test_timestep_conventions():
    assert solver_timesteps(1000, 5, "linspace") == [999, 799, 599, 400, 200]
    assert solver_timesteps(1000, 5, "trailing") == [999, 799, 599, 399, 199]
    assert solver_timesteps(1000, 1, "linspace") == [999]
    with pytest.raises(ValueError, match="unknown timestep spacing 'leading'; expected one of linspace, trailing"):
        solver_timesteps(1000, 5, "leading")
    assert SPACINGS == ("linspace", "trailing")


def _moments_error(images):
    return abs(images.mean().item() - MU) + abs(images.std().item() - SD)


@pytest.mark.parametrize("schedule_name, target", [("cosine", "v"), ("linear", "eps")])
def test_gaussian_data_few_steps_and_better_than_ddim(schedule_name, target):
    """The ODE with the exact denoiser maps N(0, 1) to N(MU, SD^2). Measured error of the
    sample's mean and std (32,768 values, sampling noise ~0.002): at 10 steps both solvers beat
    DDIM-10 (cosine/v 0.02 vs 0.08; linear/eps 0.09 vs 0.14), at 20 steps they beat DDIM-50,
    and on cosine/v 20 steps reach the target (1e-4)."""
    schedule = NoiseSchedule.create(schedule_name, 1000)
    oracle = GaussianOracle(schedule, target)
    kw = dict(channels=1, resolution=8, target=target, seed=0, clip_denoised=False, progress=False,
              batch_size=512)
    errors = {}
    for sampler, steps in [("ddim", 10), ("ddim", 50), ("dpmpp_2m", 5), ("dpmpp_2m", 10), ("dpmpp_2m", 20),
                           ("unipc", 5), ("unipc", 10), ("unipc", 20)]:
        images = sample(oracle, schedule, 512, sampler=sampler, steps=steps, **kw)
        errors[sampler, steps] = _moments_error(images)
    for solver in ("dpmpp_2m", "unipc"):
        assert errors[solver, 10] < 0.75 * errors["ddim", 10], errors
        assert errors[solver, 20] < errors["ddim", 50], errors
        assert errors[solver, 5] > errors[solver, 10] > errors[solver, 20], errors
        if schedule_name == "cosine":
            assert errors[solver, 20] < 0.005, errors


def test_per_image_determinism_guidance_and_bad_names():
    schedule = NoiseSchedule.create("cosine", 1000)
    oracle = GaussianOracle(schedule, "v", num_classes=10)
    labels = torch.arange(7) % 10
    kw = dict(channels=1, resolution=4, target="v", labels=labels, guidance_scale=2.0, progress=False)
    for solver in ("dpmpp_2m", "unipc"):
        whole = sample(oracle, schedule, 7, sampler=solver, steps=8, batch_size=7, **kw)
        pieces = sample(oracle, schedule, 7, sampler=solver, steps=8, batch_size=3, **kw)
        assert torch.equal(whole, pieces)                          # image j whatever the batch
        assert torch.equal(whole, sample(oracle, schedule, 7, sampler=solver, steps=8, batch_size=7, **kw))
        assert not torch.equal(whole, sample(oracle, schedule, 7, sampler=solver, steps=8, seed=1, **kw))
        # guidance shifts the class-conditional mean (the oracle's class shift is 0.1 per class)
        plain = sample(oracle, schedule, 7, sampler=solver, steps=8, **{**kw, "guidance_scale": 1.0})
        assert not torch.equal(whole, plain)
    with pytest.raises(ValueError, match="unknown sampler 'euler'; expected one of ddpm, ddim, dpmpp_2m, unipc"):
        sample(oracle, schedule, 2, sampler="euler", steps=4, **{**kw, "labels": labels[:2]})
    with pytest.raises(ValueError, match="unknown timestep spacing"):
        sample(oracle, schedule, 2, sampler="unipc", steps=4, spacing="karras", **{**kw, "labels": labels[:2]})
    assert respace(schedule, 8).timesteps[-1] == 999          # DDIM keeps its own respacing
