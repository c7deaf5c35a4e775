"""The U-Net: the DDPM CIFAR-10 size, conditioning, attention against a hand-written reference."""

import math

import pytest
import torch
import torch.nn.functional as F

from diffusion.config import ModelConfig, config_from_dict
from diffusion.unet import AttentionBlock, UNet, count_parameters, norm_groups, timestep_embedding


def _cfg(**model):
    return config_from_dict({"model": model, "data": {"resolution": 16}}).model


def test_ddpm_cifar10_preset_has_the_papers_size():
    cfg = config_from_dict({"model": {"preset": "ddpm_cifar10"},
                            "data": {"resolution": 32, "channels": 3}}).model
    n = count_parameters(UNet(cfg, 3, 32))
    assert n == 35_746_307     # Ho et al. 2020: 35.7 M; google/ddpm-cifar10-32 has exactly this


def test_ddpm_cifar10_matches_diffusers_parameter_count():
    # A second, independent implementation of the same architecture.
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
        layers_per_block=2, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_num_groups=32,
        attention_head_dim=None, flip_sin_to_cos=False, freq_shift=1)
    cfg = config_from_dict({"model": {"preset": "ddpm_cifar10"},
                            "data": {"resolution": 32, "channels": 3}}).model
    assert count_parameters(UNet(cfg, 3, 32)) == sum(p.numel() for p in ref.parameters())


def test_shapes_and_zero_initialised_output():
    net = UNet(_cfg(base_channels=16, channel_mult=(1, 2, 2), attention_resolutions=(8,)), 3, 16)
    x = torch.randn(2, 3, 16, 16)
    out = net(x, torch.tensor([0, 999]))
    assert out.shape == x.shape
    assert torch.all(out == 0)          # the last conv starts at zero (improved-diffusion init)


def test_class_conditioning_and_null_class():
    torch.manual_seed(0)
    net = UNet(_cfg(base_channels=16, channel_mult=(1, 2), num_classes=3, attention_resolutions=()), 1, 16)
    for p in net.parameters():          # leave the zero init, so the embedding reaches the output
        torch.nn.init.normal_(p, std=0.05)
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([5, 5])
    a = net(x, t, torch.tensor([0, 0]))
    b = net(x, t, torch.tensor([1, 1]))
    null = net(x, t, torch.tensor([3, 3]))
    assert not torch.allclose(a, b)
    assert torch.allclose(net(x, t), null)     # no labels = the null class
    assert net.null_class == 3


def test_attention_matches_reference_softmax():
    torch.manual_seed(0)
    block = AttentionBlock(8, num_heads=2)
    torch.nn.init.normal_(block.proj.weight)
    x = torch.randn(2, 8, 4, 4)
    h = block.norm(x)
    q, k, v = block.qkv(h).chunk(3, dim=1)                              # (B, C, H, W) each
    def heads(z):                                                       # (B, 2, HW, 4)
        return z.reshape(2, 2, 4, 16).transpose(-1, -2)
    w = torch.softmax(heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(4), dim=-1)
    ref = (w @ heads(v)).transpose(-1, -2).reshape(2, 8, 4, 4)
    assert torch.allclose(block(x), x + block.proj(ref), atol=1e-5)


def test_timestep_embedding_closed_form():
    t = torch.tensor([0, 1, 250])
    emb = timestep_embedding(t, 8)
    half = 4
    freqs = [math.exp(-math.log(10000) * i / (half - 1)) for i in range(half)]
    for row, tv in enumerate(t.tolist()):
        ref = [math.sin(tv * f) for f in freqs] + [math.cos(tv * f) for f in freqs]
        assert emb[row].tolist() == pytest.approx(ref, abs=1e-5)
    assert timestep_embedding(t, 7).shape == (3, 7)


def test_dropout_is_active_in_training_only():
    net = UNet(ModelConfig(base_channels=16, channel_mult=(1, 2), attention_resolutions=(),
                           dropout=0.5), 1, 8)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x, t = torch.randn(1, 1, 8, 8), torch.tensor([3])
    net.eval()
    assert torch.equal(net(x, t), net(x, t))
    net.train()
    assert not torch.equal(net(x, t), net(x, t))
    assert F.silu is not None


def test_norm_groups_keep_the_embedding_shift():
    # DDPM's widths keep Ho et al.'s 32 groups; narrow layers keep >= 4 channels per group.
    assert [norm_groups(c) for c in (128, 256, 384, 512)] == [32, 32, 32, 32]
    assert [norm_groups(c) for c in (16, 32, 48, 96, 3)] == [4, 8, 12, 24, 1]
