"""Counter-based random numbers: the noise, timestep and label dropout of global sample ``i`` at
training step ``k`` are pure functions of ``(seed, k, i)``.

Each value is SplitMix64's output function (Steele, Lea & Flood 2014; Vigna's ``splitmix64.c``)
applied to a counter, computed with int64 tensor ops (wrapping multiplication, masked shifts), so
it runs vectorised on any device and gives the same bits on CPU and CUDA. A rank computes only
its own samples: the cost is O(local batch), and the values do not depend on the number of
ranks, the micro-batching or the device they were computed on (the Gaussians go through float32
``log``/``cos``, whose last bit may differ between devices).

Layout: ``key(seed, k, stream)`` is a scalar hashed from its parts; sample ``i`` of that stream
has the key ``mix(key + (i + 1) * GOLDEN)``, and its ``j``-th 64-bit word is
``mix(sample_key + (j + 1) * GOLDEN)``, i.e. the ``j``-th output of a SplitMix64 generator
seeded with the sample key.
"""

from __future__ import annotations

import math

import torch

MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15          # SplitMix64's increment (2^64 / golden ratio, odd)
_M1, _M2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB

STREAM_NOISE, STREAM_TIMESTEP, STREAM_DROPOUT = 1, 2, 3


def _signed(x: int) -> int:
    """A 64-bit unsigned value as the int64 with the same bits."""
    x &= MASK64
    return x - (1 << 64) if x >= 1 << 63 else x


def mix_int(z: int) -> int:
    """SplitMix64's output function on a Python int (the reference the tensor version matches)."""
    z &= MASK64
    z = ((z ^ (z >> 30)) * _M1) & MASK64
    z = ((z ^ (z >> 27)) * _M2) & MASK64
    return z ^ (z >> 31)


def _shr(z: torch.Tensor, bits: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's ``>>`` is arithmetic)."""
    out = torch.bitwise_right_shift(z, bits, out=out) if out is not None else z >> bits
    return out.bitwise_and_((1 << (64 - bits)) - 1)


def mix_(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's output function on an int64 tensor, element-wise and in place (wrapping
    arithmetic; one scratch buffer, so that large batches do not churn the allocator)."""
    scratch = torch.empty_like(z)
    z.bitwise_xor_(_shr(z, 30, scratch)).mul_(_signed(_M1))
    z.bitwise_xor_(_shr(z, 27, scratch)).mul_(_signed(_M2))
    return z.bitwise_xor_(_shr(z, 31, scratch))


def mix(z: torch.Tensor) -> torch.Tensor:
    """:func:`mix_` on a copy."""
    return mix_(z.clone())


def stream_key(seed: int, step: int, stream: int) -> int:
    """The scalar key of one (seed, step, stream), hashed part by part."""
    key = 0
    for part in (seed, step, stream):
        key = mix_int(key + (part & MASK64) * GOLDEN + GOLDEN)
    return key


def sample_words(seed: int, step: int, stream: int, samples: torch.Tensor, words: int) -> torch.Tensor:
    """(b, words) int64: 64 random bits per word for each sample index in ``samples`` (on its
    device)."""
    key = stream_key(seed, step, stream)
    per_sample = mix_(samples.to(torch.int64) * _signed(GOLDEN) + _signed(key + GOLDEN))
    j = torch.arange(1, words + 1, dtype=torch.int64, device=samples.device) * _signed(GOLDEN)
    return mix_(per_sample[:, None] + j[None, :])


def _unit24(bits: torch.Tensor) -> torch.Tensor:
    """The top 24 bits of each word as float32 in [0, 1) (exact: k / 2^24)."""
    return _shr(bits, 40).to(torch.float32) * (1.0 / (1 << 24))


def uniform(seed: int, step: int, stream: int, samples: torch.Tensor) -> torch.Tensor:
    """(b,) float32 uniform on [0, 1) in steps of 2^-24."""
    return _unit24(sample_words(seed, step, stream, samples, 1)[:, 0])


def randint(seed: int, step: int, stream: int, samples: torch.Tensor, high: int) -> torch.Tensor:
    """(b,) int64 uniform on {0, ..., high - 1} (the top 32 bits scaled: bias < high / 2^32)."""
    if not 0 < high < 1 << 31:
        raise ValueError(f"high = {high}: expected 1 <= high < 2^31")
    top = _shr(sample_words(seed, step, stream, samples, 1)[:, 0], 32)
    return _shr(top * high, 32)


def normal(seed: int, step: int, stream: int, samples: torch.Tensor, shape: tuple[int, ...]
           ) -> torch.Tensor:
    """(b, *shape) float32 standard normal: Box-Muller on two 24-bit uniforms per 64-bit word,
    one word per pair of values (|z| <= 5.77, the 2^-24 resolution of u1)."""
    n = math.prod(shape)
    bits = sample_words(seed, step, stream, samples, (n + 1) // 2)
    scratch = torch.empty_like(bits)
    u1 = _shr(bits, 40, scratch).add_(1).to(torch.float32).mul_(1.0 / (1 << 24))        # (0, 1]
    u2 = _shr(bits, 8, scratch).bitwise_and_(0xFFFFFF).to(torch.float32).mul_(1.0 / (1 << 24))  # [0, 1)
    del bits, scratch
    radius = u1.log_().mul_(-2.0).sqrt_()
    angle = u2.mul_(2.0 * math.pi)
    z = torch.empty((*radius.shape, 2), dtype=torch.float32, device=radius.device)
    torch.mul(radius, torch.cos(angle), out=z[..., 0])
    torch.mul(radius, angle.sin_(), out=z[..., 1])
    return z.flatten(1)[:, :n].reshape(samples.shape[0], *shape)
