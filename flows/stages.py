"""DVC stage entry points: ``python -m flows.stages <stage> [section.key=value ...]`` with
stage one of prepare, validate, extractor, train, evaluate.

Each reads its own section of ``params.yaml``, calls one library function and prints a JSON
summary. The Prefect flow calls the same functions.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from diffusion.checkpoint import CheckpointError
from diffusion.config import Config, ConfigError, load_config
from diffusion.data import load_dataset, load_prepared
from diffusion.evaluate import evaluate
from diffusion.features import (FeatureExtractor, load_domain_extractor, load_inception,
                                save_classifier, train_classifier)
from diffusion.prepare import DataError, PrepareResult, dataset_version, prepare_from_config
from diffusion.trainer import NonFiniteLossError, TrainResult, train
from diffusion.validate import ValidationFailed, ValidationReport, validate_dataset

STAGES = ("prepare", "validate", "extractor", "train", "evaluate")


def prepare_stage(cfg: Config) -> PrepareResult:
    d = cfg.data
    if d.source == "s3":
        from flows.s3 import s3_records
        return prepare_from_config(d, s3_records(d.path, workers=d.s3_workers))
    return prepare_from_config(d)


def validate_stage(cfg: Config) -> ValidationReport:
    d = cfg.data
    return validate_dataset(d.prepared_dir, d.validation_dir, min_pixel_std=d.min_pixel_std)


def extractor_stage(cfg: Config, progress: bool = True) -> dict:
    """Train the domain classifier on the training split (a no-op for the Inception extractor)."""
    x = cfg.extractor
    if x.kind == "inception":
        return {"extractor": "inception", "sha256": load_inception(x.path).sha256}
    train_set = load_prepared(cfg.data.prepared_dir, "train")
    heldout = load_prepared(cfg.data.prepared_dir, "heldout")
    model, acc = train_classifier(train_set, heldout, epochs=x.epochs, batch_size=x.batch_size,
                                  lr=x.lr, seed=x.seed, progress=progress)
    if acc < x.min_accuracy:
        raise DataError(f"extractor.min_accuracy = {x.min_accuracy}: the domain classifier reached "
                        f"only {acc:.4f} held-out accuracy; raise extractor.epochs")
    info = {"heldout_accuracy": acc, "dataset_version": dataset_version(cfg.data.prepared_dir)}
    sha = save_classifier(model, x.path, info)
    return {"extractor": "domain", "path": x.path, "sha256": sha, **info}


def load_extractor(cfg: Config) -> FeatureExtractor:
    x = cfg.extractor
    return load_domain_extractor(x.path) if x.kind == "domain" else load_inception(x.path)


def train_stage(cfg: Config, progress: bool = True) -> TrainResult:
    return train(cfg, load_dataset(cfg.data), progress=progress)


def evaluate_stage(cfg: Config, progress: bool = True) -> dict:
    from pathlib import Path
    return evaluate(Path(cfg.train.out_dir) / "checkpoint.pt", cfg, load_extractor(cfg),
                    progress=progress)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.stages", description=__doc__)
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.params, args.overrides)
        if args.stage == "prepare":
            r = prepare_stage(cfg)
            print(json.dumps({"prepared": str(r.out_dir), "counts": r.counts, "classes": r.classes,
                              "rejects": r.rejects, "dataset_version": r.version}, indent=2))
        elif args.stage == "validate":
            report = validate_stage(cfg)
            print(json.dumps({"validated": report.dataset, "rows": report.rows, "ok": report.ok}))
        elif args.stage == "extractor":
            print(json.dumps(extractor_stage(cfg), indent=2))
        elif args.stage == "train":
            r = train_stage(cfg)
            print(json.dumps({"step": r.step, "checkpoint": str(r.checkpoint),
                              "final": r.history[-1] if r.history else None}, indent=2))
        else:
            print(json.dumps(evaluate_stage(cfg), indent=2))
    except (ConfigError, DataError, ValidationFailed, CheckpointError, NonFiniteLossError) as exc:
        print(f"error: {args.stage} stage: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
