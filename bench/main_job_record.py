"""One JSON line describing a finished main job (``python -m flows.pipeline`` with the defaults),
read from what the job wrote: ``runs/default/run.json`` (training), ``metrics/eval.json``
(evaluation), ``metrics/registry.json`` (registration), the job's exit code and wall clock.

    python bench/main_job_record.py --what main_job_ray_gpu --seconds 412 --rc 0 >> results.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def record(what: str, seconds: float, rc: int, root: Path = ROOT) -> dict:
    sys.path.insert(0, str(root))
    from diffusion.config import load_config
    cfg = load_config(root / "params.yaml")
    run = _read(root / cfg.train.out_dir / "run.json")
    ev = _read(root / cfg.evaluate.metrics_path)
    reg = _read((root / cfg.evaluate.metrics_path).with_name("registry.json"))
    hw = run.get("hardware", {})
    workers = run.get("world_size") or 1
    steps = run.get("step")
    loop = run.get("train_loop_seconds")
    images = steps * cfg.train.batch_size * cfg.train.grad_accum * workers if steps else None
    return {
        "what": what, "completed": rc == 0 and bool(reg), "rc": rc, "seconds": round(seconds, 1),
        "backend": hw.get("dist_backend"), "ray_use_gpu": hw.get("ray_use_gpu"),
        "ray_scaling": hw.get("ray_scaling"), "workers": workers,
        "train_seconds": run.get("seconds"), "train_loop_seconds": loop, "steps": steps,
        "img_per_s": round(images / loop, 1) if images and loop else None,
        "precision": hw.get("precision"), "fid": ev.get("fid"), "fid_std": ev.get("fid_std"),
        "fid_floor": ev.get("floor_fid"), "recognised": ev.get("confident_share"),
        "sampling_seconds": ev.get("sampling_seconds"), "alias": reg.get("alias"),
        "device": hw.get("device_description"),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "not_training_seconds": round(seconds - loop, 1) if loop else None,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--what", default="main_job_ray_gpu")
    p.add_argument("--seconds", type=float, required=True, help="the job's wall clock")
    p.add_argument("--rc", type=int, required=True, help="the job's exit code")
    args = p.parse_args()
    print(json.dumps(record(args.what, args.seconds, args.rc)))


if __name__ == "__main__":
    main()
