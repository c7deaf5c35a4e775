"""DVC for real: dvc repro of prepare + validate, push/pull through the default local remote and
through an S3 remote on moto's server, and a failing validation that stops the pipeline."""

import json
import shutil
import uuid
from pathlib import Path

import boto3
import pytest
import yaml
from mlflow import MlflowClient

from diffusion.prepare import dataset_version
from tests.helpers import make_project, sh



@pytest.fixture
def project(tmp_path):
    """A git repository holding this project's pipeline files, with the digits as its data."""
    return make_project(tmp_path)


def files_of(directory):
    return {p.relative_to(directory).as_posix(): p.read_bytes()
            for p in sorted(Path(directory).rglob("*")) if p.is_file()}


@pytest.mark.slow(minutes=3)
def test_repro_versions_the_data_and_local_remote_round_trips(project):
    root, env = project
    # in-process training: the Ray path of the same stage function runs in test_first_run.py (the
    # flow), tests/test_ray.py and tests/test_cluster_data.py; here what is tested is DVC
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["ray"]["enabled"] = False
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh("git", "commit", "-qam", "train in the stage's process", cwd=root, env=env)
    out = sh("dvc", "repro", cwd=root, env=env)
    for stage in ("prepare", "validate", "extractor", "train", "evaluate", "register"):
        assert f"Running stage '{stage}'" in out.stdout
    metrics = sh("dvc", "metrics", "show", "--json", cwd=root, env=env).stdout
    assert '"fid"' in metrics and '"floor_fid"' in metrics
    # trained in the stage's process, registered in the embedded MLflow (SQLite in the project)
    run = json.loads((root / "runs" / "default" / "run.json").read_text())
    assert run["world_size"] == 1 and run["step"] == 10 and run["ray_run_name"] == "none"
    registry = json.loads((root / "metrics" / "registry.json").read_text())
    assert registry["alias"] == "champion" and registry["version"] == "1"
    assert registry["tracking_uri"] == f"sqlite:///{root / 'mlflow' / 'mlflow.db'}"
    mv = MlflowClient(registry["tracking_uri"]).get_model_version_by_alias("ddpm-mnist", "champion")
    assert mv.tags["dataset_version"] == dataset_version(root / "data" / "prepared")
    assert mv.tags["git_commit"] == sh("git", "rev-parse", "HEAD", cwd=root, env=env).stdout.strip()
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    recorded = lock["stages"]["prepare"]["outs"][0]["md5"]
    assert recorded == dataset_version(root / "data" / "prepared")   # the library's version = DVC's
    assert set(lock["stages"]["prepare"]["params"]["params.yaml"]) >= {"data.source", "data.resolution"}
    again = sh("dvc", "repro", cwd=root, env=env)
    assert "Running stage" not in again.stdout                        # unchanged inputs: skipped
    before = files_of(root / "data" / "prepared")
    sh("dvc", "push", cwd=root, env=env)                              # the default local remote
    assert (root / ".dvc-storage").is_dir()
    shutil.rmtree(root / "data" / "prepared")
    shutil.rmtree(root / ".dvc" / "cache")
    sh("dvc", "pull", cwd=root, env=env)
    assert files_of(root / "data" / "prepared") == before


@pytest.mark.slow
def test_push_to_s3_and_pull_into_a_fresh_clone(project, s3_env, tmp_path):
    root, env = project
    env = {**env, **s3_env}
    bucket = f"dvc-{uuid.uuid4().hex[:8]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    sh("dvc", "repro", "validate", cwd=root, env=env)       # the data stages are what S3 holds here
    sh("dvc", "remote", "add", "s3", f"s3://{bucket}/store", cwd=root, env=env)
    sh("dvc", "remote", "modify", "s3", "endpointurl", s3_env["AWS_ENDPOINT_URL"], cwd=root, env=env)
    sh("git", "add", "-A", cwd=root, env=env)
    sh("git", "commit", "-qm", "data v1", cwd=root, env=env)
    sh("dvc", "push", "-r", "s3", "prepare", cwd=root, env=env)
    objects = boto3.client("s3").list_objects_v2(Bucket=bucket)["KeyCount"]
    assert objects >= 5                                       # shards, manifest, stats, rejects, .dir
    clone = tmp_path / "clone"
    sh("git", "clone", "-q", str(root), str(clone), cwd=tmp_path, env=env)
    assert not (clone / "data" / "prepared").exists()
    sh("dvc", "pull", "-r", "s3", "prepare", cwd=clone, env=env)
    assert files_of(clone / "data" / "prepared") == files_of(root / "data" / "prepared")
    assert (s3_env["AWS_SECRET_ACCESS_KEY"] not in (clone / ".dvc" / "config").read_text())


def test_failing_validation_stops_repro_with_a_report(project):
    root, env = project
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["data"]["min_pixel_std"] = 10_000.0                 # no real image is that varied
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = sh("dvc", "repro", cwd=root, env=env, check=False)
    assert out.returncode != 0
    assert "validate stage" in out.stderr and "pixel_stats" in out.stderr
    report = (root / "data" / "validation" / "report.txt").read_text()
    assert "[pixel_stats]" in report and "train-00000.npy" in report
