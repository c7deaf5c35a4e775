"""DVC stage entry points: ``python -m flows.stages prepare|validate [section.key=value ...]``.

Each reads its own section of ``params.yaml``, calls one library function and prints a JSON
summary. The Prefect flow calls the same functions.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from diffusion.config import Config, ConfigError, load_config
from diffusion.prepare import DataError, PrepareResult, prepare, source_records
from diffusion.validate import ValidationFailed, ValidationReport, validate_dataset


def prepare_stage(cfg: Config) -> PrepareResult:
    d = cfg.data
    if d.source == "s3":
        from flows.s3 import s3_records
        records = s3_records(d.path, workers=d.s3_workers)
    else:
        records = source_records(d)
    return prepare(records, d.prepared_dir, resolution=d.resolution, channels=d.channels,
                   heldout_fraction=d.heldout_fraction, bad_files=d.bad_files,
                   source=f"{d.source}:{d.path}" if d.path else d.source)


def validate_stage(cfg: Config) -> ValidationReport:
    d = cfg.data
    return validate_dataset(d.prepared_dir, d.validation_dir, min_pixel_std=d.min_pixel_std)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.stages", description=__doc__)
    parser.add_argument("stage", choices=("prepare", "validate"))
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.params, args.overrides)
        if args.stage == "prepare":
            r = prepare_stage(cfg)
            print(json.dumps({"prepared": str(r.out_dir), "counts": r.counts, "classes": r.classes,
                              "rejects": r.rejects, "dataset_version": r.version}, indent=2))
        else:
            report = validate_stage(cfg)
            print(json.dumps({"validated": report.dataset, "rows": report.rows, "ok": report.ok}))
    except (ConfigError, DataError, ValidationFailed) as exc:
        print(f"error: {args.stage} stage: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
