"""How often the champion gate (diffusion.gate.compare, as flows/registry.py calls it) promotes:

* an **equal** challenger: the champion's own checkpoint sampled with other seeds (its rows are
  then not paired with the champion's: the hardest case for the rule), and
* a **clearly better** challenger: the same training continued to twice the steps, sampled with
  the champion's seeds (paired, as the registry does),

over ``--trials`` independent evaluation seed sets, with the evaluation time one decision costs.
The data are scikit-learn's 8x8 digits (packaged, offline) with the domain extractor; the
evaluation settings are params.yaml's (sampler, steps, samples per seed, seeds, precision auto).

    python bench/bench_gate.py [--trials 40] [--steps 150]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffusion.config import load_config  # noqa: E402
from diffusion.data import load_dataset  # noqa: E402
from diffusion.evaluate import evaluate, features_path, load_features  # noqa: E402
from diffusion.features import load_domain_extractor, save_classifier, train_classifier  # noqa: E402
from diffusion.data import load_prepared  # noqa: E402
from diffusion.gate import compare  # noqa: E402
from diffusion.hardware import cpu_description  # noqa: E402
from diffusion.hardware import cpu_flags as hardware_cpu_flags  # noqa: E402
from diffusion.prepare import prepare_from_config  # noqa: E402
from diffusion.trainer import train  # noqa: E402

RESULTS = ROOT / "bench" / "results_gate_cpu.json"


def cpu_flags() -> str:
    """The SIMD flags that decide precision here (from /proc/cpuinfo, as the probe reads them)."""
    return " ".join(sorted(f for f in hardware_cpu_flags() if f.startswith(("avx", "amx", "fma", "sse4"))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--steps", type=int, default=150, help="the champion's training steps")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-gate")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    base = [f"data.prepared_dir={work / 'prepared'}", "data.source=digits", "data.resolution=8",
            "model.preset=tiny", "model.num_classes=10", f"extractor.path={work / 'extractor.pt'}",
            "train.batch_size=64", "train.log_every=50", "train.checkpoint_every=1000000",
            f"train.out_dir={work / 'run'}", "train.device=cpu", "train.precision=fp32",
            f"evaluate.reference_cache={work / 'refs'}", f"evaluate.metrics_path={work / 'eval' / 'eval.json'}",
            f"evaluate.grid_path={work / 'eval' / 'grid.png'}", "evaluate.precision=fp32",
            "evaluate.memory_format=contiguous"]
    cfg = load_config(ROOT / "params.yaml", base + [f"train.steps={args.steps}"])
    prepare_from_config(cfg.data)
    model, acc = train_classifier(load_prepared(cfg.data.prepared_dir, "train"),
                                  load_prepared(cfg.data.prepared_dir, "heldout"), epochs=20, progress=False)
    save_classifier(model, cfg.extractor.path, {"heldout_accuracy": acc})
    extractor = load_domain_extractor(cfg.extractor.path)
    data = load_dataset(cfg.data)
    checkpoints = {}
    for steps in (args.steps, 2 * args.steps):
        step_cfg = load_config(ROOT / "params.yaml", base + [f"train.steps={steps}"])
        train(step_cfg, data, progress=False)
        checkpoints[steps] = work / f"checkpoint-{steps}.pt"
        shutil.copy(work / "run" / "checkpoint.pt", checkpoints[steps])

    def features(steps: int, seed: int) -> tuple[np.ndarray, dict, float]:
        ev = dataclasses.replace(cfg.evaluate, seed=seed)
        clock = time.perf_counter()
        metrics = evaluate(checkpoints[steps], dataclasses.replace(cfg, evaluate=ev), extractor, progress=False,
                           on_setup=lambda s: None)
        seconds = time.perf_counter() - clock
        saved = load_features(features_path(ev.metrics_path))
        return saved, metrics, seconds

    rows, eval_seconds, decide_seconds = [], [], []
    t = cfg.tracking
    for trial in range(args.trials):
        seed = 1 + trial * 10_000_019
        champ, champ_m, s1 = features(args.steps, seed)
        equal, _, s2 = features(args.steps, seed + 5_000_011)           # same checkpoint, other seeds
        better, better_m, s3 = features(2 * args.steps, seed)           # twice the steps, same seeds
        eval_seconds += [s1, s2, s3]
        d = champ["features"].shape[-1]
        row = {"trial": trial, "seed": seed, "champion_fid": champ_m["fid"], "better_fid": better_m["fid"]}
        for name, other in (("equal", equal), ("better", better)):
            clock = time.perf_counter()
            c = compare(champ["features"].reshape(-1, d), other["features"].reshape(-1, d), champ["mu"],
                        champ["sigma"], margin=t.champion_margin, confidence=t.gate_confidence)
            decide_seconds.append(time.perf_counter() - clock)
            row[name] = {"promote": c.promote, "gain": c.gain, "lower": c.lower, "stderr": c.stderr}
        rows.append(row)
        print(f"trial {trial}: equal {row['equal']['promote']} (gain {row['equal']['gain']:.3f}), better "
              f"{row['better']['promote']} (gain {row['better']['gain']:.3f})", flush=True)
    ev = cfg.evaluate
    result = {
        "machine": {"cpu": cpu_description(), "cpu_flags": cpu_flags(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "python": platform.python_version(),
                    "date": datetime.date.today().isoformat()},
        "setup": {"data": "sklearn digits 8x8", "model": "tiny, 10 classes", "champion_steps": args.steps,
                  "better_steps": 2 * args.steps, "sampler": ev.sampler, "sampler_steps": ev.steps,
                  "samples_per_seed": ev.fid_samples, "seeds": ev.fid_seeds,
                  "margin": t.champion_margin, "confidence": t.gate_confidence, "extractor_accuracy": acc},
        "trials": args.trials,
        "false_promotion_rate": sum(r["equal"]["promote"] for r in rows) / len(rows),
        "better_promotion_rate": sum(r["better"]["promote"] for r in rows) / len(rows),
        "evaluation_seconds_mean": float(np.mean(eval_seconds)),
        "decision_seconds_mean": float(np.mean(decide_seconds)),
        "rows": rows,
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1))


if __name__ == "__main__":
    main()
