"""DDPM U-Net (Ho et al. 2020, appendix B) with optional class conditioning.

Residual blocks with GroupNorm and a projected timestep embedding, self-attention
(``scaled_dot_product_attention``) at configured resolutions, dropout, channel multipliers.
With ``num_classes > 0`` a class embedding (plus a null class, index ``num_classes``) is added to
the timestep embedding; the null class gives the unconditional prediction for classifier-free
guidance. The network knows nothing of the noise schedule.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from diffusion.config import ModelConfig


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps (B,) -> (B, dim), as in Vaswani et al. / Ho et al."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / max(half - 1, 1))
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, dim % 2))


def norm_groups(channels: int, max_groups: int = 32, min_group_size: int = 4) -> int:
    """Ho et al. use 32 groups. Narrow layers get fewer, so that every group keeps at least
    ``min_group_size`` channels: with one channel per group, GroupNorm would erase the
    per-channel shift that carries the timestep and class embedding."""
    for groups in range(min(max_groups, channels // min_group_size), 0, -1):
        if channels % groups == 0:
            return groups
    return 1


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(norm_groups(channels), channels, eps=1e-6)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = _norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, out_ch)
        self.norm2 = _norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))                      # (B, out, H, W)
        h = h + self.emb_proj(emb)[:, :, None, None]               # emb: (B, E) already SiLU'd
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    def __init__(self, channels: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = _norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, h * w)
        q, k, v = qkv.transpose(-1, -2).unbind(1)                  # each (B, heads, HW, d)
        out = F.scaled_dot_product_attention(q, k, v)             # (B, heads, HW, d)
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj(out)


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """Residual blocks of one resolution, each optionally followed by attention."""

    def __init__(self, in_chs: list[int], out_ch: int, emb_dim: int, dropout: float,
                 attention: bool, num_heads: int) -> None:
        super().__init__()
        self.res = nn.ModuleList(ResBlock(c, out_ch, emb_dim, dropout) for c in in_chs)
        self.attn = nn.ModuleList(AttentionBlock(out_ch, num_heads) if attention else nn.Identity()
                                  for _ in in_chs)


class UNet(nn.Module):
    """eps_theta(x_t, t[, y]): (B, C, H, W), (B,) int, (B,) int -> (B, C, H, W)."""

    def __init__(self, cfg: ModelConfig, in_channels: int, resolution: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.in_channels = in_channels
        self.resolution = resolution
        ch = cfg.base_channels
        emb_dim = 4 * ch
        self.time_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_emb = nn.Embedding(cfg.num_classes + 1, emb_dim) if cfg.num_classes else None
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)

        skip_chs, cur, size = [ch], ch, resolution
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        levels = len(cfg.channel_mult)
        for i, mult in enumerate(cfg.channel_mult):
            out = ch * mult
            ins = [cur] + [out] * (cfg.num_res_blocks - 1)
            self.down.append(Level(ins, out, emb_dim, cfg.dropout,
                                   size in cfg.attention_resolutions, cfg.num_heads))
            cur = out
            skip_chs += [out] * cfg.num_res_blocks
            if i < levels - 1:
                self.downsample.append(Downsample(cur))
                skip_chs.append(cur)
                size //= 2

        self.mid_res1 = ResBlock(cur, cur, emb_dim, cfg.dropout)
        self.mid_attn = AttentionBlock(cur, cfg.num_heads)
        self.mid_res2 = ResBlock(cur, cur, emb_dim, cfg.dropout)

        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i, mult in reversed(list(enumerate(cfg.channel_mult))):
            out = ch * mult
            ins = []
            for _ in range(cfg.num_res_blocks + 1):
                ins.append(cur + skip_chs.pop())
                cur = out
            self.up.append(Level(ins, out, emb_dim, cfg.dropout,
                                 size in cfg.attention_resolutions, cfg.num_heads))
            if i > 0:
                self.upsample.append(Upsample(cur))
                size *= 2

        self.norm_out = _norm(cur)
        self.conv_out = _zero(nn.Conv2d(cur, in_channels, 3, padding=1))

    @property
    def null_class(self) -> int:
        return self.cfg.num_classes

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None
                ) -> torch.Tensor:
        emb = self.time_mlp(timestep_embedding(t, self.cfg.base_channels).to(x.dtype))   # (B, E)
        if self.class_emb is not None:
            if labels is None:
                labels = torch.full_like(t, self.null_class)
            emb = emb + self.class_emb(labels)
        emb = F.silu(emb)                 # every block applies SiLU before its projection

        h = self.conv_in(x)
        skips = [h]
        for i, level in enumerate(self.down):
            for res, attn in zip(level.res, level.attn):
                h = attn(res(h, emb))
                skips.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
                skips.append(h)

        h = self.mid_res2(self.mid_attn(self.mid_res1(h, emb)), emb)

        for i, level in enumerate(self.up):
            for res, attn in zip(level.res, level.attn):
                h = attn(res(torch.cat([h, skips.pop()], dim=1), emb))
            if i < len(self.upsample):
                h = self.upsample[i](h)
        return self.conv_out(F.silu(self.norm_out(h)))


def build_unet(cfg: ModelConfig, in_channels: int, resolution: int) -> UNet:
    return UNet(cfg, in_channels, resolution)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
