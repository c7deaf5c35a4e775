"""FLOP counting for MFU (against closed forms), the prefetcher, the Inductor cache location."""

import threading

import pytest
import torch
from torch import nn

from diffusion.throughput import (Prefetcher, measured_matmul_flops, peak_flops, train_flops_per_image,
                                  use_persistent_inductor_cache)


def _mse(net, x0, t, noise, weights, labels):
    return ((net(x0) - noise) ** 2).mean((1, 2, 3))


@pytest.mark.parametrize("channels, size", [(3, 8), (16, 4)])
def test_training_flops_of_a_convolution_match_the_closed_form(channels, size):
    # 1x1 convolution, no bias: forward 2*C*C*H*W per image; backward only the weight gradient
    # (the input needs none): another 2*C*C*H*W
    net = nn.Conv2d(channels, channels, 1, bias=False)
    flops = train_flops_per_image(net, _mse, (channels, size, size), 10, None, torch.device("cpu"), batch=3)
    assert flops == 4 * channels * channels * size * size


def test_training_flops_of_the_unet_are_about_three_forwards():
    from diffusion.config import load_config
    from diffusion.losses import DiffusionLoss
    from diffusion.schedule import NoiseSchedule
    from diffusion.unet import UNet
    from torch.utils.flop_counter import FlopCounterMode
    cfg = load_config(None, ["model.preset=tiny", "data.resolution=8"])
    model = UNet(cfg.model, 1, 8)
    loss = DiffusionLoss(NoiseSchedule.create("cosine", 100), "eps")
    train = train_flops_per_image(model, loss, (1, 8, 8), 100, None, torch.device("cpu"))
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long))
    forward = counter.get_total_flops() / 2
    assert 2.5 * forward < train <= 3.0 * forward      # the first layer needs no input gradient


def test_peak_is_a_datasheet_figure_only_for_known_gpus_and_measured_elsewhere():
    assert peak_flops(torch.device("cpu"), "bf16") is None
    rate = measured_matmul_flops(torch.device("cpu"), torch.float32, n=128, seconds=0.05)
    assert 1e6 < rate < 1e14


def test_prefetcher_returns_what_read_returns_and_reads_ahead_on_one_thread():
    threads, calls, seven = set(), [], threading.Event()

    def read(step):
        threads.add(threading.get_ident())
        calls.append(step)
        if step == 7:
            seven.set()
        return step * step
    ahead = Prefetcher(read, enabled=True)
    try:
        assert [ahead.get(k) for k in (0, 1, 2, 5, 6)] == [0, 1, 4, 25, 36]
        assert seven.wait(10), "step 6 did not start reading step 7"
    finally:
        ahead.close()
    assert threads and threading.get_ident() not in threads and len(threads) == 1
    assert calls.count(5) == 1                            # a skipped step is read on demand, once
    off = Prefetcher(read, enabled=False)
    assert off.get(3) == 9


def test_inductor_cache_is_persistent_unless_set(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "recorded")   # so that teardown restores the original
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    monkeypatch.setenv("DDPM_CACHE_DIR", str(tmp_path))
    assert use_persistent_inductor_cache() == str(tmp_path / "inductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/elsewhere")
    assert use_persistent_inductor_cache() == "/elsewhere"
