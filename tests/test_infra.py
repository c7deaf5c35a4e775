"""infra/ checked offline: the bucket bootstrap against moto's S3 server (twice: idempotent,
nothing of the user's lost), the Ray cluster-launcher YAML against the schema inside the `ray`
package, the compose file's services, health checks and secrets, the Dockerfile's structure."""

import copy
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import boto3
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"


def bootstrap(env, *args):
    return subprocess.run([sys.executable, str(INFRA / "bootstrap_buckets.py"), *args], env=env,
                          capture_output=True, text=True, timeout=120)


def test_bootstrap_is_idempotent_and_keeps_what_is_there(s3_env):
    import os
    env = {**os.environ, **s3_env}
    s3 = boto3.client("s3")
    names = ["--dvc", "t-dvc", "--mlflow", "t-mlflow", "--ray", "t-ray"]
    # the user already has the DVC bucket with data, and a lifecycle rule of their own on Ray's
    s3.create_bucket(Bucket="t-dvc")
    s3.put_object(Bucket="t-dvc", Key="store/files/md5/ab/cdef", Body=b"user data")
    s3.create_bucket(Bucket="t-ray")
    own = {"ID": "team-rule", "Status": "Enabled", "Filter": {"Prefix": "scratch/"},
           "Expiration": {"Days": 3}}
    s3.put_bucket_lifecycle_configuration(Bucket="t-ray", LifecycleConfiguration={"Rules": [own]})

    first = bootstrap(env, *names, "--checkpoint-days", "14")
    assert first.returncode == 0, first.stderr
    report = {r["bucket"]: r for r in json.loads(first.stdout)}
    assert report["t-dvc"]["bucket_action"] == "exists" and report["t-mlflow"]["bucket_action"] == "created"
    assert all(r["versioning"] == "enabled" and r["lifecycle"] == "set" for r in report.values())
    for bucket in ("t-dvc", "t-mlflow", "t-ray"):
        assert s3.get_bucket_versioning(Bucket=bucket)["Status"] == "Enabled"
    rules = {r["ID"]: r for r in s3.get_bucket_lifecycle_configuration(Bucket="t-ray")["Rules"]}
    assert set(rules) == {"team-rule", "ddpm-noncurrent", "ddpm-old-checkpoints"}
    assert rules["ddpm-old-checkpoints"]["Expiration"]["Days"] == 14
    assert rules["ddpm-old-checkpoints"]["Filter"]["Prefix"] == "ray/"
    assert rules["ddpm-noncurrent"]["NoncurrentVersionExpiration"]["NoncurrentDays"] == 7
    assert rules["team-rule"]["Expiration"]["Days"] == 3

    second = bootstrap(env, *names, "--checkpoint-days", "14")
    assert second.returncode == 0, second.stderr
    again = json.loads(second.stdout)
    assert all(r["bucket_action"] == "exists" and r["versioning"] == "already enabled"
               and r["lifecycle"] == "unchanged" for r in again)
    body = s3.get_object(Bucket="t-dvc", Key="store/files/md5/ab/cdef")["Body"].read()
    assert body == b"user data"


def test_bootstrap_bad_input_is_named(s3_env):
    import os
    bad = bootstrap({**os.environ, **s3_env}, "--checkpoint-days", "0")
    assert bad.returncode == 2 and "--checkpoint-days = 0: expected >= 1 day" in bad.stderr
    unreachable = bootstrap({**os.environ, **s3_env, "AWS_ENDPOINT_URL": "http://127.0.0.1:9"},
                            "--dvc", "x-dvc")
    assert unreachable.returncode == 1 and "error: S3 at http://127.0.0.1:9" in unreachable.stderr


def test_ray_cluster_yaml_matches_rays_schema():
    from jsonschema.exceptions import ValidationError
    from ray.autoscaler._private.util import prepare_config, validate_config
    config = yaml.safe_load((INFRA / "ray" / "cluster-aws.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(config)))         # the launcher's own check
    workers = config["available_node_types"]["gpu_a10g"]
    assert workers["resources"]["GPU"] >= 1 and workers["max_workers"] >= 1
    assert config["available_node_types"]["head"]["resources"]["CPU"] == 0
    assert any("--shm-size" in o for o in config["docker"]["run_options"])
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu_a10g"]["min_workers"] = "two"
    with pytest.raises(ValidationError):                            # the check is real
        validate_config(prepare_config(broken))


SECRET = re.compile(r"(PASSWORD|SECRET|ACCESS_KEY|ROOT_USER)", re.I)


def test_compose_services_health_and_no_literal_secrets():
    compose = yaml.safe_load((INFRA / "compose.yaml").read_text())
    services = compose["services"]
    assert {"postgres", "minio", "buckets", "prefect", "mlflow"} <= set(services)
    for name, svc in services.items():
        hc = svc.get("healthcheck", {})
        assert hc.get("test") or hc.get("disable") is True, f"{name}: no health check"
        for key, value in (svc.get("environment") or {}).items():
            if SECRET.search(key):
                assert re.fullmatch(r"\$\{[A-Z_]+(:\?[^}]*)?\}", str(value)), f"{name}.{key} is a literal"
        command = svc.get("command")
        text = command if isinstance(command, str) else " ".join(command or [])
        for url in re.findall(r"\w+(?:\+\w+)?://[^\s]+", text):    # credentials inside URLs
            if "@" in url:
                assert re.search(r":\$\{[A-Z_]+(:\?[^}]*)?\}@", url), f"{name}: literal password in {url}"
    assert "artifacts-destination s3://ddpm-mlflow" in services["mlflow"]["command"]
    assert services["mlflow"]["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert services["mlflow"]["depends_on"]["buckets"]["condition"] == "service_completed_successfully"
    assert "3.8.8" in services["prefect"]["image"]                 # the server matches the client pin
    assert (INFRA / "postgres-init.sql").read_text().count("CREATE DATABASE mlflow") == 1


def test_dockerfile_structure_follows_the_project_pins():
    text = (INFRA / "docker" / "Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+(\S+)\s+AS\s+(\w+)", text, re.M)
    assert [s[1] for s in stages] == ["cuda", "cpu"] and stages[0][0].startswith("nvidia/cuda:")
    pin = next(d for d in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
               if d.startswith("torch"))
    assert text.count(f"pip install {pin.split()[0]}") == 2                       # torch==2.13.0
    assert text.count("-r requirements.lock") == 2 and text.count("USER ddpm") == 2
    for path in re.findall(r"^COPY\s+(.+?)\s+\S+$", text, re.M):
        for item in path.split():
            assert (REPO / item.rstrip("/")).exists(), f"COPY {item}: not in the repository"
