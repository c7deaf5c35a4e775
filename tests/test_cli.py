"""The command line, run as a user would: real processes, real files."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "diffusion", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


def test_help_explains_every_option():
    train_help = run("train", "--help").stdout
    for word in ("--params", "section.key=value", "--no-resume", "--quiet", "resume"):
        assert word in train_help
    assert "samples.png" in run("run", "--help").stdout
    sample_help = run("sample", "--help").stdout
    for word in ("--checkpoint", "--out", "--num", "--sampler", "--steps", "--eta", "--seed",
                 "--labels", "--guidance", "--device", "--raw-weights"):
        assert word in sample_help


@pytest.mark.slow
def test_train_then_sample_writes_a_grid(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(f"data: {{source: digits, resolution: 8, prepared_dir: {tmp_path / 'data' / 'prepared'}, "
                      f"validation_dir: {tmp_path / 'data' / 'validation'}}}\n"
                      "model: {preset: tiny, num_classes: 10}\n"
                      f"train: {{steps: 6, batch_size: 16, checkpoint_every: 3, out_dir: {tmp_path / 'run'}}}\n")
    out = run("train", "--params", str(params), "--quiet")
    assert out.returncode == 2 and "no manifest.csv; run the prepare stage first" in out.stderr
    # the main job: prepare + validate + train + sample grid
    out = run("run", "--params", str(params), "--quiet", "train.log_every=3")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout[:out.stdout.index("}\n{") + 1])
    assert summary["step"] == 6 and summary["final"]["step"] == 6
    assert (tmp_path / "run" / "samples.png").exists()
    assert "dataset version" in out.stderr and (tmp_path / "data" / "validation" / "report.txt").exists()
    again = run("train", "--params", str(params), "--quiet", "train.steps=8")
    assert again.returncode == 0 and json.loads(again.stdout)["resumed_from"] == 6

    grid = tmp_path / "grid.png"
    out = run("sample", "--checkpoint", str(tmp_path / "run" / "checkpoint.pt"), "--out", str(grid),
              "--num", "9", "--steps", "5", "--labels", "3", "--guidance", "2", "--quiet")
    assert out.returncode == 0, out.stderr
    img = np.asarray(Image.open(grid))
    assert img.shape == (3 * 10 + 2, 3 * 10 + 2)            # 3x3 grid of 8x8 images, 2 px padding
    again = tmp_path / "again.png"
    run("sample", "--checkpoint", str(tmp_path / "run" / "checkpoint.pt"), "--out", str(again),
        "--num", "9", "--steps", "5", "--labels", "3", "--guidance", "2", "--quiet")
    assert np.array_equal(img, np.asarray(Image.open(again)))    # same seed, same pixels


@pytest.mark.slow
def test_bad_input_exits_2_with_a_named_cause(tmp_path):
    out = run("train", "--params", str(tmp_path / "none.yaml"))
    assert out.returncode == 2 and "none.yaml: file not found" in out.stderr
    params = tmp_path / "params.yaml"
    params.write_text("train: {lr: -1}\n")
    out = run("train", "--params", str(params), "model.colour=red")
    assert out.returncode == 2
    assert "train.lr = -1.0: must be > 0.0" in out.stderr and "model.colour = 'red': unknown key" in out.stderr
    bogus = tmp_path / "bogus.pt"
    bogus.write_bytes(b"not a checkpoint")
    out = run("sample", "--checkpoint", str(bogus), "--out", str(tmp_path / "x.png"))
    assert out.returncode == 2 and "bogus.pt: not a readable checkpoint" in out.stderr
    assert not (tmp_path / "x.png").exists()
