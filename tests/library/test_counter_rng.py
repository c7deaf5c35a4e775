"""Per-sample randomness (diffusion.counter_rng): the reference generator's published values, the
statistics of the noise against independent draws, and independence from how samples are split
across ranks and micro-batches."""

import numpy as np
import pytest
import torch
from scipy import stats

from diffusion import counter_rng as rng
from diffusion.config import load_config
from diffusion.data import load_dataset
from diffusion.trainer import BatchPlan, DistContext
from tests.helpers import digits_dir


def test_mix_is_splitmix64():
    # The first outputs of Vigna's splitmix64.c seeded with 1234567 (its published test values).
    expected = [6457827717110365317, 3203168211198807973, 9817491932198370423,
                4593380528125082431, 16408922859458223821]
    state, ours = 1234567, []
    for _ in expected:
        state = (state + rng.GOLDEN) & rng.MASK64
        ours.append(rng.mix_int(state))
    assert ours == expected
    # the int64 tensor version (wrapping multiplication, masked shifts) gives the same bits
    counters = [(1234567 + (i + 1) * rng.GOLDEN) & rng.MASK64 for i in range(5)]
    signed = torch.tensor([c - (1 << 64) if c >= 1 << 63 else c for c in counters])
    assert [v & rng.MASK64 for v in rng.mix(signed).tolist()] == expected


def test_sample_words_follow_the_documented_layout():
    key = rng.stream_key(3, 17, rng.STREAM_NOISE)
    words = rng.sample_words(3, 17, rng.STREAM_NOISE, torch.tensor([0, 5]), 4)
    for row, i in enumerate((0, 5)):
        sample_key = rng.mix_int(key + (i + 1) * rng.GOLDEN)
        for j in range(4):
            assert words[row, j].item() & rng.MASK64 == rng.mix_int(sample_key + (j + 1) * rng.GOLDEN)


def test_noise_has_standard_normal_statistics():
    z = rng.normal(0, 123, rng.STREAM_NOISE, torch.arange(256), (3, 16, 16))     # 196,608 values
    flat = z.flatten().double().numpy()
    assert abs(flat.mean()) < 4 / np.sqrt(flat.size)
    assert abs(flat.var() - 1) < 4 * np.sqrt(2 / flat.size)
    assert stats.kstest(flat, "norm").pvalue > 1e-3
    # against independent draws from torch's own generator: the same distribution
    reference = torch.randn(flat.size, generator=torch.Generator().manual_seed(0)).double().numpy()
    assert stats.ks_2samp(flat, reference).pvalue > 1e-3
    # no correlation between samples, between neighbouring elements, or between steps
    per_sample = z.flatten(1).double()
    corr = torch.corrcoef(per_sample)[~torch.eye(256, dtype=bool)]
    bound = 5 / np.sqrt(per_sample.shape[1])
    assert corr.abs().max() < bound
    assert abs(np.corrcoef(flat[:-1], flat[1:])[0, 1]) < 4 / np.sqrt(flat.size)
    next_step = rng.normal(0, 124, rng.STREAM_NOISE, torch.arange(256), (3, 16, 16)).flatten().double()
    assert abs(np.corrcoef(flat, next_step.numpy())[0, 1]) < 4 / np.sqrt(flat.size)
    other_stream = rng.normal(0, 123, rng.STREAM_TIMESTEP, torch.arange(256), (3, 16, 16))
    assert abs(np.corrcoef(flat, other_stream.flatten().double().numpy())[0, 1]) < 4 / np.sqrt(flat.size)


def test_timesteps_and_dropout_are_uniform():
    n, T = 200_000, 1000
    t = rng.randint(1, 9, rng.STREAM_TIMESTEP, torch.arange(n), T)
    assert t.min() >= 0 and t.max() < T
    counts = torch.bincount(t, minlength=T).numpy()
    assert stats.chisquare(counts).pvalue > 1e-3
    u = rng.uniform(1, 9, rng.STREAM_DROPOUT, torch.arange(n)).double().numpy()
    assert 0 <= u.min() and u.max() < 1
    assert stats.kstest(u, "uniform").pvalue > 1e-3
    with pytest.raises(ValueError, match="high"):
        rng.randint(1, 9, rng.STREAM_TIMESTEP, torch.arange(3), 0)


def test_values_depend_only_on_seed_step_and_sample():
    whole = rng.normal(7, 3, rng.STREAM_NOISE, torch.arange(8), (1, 5, 5))
    halves = torch.cat([rng.normal(7, 3, rng.STREAM_NOISE, torch.arange(4), (1, 5, 5)),
                        rng.normal(7, 3, rng.STREAM_NOISE, torch.arange(4, 8), (1, 5, 5))])
    assert torch.equal(whole, halves)
    shuffled = rng.normal(7, 3, rng.STREAM_NOISE, torch.tensor([6, 1]), (1, 5, 5))
    assert torch.equal(shuffled, whole[[6, 1]])
    assert not torch.equal(whole, rng.normal(8, 3, rng.STREAM_NOISE, torch.arange(8), (1, 5, 5)))


def _plan(world: int, rank: int, batch: int, accum: int) -> BatchPlan:
    cfg = load_config(None, ["data.source=digits", "data.resolution=8", f"data.prepared_dir={digits_dir()}",
                             "model.preset=tiny", f"train.batch_size={batch}", f"train.grad_accum={accum}"])
    return BatchPlan(load_dataset(cfg.data), cfg, DistContext(rank, world), torch.device("cpu"), 10)


def test_each_rank_computes_only_its_samples_and_they_match_one_rank():
    one = _plan(1, 0, 8, 1).micro_batches(123)[0]            # 1 x 8
    ranks = [_plan(2, r, 4, 1).micro_batches(123)[0] for r in (0, 1)]   # 2 x 4
    accum = _plan(1, 0, 4, 2).micro_batches(123)             # 4 x 2 accumulation
    for parts in (ranks, accum):
        assert all(p.noise.shape[0] == 4 for p in parts)
        for field in ("x0", "t", "noise", "labels"):
            assert torch.equal(getattr(one, field), torch.cat([getattr(p, field) for p in parts])), field
