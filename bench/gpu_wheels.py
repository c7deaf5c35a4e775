"""Wheels for a lent GPU machine that has CUDA torch but not this project's stack (Ray, Prefect,
MLflow, DVC, ...): every package of ``requirements.lock`` that the device image lacks (listed in
a file, one name per line), downloaded for its Python (cp312, manylinux x86-64) into parts of at
most ``--part-mib`` MiB, because one device call carries at most 64 MiB:

    python bench/gpu_wheels.py --have device_packages.txt --out .whl     # .whl/part1, part2, ...

Each part is carried by one device call, installed into ``.gpu-site`` in the working tree (an
ignored folder that stays on the warm machine between calls), and the last call runs
``bench/cuda_session.sh``, which puts ``.gpu-site`` on ``PYTHONPATH``. Test- and bench-only
packages that the GPU session does not import are left out (``SKIP``).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# not imported by the pipeline or the GPU session's steps (moto's AWS lint and Kubernetes checks)
SKIP = {"cfn-lint", "kubernetes-validate", "moto", "aws-xray-sdk", "docker", "pytest"}
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (39, 35, 34, 31, 28, 27, 24, 17)] + [
    "manylinux2014_x86_64", "manylinux1_x86_64", "linux_x86_64"]


def _name(text: str) -> str:
    return re.sub(r"[-_.]+", "-", text.strip().lower())


def missing(lock: Path, have: Path) -> list[str]:
    present = {_name(line) for line in have.read_text().split() if line.strip()}
    out = []
    for line in lock.read_text().splitlines():
        spec = line.split("#")[0].strip()
        if "==" not in spec:
            continue
        name, version = spec.split("==")
        if _name(name) not in present and _name(name) not in SKIP:
            out.append(f"{name.strip()}=={version.strip()}")
    return out


def download(spec: str, dest: Path, python: str) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--python-version", python, "--implementation", "cp", "-d", str(dest), spec]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    before = set(dest.iterdir())
    if subprocess.run(cmd + ["--platform", "any"]).returncode:     # sdist only: build the wheel here
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(dest),
                        spec], check=True)
    new = sorted(set(dest.iterdir()) - before)
    if not new:                       # already there
        stem = _name(spec.split("==")[0]).replace("-", "_")
        new = [p for p in dest.iterdir() if _name(p.name).startswith(stem.replace("_", "-"))]
    return new[0]


def _chunks(wheel: Path, limit: int) -> list[Path]:
    """A wheel larger than one call carries (Ray's) as byte pieces ``NAME.whl.K-of-N``, which
    ``cuda_session.sh --stage`` joins once all have arrived."""
    size = wheel.stat().st_size
    if size <= limit:
        return [wheel]
    n = -(-size // limit)
    out = []
    with wheel.open("rb") as f:
        for k in range(1, n + 1):
            piece = wheel.with_name(f"{wheel.name}.{k}-of-{n}")
            piece.write_bytes(f.read(-(-size // n)))
            out.append(piece)
    wheel.unlink()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--have", type=Path, required=True, help="package names the device already has")
    p.add_argument("--out", type=Path, default=ROOT / ".whl")
    p.add_argument("--python", default="3.12")
    p.add_argument("--part-mib", type=float, default=60.0)
    args = p.parse_args()
    specs = missing(ROOT / "requirements.lock", args.have)
    with tempfile.TemporaryDirectory() as tmp:
        wheels = [download(spec, Path(tmp), args.python) for spec in specs]
        limit = int(args.part_mib * 2**20)
        pieces = [piece for wheel in wheels for piece in _chunks(wheel, limit)]
        pieces.sort(key=lambda w: -w.stat().st_size)
        parts: list[list[Path]] = []
        sizes: list[int] = []
        for wheel in pieces:             # first fit, largest first
            size = wheel.stat().st_size
            for i, total in enumerate(sizes):
                if total + size <= limit:
                    parts[i].append(wheel)
                    sizes[i] += size
                    break
            else:
                parts.append([wheel])
                sizes.append(size)
        for i, part in enumerate(parts, 1):
            folder = args.out / f"part{i}"
            folder.mkdir(parents=True, exist_ok=True)
            for wheel in part:
                wheel.replace(folder / wheel.name)
            print(f"{folder}: {len(part)} wheels, {sizes[i - 1] / 2**20:.1f} MiB")
    print(f"{len(specs)} packages in {len(parts)} parts, {sum(sizes) / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
