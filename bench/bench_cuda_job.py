"""The main job's library path on one CUDA GPU, without Ray, MLflow or Prefect: prepare the packaged
MNIST digits, train for a wall-clock budget with ``precision: auto``, then evaluate (FID / KID over
the configured seeds, recognisability) with sampling on the GPU. Prints one JSON line: the
precision chosen and why, img/s, steps, sampling seconds and the quality numbers.

    python bench/bench_cuda_job.py --minutes 1.5 [--batch 128] [--work /tmp/cuda-job]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusion.config import load_config  # noqa: E402
from diffusion.data import load_dataset, load_prepared  # noqa: E402
from diffusion.evaluate import evaluate  # noqa: E402
from diffusion.features import load_domain_extractor, save_classifier, train_classifier  # noqa: E402
from diffusion.prepare import prepare_from_config  # noqa: E402
from diffusion.trainer import train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=1.5, help="training budget")
    p.add_argument("--batch", type=int, default=128, help="train.batch_size")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--work", type=Path, default=None)
    args = p.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="cuda-job-"))
    cfg = load_config(ROOT / "params.yaml", [
        f"data.prepared_dir={work / 'prepared'}", f"data.validation_dir={work / 'validation'}",
        f"train.out_dir={work / 'run'}", f"train.budget_minutes={args.minutes}",
        f"train.batch_size={args.batch}", f"train.lr={args.lr}", "train.device=cuda",
        "train.checkpoint_every=100000000", "train.log_every=50",
        f"evaluate.reference_cache={work / 'refs'}", f"evaluate.metrics_path={work / 'eval.json'}",
        f"evaluate.grid_path={work / 'samples.png'}"])
    prepare_from_config(cfg.data)
    t = time.perf_counter()
    result = train(cfg, load_dataset(cfg.data), progress=False)
    train_s = time.perf_counter() - t
    rates = sorted(h["img_per_s"] for h in result.history[1:] if "img_per_s" in h)
    t = time.perf_counter()
    model, acc = train_classifier(load_prepared(cfg.data.prepared_dir, "train"),
                                  load_prepared(cfg.data.prepared_dir, "heldout"), progress=False)
    save_classifier(model, work / "extractor.pt", {"heldout_accuracy": acc})
    extractor_s = time.perf_counter() - t
    t = time.perf_counter()
    metrics = evaluate(result.checkpoint, cfg, load_domain_extractor(work / "extractor.pt"),
                       progress=False, device="cuda")
    keep = {k: metrics[k] for k in metrics if isinstance(metrics[k], (int, float, str))}
    keep["sampler_steps"] = keep.pop("steps", None)
    print(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                      "hardware": result.hardware,
                      "train_steps": result.step, "train_s": round(train_s, 1), "batch": args.batch,
                      "median_img_per_s": rates[len(rates) // 2] if rates else None,
                      "extractor_s": round(extractor_s, 1), "extractor_acc": acc,
                      "evaluate_s": round(time.perf_counter() - t, 1), **keep}))


if __name__ == "__main__":
    main()
