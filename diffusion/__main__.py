"""Command line: ``python -m diffusion train|run|sample``. Run with ``--help`` for every option."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from diffusion.checkpoint import CheckpointError
from diffusion.config import ConfigError, load_config
from diffusion.data import load_dataset
from diffusion.grid import save_grid
from diffusion.prepare import DataError, prepare_from_config
from diffusion.sampling import SAMPLERS, load_generator, sample
from diffusion.solvers import SPACINGS
from diffusion.trainer import NonFiniteLossError, select_device, train
from diffusion.unet import count_parameters
from diffusion.validate import ValidationFailed, validate_dataset

TRAIN_EPILOG = """\
overrides:
  Any key of params.yaml can be overridden as section.key=value, checked like the file:
    python -m diffusion train train.steps=500 train.lr=1e-4 model.preset=tiny
  Sections: data, model, diffusion, train, extractor, evaluate. An unknown key or a bad value stops
  the run before anything happens, naming the key, the value and what is allowed.

resume:
  Training writes <train.out_dir>/checkpoint.pt every train.checkpoint_every steps. Running
  the same command again continues from it up to train.steps (use --no-resume to refuse).
"""


def _train(args: argparse.Namespace) -> int:
    cfg = load_config(args.params, args.overrides)
    data = load_dataset(cfg.data)
    print(f"data: {cfg.data.source}, {len(data.labels)} images of "
          f"{tuple(data.images.shape[1:])}; out_dir: {cfg.train.out_dir}", file=sys.stderr)
    result = train(cfg, data, resume=args.resume, progress=not args.quiet)
    summary = {"step": result.step, "resumed_from": result.resumed_from,
               "seconds": round(result.seconds, 1), "checkpoint": str(result.checkpoint),
               "final": result.history[-1] if result.history else None}
    print(json.dumps(summary, indent=2))
    return 0


def _run(args: argparse.Namespace) -> int:
    """The main job until the pipeline lands: prepare, validate, train (resumable), sample grid."""
    cfg = load_config(args.params, args.overrides)
    d = cfg.data
    result = prepare_from_config(d)
    print(f"prepared {d.prepared_dir}: {result.counts}, dataset version {result.version}",
          file=sys.stderr)
    validate_dataset(d.prepared_dir, d.validation_dir, min_pixel_std=d.min_pixel_std)
    _train(args)
    out_dir = Path(cfg.train.out_dir)
    grid_args = build_parser().parse_args(
        ["sample", "--checkpoint", str(out_dir / "checkpoint.pt"), "--out", str(out_dir / "samples.png")]
        + (["--quiet"] if args.quiet else []))
    return _sample(grid_args)


def _sample(args: argparse.Namespace) -> int:
    device = select_device(args.device)
    model, schedule, cfg, ckpt = load_generator(args.checkpoint, device, ema=not args.raw_weights)
    ev = cfg.evaluate
    n = args.num if args.num is not None else ev.num_samples
    labels = None
    if cfg.model.num_classes:
        labels = (torch.tensor(args.labels) if args.labels else torch.arange(n) % cfg.model.num_classes)
        if labels.numel() == 1:
            labels = labels.repeat(n)
        if labels.shape != (n,) or labels.min() < 0 or labels.max() >= cfg.model.num_classes:
            raise ConfigError(f"--labels: expected 1 or {n} class ids in [0, {cfg.model.num_classes})")
    elif args.labels:
        raise ConfigError("--labels: this model is unconditional (model.num_classes = 0)")
    steps = args.steps if args.steps is not None else ev.steps
    if not 1 <= steps <= cfg.diffusion.timesteps:
        raise ConfigError(f"--steps = {steps}: must be in [1, {cfg.diffusion.timesteps}]")
    images = sample(model, schedule, n, channels=cfg.data.channels, resolution=cfg.data.resolution,
                    sampler=args.sampler or ev.sampler, steps=steps,
                    spacing=args.spacing or ev.spacing,
                    eta=args.eta if args.eta is not None else ev.eta, target=cfg.diffusion.target,
                    seed=args.seed if args.seed is not None else ev.seed, labels=labels,
                    guidance_scale=args.guidance if args.guidance is not None else ev.guidance_scale,
                    clip_denoised=ev.clip_denoised, batch_size=ev.batch_size, device=device,
                    progress=not args.quiet)
    path = save_grid(images, args.out)
    print(json.dumps({"grid": str(path), "images": n, "step": int(ckpt["step"]),
                      "parameters": count_parameters(model)}, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m diffusion", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    for name, func, helptext in (
            ("train", _train, "train a DDPM from params.yaml (resumable)"),
            ("run", _run, "prepare and validate the data, train, then write "
                          "<train.out_dir>/samples.png (the main job)")):
        t = sub.add_parser(name, help=helptext, description=helptext, epilog=TRAIN_EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        t.add_argument("--params", type=Path, default=Path("params.yaml"),
                       help="YAML config file (default: params.yaml); see README for every key")
        t.add_argument("overrides", nargs="*", metavar="section.key=value",
                       help="config overrides, checked like the file")
        t.add_argument("--no-resume", dest="resume", action="store_false",
                       help="fail instead of continuing from an existing checkpoint in train.out_dir")
        t.add_argument("--quiet", action="store_true", help="no progress bar")
        t.set_defaults(func=func)

    s = sub.add_parser("sample", help="generate a PNG grid from a checkpoint's EMA weights",
                       description="Defaults come from the evaluate section stored in the checkpoint.")
    s.add_argument("--checkpoint", type=Path, required=True, help="checkpoint.pt written by train")
    s.add_argument("--out", type=Path, required=True, help="PNG file to write (a square grid)")
    s.add_argument("--num", type=int, help="number of images (default: evaluate.num_samples)")
    s.add_argument("--sampler", choices=SAMPLERS,
                   help="ddpm (ancestral), ddim, dpmpp_2m (DPM-Solver++ 2M) or unipc (UniPC bh2); "
                        "default: evaluate.sampler")
    s.add_argument("--steps", type=int, help="network evaluations (default: evaluate.steps)")
    s.add_argument("--spacing", choices=SPACINGS,
                   help="timesteps of dpmpp_2m / unipc (default: evaluate.spacing)")
    s.add_argument("--eta", type=float, help="DDIM eta: 0 deterministic, 1 DDPM-like noise")
    s.add_argument("--seed", type=int, help="image j uses seed+j, whatever the batch size")
    s.add_argument("--labels", type=int, nargs="+",
                   help="class ids for a conditional model: one for all images, or one per image "
                        "(default: 0,1,2,... cycling)")
    s.add_argument("--guidance", type=float,
                   help="classifier-free guidance scale (1 = conditional only, >1 stronger)")
    s.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    s.add_argument("--raw-weights", action="store_true",
                   help="use the raw trained weights instead of the EMA weights")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=_sample)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, CheckpointError, NonFiniteLossError, DataError, ValidationFailed) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
