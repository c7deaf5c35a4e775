"""Shared test data: scikit-learn's 8x8 digits, prepared once per test session."""

import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

from diffusion.prepare import packaged_records, prepare

REPO = Path(__file__).resolve().parents[1]
DATA = {"source": "digits", "resolution": 8}
SMALL_MODEL = {"preset": "tiny"}
_DIGITS: Path | None = None


def digits_dir() -> Path:
    """A prepared copy of the packaged 8x8 digits (1,797 real images), made on first use."""
    global _DIGITS
    if _DIGITS is None:
        _DIGITS = Path(tempfile.mkdtemp(prefix="ddpm-test-digits-")) / "prepared"
        prepare(packaged_records("digits"), _DIGITS, resolution=8, channels=1, heldout_fraction=0.1,
                source="digits")
    return _DIGITS


def sh(*args, cwd, env, check=True):
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)   # a limit, not a speed check
    if check and out.returncode:
        raise AssertionError(f"{' '.join(args)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return out


def make_project(tmp_path: Path) -> tuple[Path, dict]:
    """A git repository holding this project's pipeline files (dvc.yaml, params.yaml, .dvc with
    its local remote, the packages), set up for the 8x8 digits and a tiny model."""
    root = tmp_path / "project"
    root.mkdir()
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(REPO / name, root / name)
    (root / ".dvc").mkdir()
    shutil.copy(REPO / ".dvc" / "config", root / ".dvc" / "config")
    shutil.copy(REPO / ".dvc" / ".gitignore", root / ".dvc" / ".gitignore")
    for pkg in ("diffusion", "flows"):
        shutil.copytree(REPO / pkg, root / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(DATA)
    params["model"].update(SMALL_MODEL)
    params["extractor"].update(epochs=20, min_accuracy=0.8)
    params["train"].update(steps=10, batch_size=32, checkpoint_every=5, log_every=5)
    params["tracking"].update(grid_images=4, grid_steps=4)
    params["evaluate"].update(fid_samples=100, fid_seeds=2, steps=10, kid_subset_size=100)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    sh("git", "init", "-q", cwd=root, env=env)
    sh("git", "add", "-A", cwd=root, env=env)
    sh("git", "commit", "-qm", "pipeline", cwd=root, env=env)
    return root, env


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Wait until ``url`` answers, failing early when the server process ``proc`` exits."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"{url} did not answer within {timeout} s")
