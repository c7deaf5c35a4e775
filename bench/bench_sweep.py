"""ASHA against no early stopping at the same wall clock: the same ``sweep.space`` (params.yaml's),
the same trials and seed, ``sweep.budget_minutes`` each, on packaged MNIST with the domain
extractor; records the best quick FID found, the trials started and how each ended, one JSON line
per scheduler in bench/results_sweep_cpu.jsonl.

    python bench/bench_sweep.py [--minutes 4] [--trial-minutes 1] [--trials 8] [--checkpoint-every 10]

Only the search is timed (no full evaluation or registration). Prepares MNIST and trains the
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
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-sweep")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    work = args.work.absolute()
    shutil.rmtree(work, ignore_errors=True)
    base = [f"data.prepared_dir={work / 'prepared'}", f"data.validation_dir={work / 'validation'}",
            f"extractor.path={work / 'extractor.pt'}", f"evaluate.reference_cache={work / 'ref'}",
            f"tracking.local_dir={work / 'mlflow'}", "tracking.experiment=bench-sweep",
            f"sweep.storage_path={work / 'tune'}", f"sweep.budget_minutes={args.minutes}",
            f"sweep.trials={args.trials}", f"train.budget_minutes={args.trial_minutes}",
            f"sweep.checkpoint_every={args.checkpoint_every}", f"sweep.grace_minutes={args.grace_minutes}",
            f"sweep.quick_fid_samples={args.quick_fid_samples}", "train.log_every=5",
            "train.precision=fp32"]
    from flows.stages import extractor_stage, prepare_stage
    cfg = load_config(ROOT / "params.yaml", base)
    prepare_stage(cfg)
    extractor_stage(cfg, progress=False)
    from flows.sweep import run_search
    for scheduler in ("asha", "none"):
        cfg = load_config(ROOT / "params.yaml", base + [f"sweep.scheduler={scheduler}", f"sweep.name={scheduler}"])
        started = time.perf_counter()
        search = run_search(cfg)
        seconds = time.perf_counter() - started
        reasons: dict[str, int] = {}
        for row in search.trials:
            reasons[row["stop_reason"]] = reasons.get(row["stop_reason"], 0) + 1
        record = {"date": datetime.date.today().isoformat(), "cpu": cpu_description(),
                  "flags": " ".join(sorted(f for f in cpu_flags() if f.startswith(("avx", "amx")))),
                  "cores": os.cpu_count(), "python": platform.python_version(), "scheduler": scheduler,
                  "budget_minutes": args.minutes, "trial_minutes": args.trial_minutes,
                  "trials_planned": args.trials, "trials_started": len(search.trials),
                  "stop_reasons": reasons, "best_quick_fid": search.best and search.best["best_quick_fid"],
                  "best_point": search.best and search.best["point"],
                  "steps_trained": sum(r["steps"] for r in search.trials),
                  "quick_fid_samples": cfg.sweep.quick_fid_samples, "seconds": round(seconds, 1),
                  "checkpoint_every": cfg.sweep.checkpoint_every, "grace_minutes": cfg.sweep.grace_minutes,
                  "trials": [{k: r[k] for k in ("index", "point", "stop_reason", "steps", "best_quick_fid")}
                             for r in search.trials]}
        print(json.dumps(record))
        with args.out.open("a") as f:
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
