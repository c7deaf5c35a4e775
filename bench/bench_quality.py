"""Time to quality on the packaged MNIST digits (issue 9): train for a wall-clock budget, generate
1,000 class-cycled samples, and score them with the domain classifier (share recognised with
confidence >= 0.9, class-histogram entropy / log 10, label agreement) and FID against the
training split relative to the real-vs-real floor.

Every run trains in this process with 2 intra-op threads on the global batch of params.yaml
(train.batch_size x ray.num_workers), so variants differ only in the overrides they name.

    python bench/bench_quality.py ablation --minutes 2          # one row per choice (table)
    python bench/bench_quality.py curve --minutes 2 4 8 16 --diffusers-at 8   # vs budget + diffusers
    python bench/bench_quality.py diffusers --minutes 8         # the plain diffusers loop alone
    python bench/bench_quality.py sampling RUN_DIR              # DDIM-N vs DDPM-1000, guidance
    python bench/bench_quality.py report                        # tables + PNG from the JSONL
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffusion.config import load_config  # noqa: E402
from diffusion.data import load_prepared, to_uint8  # noqa: E402
from diffusion.evaluate import extract, fid_against, reference_stats  # noqa: E402
from diffusion.features import load_domain_extractor, save_classifier, train_classifier  # noqa: E402
from diffusion.hardware import cpu_description  # noqa: E402
from diffusion.prepare import dataset_version, prepare_from_config  # noqa: E402
from diffusion.quality import classifier_quality  # noqa: E402
from diffusion.sampling import (load_generator, resolve_sampling_memory_format,  # noqa: E402
                                resolve_sampling_precision, sample)
from diffusion.trainer import train  # noqa: E402

RESULTS = ROOT / "bench" / "results_quality_cpu.jsonl"
WORK = ROOT / "runs" / "bench-quality"

# One change each against params.yaml (the tuned default). Names are the table's rows.
ABLATIONS: dict[str, list[str]] = {
    "default (params.yaml)": [],
    "model: previous mnist_small (32ch, 2 blocks)": ["model.preset=mnist_small"],
    "model: 16ch x (1,2,4), 2 blocks": ["model.num_res_blocks=2"],
    "model: 32ch x (1,2,4), 1 block": ["model.base_channels=32"],
    "precision: fp32": ["train.precision=fp32"],
    "memory: channels_last": ["train.channels_last=true"],
    "schedule: linear": ["diffusion.schedule=linear"],
    "target: eps": ["diffusion.target=eps"],
    "loss: min-SNR-5": ["diffusion.loss_weighting=min_snr"],
    "lr: half": ["train.lr=HALF"],
    "lr: double": ["train.lr=DOUBLE"],
    "batch: double": ["train.batch_size=DOUBLE"],
    "EMA decay 0.9999": ["train.ema_decay=0.9999"],
}


def machine() -> dict:
    return {"cpu": cpu_description(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "date": datetime.date.today().isoformat()}


def setup(work: Path):
    """Prepared MNIST + a 12-epoch domain classifier (98.6 % held-out) under ``work``."""
    cfg = load_config(ROOT / "params.yaml", [f"data.prepared_dir={work / 'prepared'}"])
    if not (work / "prepared" / "manifest.csv").exists():
        prepare_from_config(cfg.data)
    path = work / "extractor.pt"
    if not path.exists():
        model, acc = train_classifier(load_prepared(work / "prepared", "train"),
                                      load_prepared(work / "prepared", "heldout"), epochs=12,
                                      progress=False)
        save_classifier(model, path, {"heldout_accuracy": acc})
    return load_domain_extractor(path)


def resolve(overrides: list[str], cfg_train) -> list[str]:
    out = []
    for o in overrides:
        key, value = o.split("=", 1)
        base = {"train.lr": cfg_train.lr, "train.batch_size": cfg_train.batch_size}.get(key)
        if value in ("HALF", "DOUBLE"):
            v = base / 2 if value == "HALF" else base * 2
            value = str(int(v)) if isinstance(base, int) else repr(v)
        out.append(f"{key}={value}")
    return out


def config(work: Path, overrides: list[str], minutes: float, run: str):
    base = load_config(ROOT / "params.yaml")
    workers = base.ray.num_workers if base.ray.num_workers != "auto" else 2   # auto on CPUs: 2
    global_batch = base.train.batch_size * workers         # what the Ray default trains on
    fixed = [f"data.prepared_dir={work / 'prepared'}", f"train.batch_size={global_batch}",
             "train.steps=100000000", f"train.budget_minutes={minutes}", "train.log_every=100",
             "train.checkpoint_every=100000000", f"train.out_dir={work / 'runs' / run}", "train.device=cpu"]
    probe = load_config(ROOT / "params.yaml", fixed)
    return load_config(ROOT / "params.yaml", fixed + resolve(overrides, probe.train))


def score(images: torch.Tensor, labels: torch.Tensor | None, extractor, work: Path) -> dict:
    """Classifier quality and FID (vs the training split) of uint8 images, with the floor."""
    prepared = work / "prepared"
    ref, _ = reference_stats(work / "ref", load_prepared(prepared, "train"), extractor,
                             dataset=dataset_version(prepared), split="train")
    floor = fid_against(extract(extractor, load_prepared(prepared, "heldout").images), ref, 500)["fid"]
    fid = fid_against(extract(extractor, images), ref, min(500, len(images)))
    q = classifier_quality(extractor.probabilities(images),
                           labels.numpy() if labels is not None else None)
    return {**q, "fid": fid["fid"], "kid": fid["kid"], "floor_fid": floor,
            "fid_over_floor": fid["fid"] / floor}


def generate(run_dir: Path, n: int, sampler: str, steps: int, guidance: float, precision: str,
             seed: int = 0, memory_format: str = "contiguous"
             ) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    model, schedule, cfg, _ = load_generator(run_dir / "checkpoint.pt")
    labels = torch.arange(n) % cfg.model.num_classes if cfg.model.num_classes else None
    clock = time.perf_counter()
    x = sample(model, schedule, n, channels=1, resolution=cfg.data.resolution, sampler=sampler,
               steps=steps, target=cfg.diffusion.target, seed=seed, labels=labels,
               guidance_scale=guidance if labels is not None else 1.0, batch_size=500,
               progress=False, precision=precision, memory_format=memory_format)
    return to_uint8(x), labels, time.perf_counter() - clock


def write(row: dict) -> None:
    row = {**row, "machine": machine()}
    with RESULTS.open("a") as f:
        f.write(json.dumps(row) + "\n")
    brief = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
             if k in ("kind", "name", "minutes", "steps", "images_seen", "confident_share",
                      "class_entropy_ratio", "label_agreement", "fid_over_floor", "sampling_seconds",
                      "sampler", "sample_steps", "guidance")}
    print(json.dumps(brief), flush=True)


def train_and_score(name: str, overrides: list[str], minutes: float, args, extractor, kind: str) -> Path:
    slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    run = f"{kind}-{slug}-{minutes:g}m"
    cfg = config(args.work, overrides, minutes, run)
    shutil.rmtree(cfg.train.out_dir, ignore_errors=True)
    data = load_prepared(cfg.data.prepared_dir, "train")
    result = train(cfg, data, progress=False)
    ev = cfg.evaluate
    images, labels, seconds = generate(Path(cfg.train.out_dir), args.samples, ev.sampler, ev.steps,
                                       ev.guidance_scale, ev.precision)
    params = sum(p.numel() for p in result.state.model.parameters())
    write({"kind": kind, "name": name, "overrides": overrides, "minutes": minutes,
           "steps": result.step, "stopped_by": result.stopped_by,
           "train_seconds": result.train_seconds,
           "images_seen": result.step * cfg.train.batch_size * cfg.train.grad_accum,
           "params": params, "sampler": ev.sampler, "sample_steps": ev.steps,
           "guidance": ev.guidance_scale, "sample_precision": ev.precision,
           "samples": args.samples, "sampling_seconds": seconds,
           **score(images, labels, extractor, args.work)})
    return Path(cfg.train.out_dir)


def run_diffusers(minutes: float, args, extractor) -> None:
    """The plain loop of diffusers' train_unconditional example at the issue's scale: a 1.1 M
    UNet2DModel (32, 64, 64 channels, attention at 7x7), DDPMScheduler (linear, 1000 steps),
    AdamW lr 1e-3 with 100 warm-up steps, batch 128, EMAModel (its default warm-up), fp32;
    sampling with DDIMScheduler, 50 steps."""
    from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
    from diffusers.training_utils import EMAModel
    torch.manual_seed(0)
    model = UNet2DModel(sample_size=28, in_channels=1, out_channels=1, layers_per_block=1,
                        block_out_channels=(32, 64, 64), norm_num_groups=8,
                        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"))
    ema = EMAModel(model.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=0.75)
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = load_prepared(args.work / "prepared", "train", in_memory=True).images.float() / 127.5 - 1
    g = torch.Generator().manual_seed(0)
    step, start = 0, time.perf_counter()
    while time.perf_counter() - start < minutes * 60:
        x0 = data[torch.randint(0, len(data), (128,), generator=g)]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, 1000, (128,), generator=g)
        for group in opt.param_groups:
            group["lr"] = 1e-3 * min(1.0, (step + 1) / 100)
        loss = torch.nn.functional.mse_loss(model(noise_scheduler.add_noise(x0, noise, t), t).sample, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        ema.step(model.parameters())
        step += 1
    train_seconds = time.perf_counter() - start
    ema.copy_to(model.parameters())
    model.eval()
    ddim = DDIMScheduler(num_train_timesteps=1000)
    ddim.set_timesteps(50)
    clock = time.perf_counter()
    out = []
    with torch.no_grad():
        for b in range(0, args.samples, 500):
            x = torch.randn((min(500, args.samples - b), 1, 28, 28), generator=torch.Generator().manual_seed(b))
            for t in ddim.timesteps:
                x = ddim.step(model(x, t).sample, t, x).prev_sample
            out.append(x)
    seconds = time.perf_counter() - clock
    images = to_uint8(torch.cat(out))
    write({"kind": "diffusers", "name": "diffusers UNet2DModel + DDPMScheduler (plain loop)",
           "minutes": minutes, "steps": step, "train_seconds": train_seconds,
           "images_seen": step * 128, "params": sum(p.numel() for p in model.parameters()),
           "sampler": "ddim", "sample_steps": 50, "guidance": 1.0, "sample_precision": "fp32",
           "samples": args.samples, "sampling_seconds": seconds,
           **score(images, None, extractor, args.work)})


def run_sampling(run_dir: Path, args, extractor) -> None:
    cfg = load_config(ROOT / "params.yaml")
    settings = [("ddim", s, cfg.evaluate.guidance_scale, args.samples) for s in (10, 20, 50)]
    settings += [("ddim", cfg.evaluate.steps, g, args.samples) for g in (1.0, 1.5, 2.0, 3.0)
                 if g != cfg.evaluate.guidance_scale]
    settings += [("ddim", cfg.evaluate.steps, cfg.evaluate.guidance_scale, args.samples, "fp32")]
    settings += [("ddpm", 1000, cfg.evaluate.guidance_scale, args.ddpm_samples)]
    for s in settings:
        sampler, steps, guidance, n = s[:4]
        precision = s[4] if len(s) > 4 else cfg.evaluate.precision
        images, labels, seconds = generate(run_dir, n, sampler, steps, guidance, precision)
        write({"kind": "sampling", "name": f"{sampler}-{steps} g={guidance:g} {precision}",
               "run": str(run_dir), "sampler": sampler, "sample_steps": steps,
               "guidance": guidance, "sample_precision": precision, "samples": n,
               "sampling_seconds": seconds, "seconds_per_1000": seconds * 1000 / n,
               **score(images, labels, extractor, args.work)})


def run_solvers(run_dir: Path, args, extractor) -> None:
    """Issue 17's table: every sampler and step count on one model, in one run, with the
    evaluation's own precision and memory-format choice (resolved once here, then fixed)."""
    cfg = load_config(ROOT / "params.yaml")
    g = cfg.evaluate.guidance_scale
    settings = [("ddim", s, args.samples) for s in (10, 20, 50)]
    settings += [(solver, s, args.samples) for solver in ("dpmpp_2m", "unipc") for s in (5, 6, 8, 10, 15, 20)]
    settings += [("ddpm", 1000, args.ddpm_samples)]
    if args.only:
        settings = [s for s in settings if f"{s[0]}-{s[1]}" in args.only]
    model, _, trained, _ = load_generator(run_dir / "checkpoint.pt")
    kw = dict(channels=1, resolution=trained.data.resolution, batch_size=500, guided=g != 1.0)
    precision = resolve_sampling_precision(model, cfg.evaluate.precision, **kw).precision
    fmt, _ = resolve_sampling_memory_format(model, cfg.evaluate.memory_format, precision=precision, **kw)
    for sampler, steps, n in settings:
        images, labels, seconds = generate(run_dir, n, sampler, steps, g, precision, memory_format=fmt)
        write({"kind": "solvers", "name": f"{sampler}-{steps}", "run": str(run_dir), "sampler": sampler,
               "sample_steps": steps, "guidance": g, "sample_precision": precision,
               "memory_format": fmt, "samples": n, "sampling_seconds": seconds,
               "seconds_per_1000": seconds * 1000 / n, **score(images, labels, extractor, args.work)})


def rows(kind: str, path: Path = RESULTS) -> list[dict]:
    if not path.exists():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == kind]


def report(path: Path = RESULTS) -> None:
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def line(r: dict, first: str) -> str:
        return (f"| {first} | {r['steps']} | {r['images_seen']:,} | {r['confident_share']:.3f} | "
                f"{r['class_entropy_ratio']:.3f} | {r.get('label_agreement', float('nan')):.3f} | "
                f"{r['fid_over_floor']:.1f} |")
    head = ("| {} | steps | images seen | confident ≥ 0.9 | entropy ratio | label agreement | "
            "FID / floor |\n|---|---|---|---|---|---|---|")
    ablation = rows("ablation", path)
    if ablation:
        print(head.format(f"ablation ({ablation[-1]['minutes']:g} min each)"))
        for r in ablation:
            print(line(r, r["name"]))
    curve = sorted(rows("curve") + rows("diffusers"), key=lambda r: (r["kind"], r["minutes"]))
    if curve:
        print("\n" + head.format("budget"))
        for r in curve:
            print(line(r, f"{r['kind']} {r['minutes']:g} min"))
    sampling = rows("sampling")
    if sampling:
        print("\n| sampler | samples | s per 1,000 | confident ≥ 0.9 | entropy ratio | label agreement "
              "| FID / floor |\n|---|---|---|---|---|---|---|")
        for r in sampling:
            print(f"| {r['name']} | {r['samples']} | {r['seconds_per_1000']:.0f} | "
                  f"{r['confident_share']:.3f} | {r['class_entropy_ratio']:.3f} | "
                  f"{r.get('label_agreement', float('nan')):.3f} | {r['fid_over_floor']:.1f} |")
    ours = sorted(rows("curve"), key=lambda r: r["minutes"])
    if ours:
        fig, ax = plt.subplots(1, 2, figsize=(9, 3.6))
        m = [r["minutes"] for r in ours]
        ax[0].plot(m, [r["confident_share"] for r in ours], "o-", label="this pipeline (params.yaml)")
        ax[1].plot(m, [r["fid_over_floor"] for r in ours], "o-", label="this pipeline (params.yaml)")
        for r in rows("diffusers"):
            ax[0].plot([r["minutes"]], [r["confident_share"]], "s", color="C3", label="diffusers plain loop")
            ax[1].plot([r["minutes"]], [r["fid_over_floor"]], "s", color="C3", label="diffusers plain loop")
        ax[0].axhline(0.8, ls="--", color="grey", lw=0.8)
        ax[0].set(xlabel="training budget (min, 2 CPU cores)", ylabel="share recognised (p ≥ 0.9)",
                  ylim=(0, 1), xscale="log", xticks=m, xticklabels=[f"{x:g}" for x in m])
        ax[1].set(xlabel="training budget (min, 2 CPU cores)", ylabel="FID / real-vs-real floor",
                  xscale="log", yscale="log", xticks=m, xticklabels=[f"{x:g}" for x in m])
        for a in ax:
            a.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax[0].legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        fig.savefig(ROOT / "bench" / "quality_vs_budget.png", dpi=120)
        print("\nwrote bench/quality_vs_budget.png")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["ablation", "curve", "diffusers", "sampling", "solvers", "report"])
    p.add_argument("run_dir", nargs="?", type=Path)
    p.add_argument("--minutes", type=float, nargs="+", default=[2.0])
    p.add_argument("--only", nargs="*", help="ablation rows to run (substring match); solvers: "
                                             "the settings to run, e.g. unipc-6")
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--diffusers-at", type=float, nargs="*", default=[],
                   help="curve: also train diffusers' plain loop at these budgets")
    p.add_argument("--ddpm-samples", type=int, default=200)
    p.add_argument("--work", type=Path, default=WORK)
    p.add_argument("--results", type=Path, default=RESULTS, help="report: ablation rows from this file")
    args = p.parse_args()
    if args.mode == "report":
        return report(args.results)
    torch.set_num_threads(2)
    args.work.mkdir(parents=True, exist_ok=True)
    extractor = setup(args.work)
    if args.mode == "ablation":
        for name, overrides in ABLATIONS.items():
            if not args.only or any(o in name for o in args.only):
                train_and_score(name, overrides, args.minutes[0], args, extractor, "ablation")
    elif args.mode == "curve":
        for minutes in args.minutes:
            train_and_score("default (params.yaml)", [], minutes, args, extractor, "curve")
        for minutes in args.diffusers_at:          # side by side, same process and machine state
            run_diffusers(minutes, args, extractor)
    elif args.mode == "diffusers":
        for minutes in args.minutes:
            run_diffusers(minutes, args, extractor)
    elif args.mode == "solvers":
        run_solvers(args.run_dir, args, extractor)
    else:
        run_sampling(args.run_dir, args, extractor)


if __name__ == "__main__":
    main()
