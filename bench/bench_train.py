"""Training throughput and peak memory: this library's train_step versus diffusers' UNet2DModel +
DDPMScheduler step at matched architecture, resolution and batch (diffusers is bench-only).

Throughput: both implementations live in one process and take training steps in alternation, so
the machine's drift (a shared 2-core VM varies by +-10 % over minutes) hits both alike; the median
step time gives img/s. Peak memory (RSS on CPU, allocator peak on CUDA) comes from a separate
process per implementation, so that it belongs to that configuration alone.

    python bench/bench_train.py                         # CPU: small preset and CIFAR-10 preset
    python bench/bench_train.py --device cuda --precision bf16 --only cifar10 --batch 128

Efficiency: FLOPs per image are counted on our network (``torch.utils.flop_counter``, forward +
backward); MFU = img/s x that / the device's data-sheet peak (``diffusion.throughput``), and
``mfu_vs_matmul`` divides by the matrix-product rate measured in the same process instead.
With ``--compile`` the first step's extra time is reported as ``compile_seconds``.
``--cuda-jsonl FILE`` appends the GPU session's record (``{"what": "train", ...}``).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffusion.config import config_from_dict  # noqa: E402

PRESETS = {   # name: (config overrides, channels, resolution, default CPU batch)
    "small": ({"model": {"preset": "mnist_small"}, "data": {"resolution": 28}}, 1, 28, 64),
    "cifar10": ({"model": {"preset": "ddpm_cifar10"}, "data": {"resolution": 32, "channels": 3}}, 3, 32, 16),
}


def _diffusers_model(cfg, channels: int, resolution: int):
    from diffusers import UNet2DModel
    m = cfg.model
    sizes = [resolution // 2**i for i in range(len(m.channel_mult))]
    attn = [s in m.attention_resolutions for s in sizes]
    return UNet2DModel(
        sample_size=resolution, in_channels=channels, out_channels=channels,
        block_out_channels=tuple(m.base_channels * k for k in m.channel_mult),
        layers_per_block=m.num_res_blocks, norm_num_groups=min(32, m.base_channels),
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        attention_head_dim=None, dropout=m.dropout)


OPTIMIZER = {"value": "default"}     # --optimizer: the library's choice, or foreach / fused to compare


def _ours_step(cfg, channels, resolution, batch, device):
    from diffusion.losses import DiffusionLoss
    from diffusion.schedule import NoiseSchedule
    from diffusion.throughput import use_persistent_inductor_cache
    from diffusion.trainer import MicroBatch, build_state, train_step
    state = build_state(cfg, device, 10)
    if OPTIMIZER["value"] != "default":
        t = cfg.train
        state.optimizer = torch.optim.AdamW(state.model.parameters(), lr=t.lr, betas=(t.adam_beta1, t.adam_beta2),
                                            weight_decay=t.weight_decay, fused=OPTIMIZER["value"] == "fused",
                                            foreach=OPTIMIZER["value"] == "foreach" or None)
    if cfg.train.compile:
        use_persistent_inductor_cache()
    net = torch.compile(state.model) if cfg.train.compile else state.model
    loss_fn = DiffusionLoss(NoiseSchedule.create("linear", 1000).to(device), "eps")
    x0 = torch.rand(batch, channels, resolution, resolution, device=device) * 2 - 1

    def step():
        mb = MicroBatch(x0, None, torch.randint(0, 1000, (batch,), device=device),
                        torch.randn_like(x0), torch.ones(batch, device=device))
        return train_step(state, net, loss_fn, [mb], cfg, device)["loss"]
    return step, sum(p.numel() for p in state.model.parameters())


def _diffusers_step(cfg, channels, resolution, batch, device):
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel
    model = _diffusers_model(cfg, channels, resolution).to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = torch.compile(model) if cfg.train.compile else model
    sched = DDPMScheduler(num_train_timesteps=1000)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    ema = EMAModel(model.parameters(), decay=cfg.train.ema_decay)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.precision == "fp16")
    x0 = torch.rand(batch, channels, resolution, resolution, device=device) * 2 - 1

    def step():
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (batch,), device=device)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            pred = net(sched.add_noise(x0, noise, t), t).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        ema.step(model.parameters())
        return loss.detach()
    return step, sum(p.numel() for p in model.parameters())


def _config(args: argparse.Namespace):
    overrides, channels, resolution, default_batch = PRESETS[args.preset]
    overrides = {**overrides, "train": {"precision": args.precision, "channels_last": args.channels_last,
                                        "compile": args.compile, "lr": 1e-4}}
    return config_from_dict(overrides), channels, resolution, args.batch or default_batch


def paired_throughput(args: argparse.Namespace) -> dict:
    """Both implementations in one process, one step of each in alternation (order flipped every
    pair), so that drift in the machine's speed hits both alike; median step time -> img/s."""
    cfg, channels, resolution, batch = _config(args)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    steps, params, first = {}, {}, {}
    for impl, make in (("ours", _ours_step), ("diffusers", _diffusers_step)):
        torch.manual_seed(0)
        steps[impl], params[impl] = make(cfg, channels, resolution, batch, device)
        for k in range(args.warmup):
            sync()
            t0 = time.perf_counter()
            steps[impl]()
            sync()
            if k == 0:
                first[impl] = time.perf_counter() - t0
    times: dict[str, list[float]] = {"ours": [], "diffusers": []}
    start = time.perf_counter()
    i = 0
    while i < args.min_steps or time.perf_counter() - start < 2 * args.seconds:
        order = ("ours", "diffusers") if i % 2 == 0 else ("diffusers", "ours")
        for impl in order:
            sync()
            t0 = time.perf_counter()
            steps[impl]()
            sync()
            times[impl].append(time.perf_counter() - t0)
        i += 1
    out = {impl: {"img_per_s": batch / statistics.median(ts), "steps": len(ts), "params": params[impl],
                  "first_step_seconds": first.get(impl, 0.0),
                  "compile_seconds": max(0.0, first.get(impl, 0.0) - statistics.median(ts))
                  if cfg.train.compile else None}
           for impl, ts in times.items()}
    out["ours"].update(_efficiency(cfg, channels, resolution, device, out["ours"]["img_per_s"]))
    return out


def _efficiency(cfg, channels, resolution, device, img_per_s: float) -> dict:
    """Counted FLOPs per image of our network, achieved TFLOP/s, MFU (data sheet) and the same
    against a matrix product measured here."""
    from diffusion.losses import DiffusionLoss
    from diffusion.schedule import NoiseSchedule
    from diffusion.throughput import measured_matmul_flops, peak_flops, train_flops_per_image
    from diffusion.unet import UNet
    model = UNet(cfg.model, channels, resolution).to(device)
    loss_fn = DiffusionLoss(NoiseSchedule.create("linear", 1000).to(device), "eps")
    flops = train_flops_per_image(model, loss_fn, (channels, resolution, resolution), 1000, None, device)
    achieved = img_per_s * flops
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision, torch.float32)
    peak = peak_flops(device, cfg.train.precision)
    matmul = measured_matmul_flops(device, dtype)
    return {"flops_per_image": flops, "tflops": achieved / 1e12,
            "mfu": achieved / peak if peak else None, "peak_tflops": peak / 1e12 if peak else None,
            "matmul_tflops": matmul / 1e12, "mfu_vs_matmul": achieved / matmul}


def peak_memory(args: argparse.Namespace) -> float:
    """Peak memory of a few training steps of one implementation (MiB): RSS on CPU, allocator
    peak on CUDA."""
    cfg, channels, resolution, batch = _config(args)
    device = torch.device(args.device)
    make = _ours_step if args.impl == "ours" else _diffusers_step
    step, _ = make(cfg, channels, resolution, batch, device)
    for _ in range(3):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(args: argparse.Namespace, *extra: str) -> dict:
    cmd = [sys.executable, __file__, "--child", "--preset", args.preset, "--device", args.device,
           "--precision", args.precision, "--seconds", str(args.seconds), "--min-steps",
           str(args.min_steps), "--warmup", str(args.warmup), *extra]
    cmd += ["--channels-last"] * args.channels_last + ["--compile"] * args.compile
    cmd += ["--optimizer", args.optimizer]
    cmd += ["--batch", str(args.batch)] if args.batch else []
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"benchmark child failed: {' '.join(cmd)}\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=tuple(PRESETS), help="one preset (default: all)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile both networks")
    p.add_argument("--batch", type=int, help="batch size (default: per preset)")
    p.add_argument("--seconds", type=float, default=30.0, help="timed seconds per implementation")
    p.add_argument("--min-steps", type=int, default=6, help="at least this many steps of each")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--optimizer", default="default", choices=("default", "fused", "foreach"),
                   help="our AdamW: the library's choice (fused on CUDA), or force one to compare")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory children")
    p.add_argument("--json", type=Path, help="append results as JSON lines to this file")
    p.add_argument("--cuda-jsonl", type=Path, help="append the GPU session's record to this file")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--preset", help=argparse.SUPPRESS)
    p.add_argument("--impl", choices=("ours", "diffusers"), help=argparse.SUPPRESS)
    args = p.parse_args()
    OPTIMIZER["value"] = args.optimizer
    if args.child:
        print(json.dumps(peak_memory(args) if args.impl else paired_throughput(args)))
        return
    rows = []
    for preset in ([args.only] if args.only else list(PRESETS)):
        args.preset = preset
        speed = _child(args)
        _, _, resolution, default_batch = PRESETS[preset]
        for impl in ("ours", "diffusers"):
            rows.append({"impl": impl, "preset": preset, "batch": args.batch or default_batch,
                         "resolution": resolution, "device": args.device, "precision": args.precision,
                         "channels_last": args.channels_last, "compile": args.compile,
                         "optimizer": args.optimizer, **speed[impl],
                         "peak_mib": None if args.no_memory else _child(args, "--impl", impl)})
        ratio = speed["ours"]["img_per_s"] / speed["diffusers"]["img_per_s"]
        ours = speed["ours"]
        print(f"{preset}: ours/diffusers img/s ratio = {ratio:.2f} ({args.precision}); "
              f"{ours['tflops']:.1f} TFLOP/s" + (f", MFU {ours['mfu']:.1%}" if ours["mfu"] else "")
              + f", {ours['mfu_vs_matmul']:.1%} of a measured matmul")
        if args.cuda_jsonl:
            record = {"what": "train", "preset": {"cifar10": "ddpm_cifar10", "small": "mnist_small"}[preset],
                      "precision": args.precision, "batch": args.batch or default_batch,
                      "compiled": args.compile, "channels_last": args.channels_last,
                      "optimizer": args.optimizer, "img_per_s": ours["img_per_s"], "mfu": ours["mfu"],
                      "mfu_vs_matmul": ours["mfu_vs_matmul"], "tflops": ours["tflops"],
                      "flops_per_image": ours["flops_per_image"], "compile_seconds": ours["compile_seconds"],
                      "ratio_vs_diffusers": ratio, "diffusers_img_per_s": speed["diffusers"]["img_per_s"],
                      "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
                      "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
            with args.cuda_jsonl.open("a") as f:
                f.write(json.dumps(record) + "\n")
    host = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    if args.device == "cuda":
        host = torch.cuda.get_device_name() + ", torch " + torch.__version__
    print(f"machine: {host}")
    print("| impl | preset | params | batch | res | precision | compile | img/s | peak MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['impl']} | {r['preset']} | {r['params'] / 1e6:.2f} M | {r['batch']} | "
              f"{r['resolution']} | {r['precision']}{' +CL' if r['channels_last'] else ''} | "
              f"{r['compile']} | {r['img_per_s']:.1f} | "
              f"{'-' if r['peak_mib'] is None else format(r['peak_mib'], '.0f')} |")
    if args.json:
        with args.json.open("a") as f:
            for r in rows:
                f.write(json.dumps({**r, "host": host, "date": time.strftime("%Y-%m-%d")}) + "\n")


if __name__ == "__main__":
    main()
