"""No credentials in tracking: a checkout cloned with a token, a DVC remote and a config that
carry user-info in their URLs, a real training and registration into the embedded MLflow store;
the token must appear nowhere in the store (database bytes and every artifact file)."""

import json
import subprocess

from mlflow import MlflowClient

import numpy as np

from diffusion.config import load_config, redact_url
from diffusion.evaluate import YARDSTICK_PARTS, Reference, features_path, save_features, yardstick
from diffusion.prepare import dataset_version
from flows.stages import register_stage, train_stage
from tests.helpers import digits_dir

TOKEN = "s3cr3t"


def test_redact_url():
    assert redact_url(f"https://user:{TOKEN}@host/x.git") == "https://host/x.git"
    assert redact_url(f"remote https://{TOKEN}@host:8443/a@b and ssh://git@h/r") == \
        "remote https://host:8443/a@b and ssh://h/r"
    for kept in ("git@github.com:org/x.git", "s3://bucket/prefix", "http://h/p?u=a@b", "/runs/a@b"):
        assert redact_url(kept) == kept


def _checkout(root):
    """A git checkout whose origin holds a token, with a DVC remote and a params.yaml that do too."""
    root.mkdir()
    (root / ".dvc").mkdir()
    (root / ".dvc" / "config").write_text(
        f"[core]\n    remote = store\n['remote \"store\"']\n    url = https://user:{TOKEN}@dvc.example.com/store\n")
    (root / "params.yaml").write_text(f"tracking:\n  tracking_uri: https://user:{TOKEN}@mlflow.example.com\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    for args in (["init", "-q"], ["remote", "add", "origin", f"https://user:{TOKEN}@git.example.com/x.git"],
                 ["add", "-A"], ["commit", "-qm", "x"]):
        subprocess.run(git + args, cwd=root, check=True, capture_output=True)
    return root


def test_no_credentials_reach_the_tracking_store(tmp_path, monkeypatch):
    monkeypatch.chdir(_checkout(tmp_path / "checkout"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://user:{TOKEN}@127.0.0.1:9")
    store = tmp_path / "mlflow"
    cfg = load_config(None, [
        "data.source=digits", "data.resolution=8", f"data.prepared_dir={digits_dir()}",
        "model.preset=tiny", "model.num_classes=10", "train.steps=2", "train.batch_size=16",
        "train.precision=fp32", f"train.out_dir={tmp_path / 'run'}", "ray.enabled=false",
        f"ray.storage_path=s3://user:{TOKEN}@bucket/runs", f"tracking.local_dir={store}",
        "tracking.grid_images=0", "tracking.system_metrics_every=0",
        f"evaluate.metrics_path={tmp_path / 'metrics' / 'eval.json'}"])
    trained = train_stage(cfg, progress=False)
    # the register stage reads the evaluation's summary; its numbers do not matter here
    (tmp_path / "metrics").mkdir()
    parts = {k: 1 for k in YARDSTICK_PARTS}
    rows = np.random.default_rng(0).normal(size=(1, 8, 4))
    save_features(features_path(cfg.evaluate.metrics_path), rows,
                  Reference("k", np.zeros(4), np.eye(4), rows[0], 8), yardstick(parts))
    (tmp_path / "metrics" / "eval.json").write_text(json.dumps({
        "fid": 50.0, "fid_std": 1.0, "checkpoint_step": trained["step"],
        "dataset_version": dataset_version(digits_dir()), "extractor_sha256": "e" * 64,
        "yardstick": yardstick(parts), "yardstick_parts": parts}))
    register_stage(cfg)

    files = [f for f in store.rglob("*") if f.is_file()]
    assert any(f.name == "mlflow.db" for f in files) and any(f.name == "checkpoint.pt" for f in files)
    assert [str(f) for f in files if TOKEN.encode() in f.read_bytes()] == []
    # what was logged is still there, without its user-info
    run = MlflowClient(trained["tracking_uri"]).get_run(trained["mlflow_run_id"])
    assert run.data.tags["mlflow.source.git.repoURL"] == "https://git.example.com/x.git"
    assert run.data.params["train.steps"] == "2"
    (source,) = {json.loads(d.dataset.source)["url"] for d in run.inputs.dataset_inputs}
    assert source.startswith("https://dvc.example.com/store/files/md5/")
    snapshot = MlflowClient(trained["tracking_uri"]).download_artifacts(
        run.info.run_id, "config/params.yaml", str(tmp_path / "snapshot"))
    assert open(snapshot).read() == "tracking:\n  tracking_uri: https://mlflow.example.com\n"
