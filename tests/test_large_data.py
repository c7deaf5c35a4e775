"""Datasets larger than memory: a folder of 20,000 colour images (246 MB as uint8 once prepared)
goes through ``python -m flows.stages prepare`` and ``python -m diffusion train``, and each
process's peak resident memory stays within 100 MiB of the same run on 2,000 images: the prepare
stage streams (one shard per split in memory), training reads the shards on demand. The 18,000
images more are 221 MB of pixels: a stage that held them would be over the limit (the prepare
stage before it streamed grew by 746 MiB from 5,000 to 60,000 images, bench/RESULTS.md). The
same at 60,000 and 200,000 images: ``bench/bench_prepare_memory.py``."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import REPO

RES = 64


def _folder(root: Path, n: int, seed: int) -> Path:
    """``n`` smooth-noise RGB images (random 8x8 colours, bilinearly upsampled) in 10 class
    folders."""
    low = np.random.default_rng(seed).integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    for c in range(10):
        (root / f"class{c}").mkdir(parents=True)
    for i in range(n):
        Image.fromarray(low[i]).resize((RES, RES), Image.BILINEAR).save(
            root / f"class{i % 10}" / f"{i:06d}.png", compress_level=1)
    return root


# Runs ``python -m <module>`` and reports its peak RSS at exit. VmHWM of the process's own memory
# map, not ru_maxrss: after fork + exec, ru_maxrss still counts the parent's resident set.
LAUNCH = """
import atexit, runpy, sys
def report():
    hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM"))
    print("peak_kib", hwm.split()[1], file=sys.stderr)
atexit.register(report)
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def _run(args: list[str], tmp: Path) -> tuple[str, float]:
    """Run ``python -m <args>``; return its stdout and its peak RSS in MiB."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "DDPM_CACHE_DIR": str(tmp / "cache")}
    out = subprocess.run([sys.executable, "-c", LAUNCH, *args], cwd=tmp, env=env, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, f"{' '.join(args[:2])} failed:\n{out.stdout}\n{out.stderr[-3000:]}"
    peak = [line.split()[1] for line in out.stderr.splitlines() if line.startswith("peak_kib ")]
    return out.stdout, int(peak[-1]) / 1024


def _prepare_and_train(tmp: Path, n: int) -> tuple[float, float]:
    folder = _folder(tmp / "images", n, seed=n)
    data = ["data.source=folder", f"data.path={folder}", f"data.resolution={RES}", "data.channels=3",
            f"data.prepared_dir={tmp / 'prepared'}", f"data.validation_dir={tmp / 'validation'}",
            "model.preset=tiny"]
    _, prepare_peak = _run(["flows.stages", "prepare", "--params", str(REPO / "params.yaml"), *data], tmp)
    shards = sorted((tmp / "prepared").glob("train-*.npy"))
    assert sum(p.stat().st_size for p in shards) > 0.85 * n * 3 * RES * RES
    out, peak = _run(["diffusion", "train", "--params", str(REPO / "params.yaml"), *data,
                      "train.steps=6", "train.batch_size=16",
                      "train.budget_minutes=0", "train.precision=fp32", f"train.out_dir={tmp / 'run'}",
                      "--quiet"], tmp)
    assert '"step": 6' in out
    return prepare_peak, peak


@pytest.mark.slow
def test_prepare_and_training_memory_do_not_grow_with_the_dataset(tmp_path):
    small_prepare, small = _prepare_and_train(tmp_path / "2k", 2_000)
    large_prepare, large = _prepare_and_train(tmp_path / "20k", 20_000)
    # the 20k set is 221 MB of pixels more than the 2k one; holding it in memory would show
    assert large_prepare - small_prepare < 100, \
        f"prepare: peak RSS {large_prepare:.0f} MiB on 20,000 images vs {small_prepare:.0f} MiB on 2,000"
    assert large - small < 100, f"training: peak RSS {large:.0f} MiB on 20,000 images vs {small:.0f} MiB on 2,000"
