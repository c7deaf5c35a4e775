"""Seconds to compute FID (and KID) for 10,000 28x28 images with the domain extractor on this
machine, generation excluded (timed separately, per 100 images). Uses the prepared MNIST data and
a freshly trained domain classifier (its training time is reported too).

    python bench/bench_fid.py [--prepared data/prepared] [--n 10000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusion.data import load_prepared  # noqa: E402
from diffusion.evaluate import extract, reference_stats  # noqa: E402
from diffusion.features import load_domain_extractor, save_classifier, train_classifier  # noqa: E402
from diffusion.fid import FeatureStats, frechet_distance, kernel_inception_distance  # noqa: E402
from diffusion.prepare import dataset_version  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--prepared", default="data/prepared")
    p.add_argument("--n", type=int, default=10_000)
    args = p.parse_args()
    train = load_prepared(args.prepared, "train", in_memory=True)
    heldout = load_prepared(args.prepared, "heldout")
    t = time.perf_counter()
    model, acc = train_classifier(train, heldout, progress=False)
    print(f"domain extractor: held-out accuracy {acc:.4f}, trained in {time.perf_counter() - t:.1f} s")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "extractor.pt"
        save_classifier(model, path, {"heldout_accuracy": acc})
        extractor = load_domain_extractor(path)
        t = time.perf_counter()
        ref, _ = reference_stats(Path(tmp) / "refs", train, extractor, dataset=dataset_version(args.prepared),
                                 split="train")
        print(f"reference statistics of {ref.n} training images: {time.perf_counter() - t:.2f} s (cached after)")
        # 10,000 "generated" images: real training digits with pixel noise (generation excluded)
        reps = (args.n + len(train.labels) - 1) // len(train.labels)
        images = train.images.repeat(reps, 1, 1, 1)[: args.n]
        g = torch.Generator().manual_seed(0)
        images = (images.float() + 10 * torch.randn(images.shape, generator=g)).round().clamp(0, 255).to(torch.uint8)
        t = time.perf_counter()
        feats = extract(extractor, images)
        t_feat = time.perf_counter() - t
        stats = FeatureStats(feats.shape[1])
        stats.update(feats)
        fid = frechet_distance(stats.mean, stats.cov, ref.mu, ref.sigma).value
        t_fid = time.perf_counter() - t
        kid, _ = kernel_inception_distance(feats, ref.features, num_subsets=50, subset_size=1000)
        t_all = time.perf_counter() - t
        print(f"{args.n} images: features {t_feat:.2f} s, FID {t_fid:.2f} s (FID = {fid:.3f}), "
              f"FID + KID {t_all:.2f} s; {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
