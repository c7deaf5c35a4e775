"""Named U-Net sizes. ``model.preset`` in params.yaml starts from one; keys given beside it win."""

from __future__ import annotations

from typing import Any

MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # Whatever the model section says, from the ModelConfig defaults.
    "custom": {},
    # Tests and smoke runs: a few hundred thousand parameters.
    "tiny": dict(base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                 attention_resolutions=(), num_heads=1, dropout=0.0),
    # CPU default for the packaged 28x28 MNIST digits (28 -> 14 -> 7).
    "mnist_small": dict(base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2,
                        attention_resolutions=(7,), num_heads=1, dropout=0.0),
    # Tuned CPU default for 28x28 digits (bench/bench_quality.py, issue 9): narrow and shallow,
    # widening with depth (28 -> 14 -> 7 at 16/32/64 channels), attention only at 7x7: 0.69 M
    # parameters, ~4x the training images per second of mnist_small for more quality per minute.
    "mnist_fast": dict(base_channels=16, channel_mult=(1, 2, 4), num_res_blocks=1,
                       attention_resolutions=(7,), num_heads=1, dropout=0.0),
    # CPU-sized colour images (32x32 or 64x64 RGB, e.g. a folder of class subfolders): four
    # levels at 32/64/64/64 channels, attention at 8x8 only; 1.5 M parameters. For a GPU, start
    # from ddpm_cifar10.
    "rgb_small": dict(base_channels=32, channel_mult=(1, 2, 2, 2), num_res_blocks=1,
                      attention_resolutions=(8,), num_heads=1, dropout=0.0),
    # Ho et al. 2020, CIFAR-10 32x32: ch=128, ch_mult=(1,2,2,2), 2 res blocks, attention at 16x16,
    # dropout 0.1 -> 35.7 M parameters (Table/Appendix B of the paper).
    "ddpm_cifar10": dict(base_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2,
                         attention_resolutions=(16,), num_heads=1, dropout=0.1),
}
