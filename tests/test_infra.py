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
    # the image's user cannot write __pycache__ into /opt/venv: the lock's packages come compiled
    assert text.count("uv pip install --compile-bytecode --python /opt/venv/bin/python -r requirements.lock") == 2
    for path in re.findall(r"^COPY\s+(.+?)\s+\S+$", text, re.M):
        for item in path.split():
            assert (REPO / item.rstrip("/")).exists(), f"COPY {item}: not in the repository"


def test_the_environment_comes_compiled_to_bytecode():
    """`make env` (and the image) compile the lock's packages: uv does not by default, and where
    PYTHONDONTWRITEBYTECODE is set (CI, containers) or site-packages is read-only, every new
    process - each Ray worker, each stage - would otherwise compile Ray, pandas, MLflow and Prefect
    from source as it imports them (Ray's start-up to the first step: 48.6 s instead of 20.0 s, bench/RESULTS.md)."""
    import importlib.util
    assert "compileall.compile_dir(sysconfig.get_paths()['purelib']" in (REPO / "Makefile").read_text()
    missing = []
    for name in ("ray", "ray.train", "pandas", "pyarrow", "mlflow", "prefect", "dvc"):
        origin = importlib.util.find_spec(name).origin
        if not Path(importlib.util.cache_from_source(origin, optimization="")).is_file():
            missing.append(f"{name} ({origin})")
    assert not missing, ("not compiled to bytecode; rebuild the environment with `make clean env`: "
                         + ", ".join(missing))


# ----------------------------------------------------------------------------- Kubernetes
K8S = INFRA / "k8s"
K8S_VERSION = "1.33.0"       # schemas shipped by the kubernetes-validate package (offline)


def k8s_validate(resource: dict) -> None:
    import kubernetes_validate
    kubernetes_validate.validate(resource, K8S_VERSION, strict=True)   # unknown fields fail too


def test_base_manifests_match_the_kubernetes_schema():
    docs = list(yaml.safe_load_all((K8S / "base.yaml").read_text()))
    for doc in docs:
        k8s_validate(doc)
    by_name = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    services = by_name[("ConfigMap", "ddpm-services")]["data"]
    assert {"MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL"} <= set(services)
    assert by_name[("ConfigMap", "ddpm-ray-client")]["data"]["RAY_ADDRESS"].startswith("ray://ddpm-head-svc.")
    assert not [k for d in docs for k in d.get("data", {}) if SECRET.search(k)]   # secrets: not here
    broken = copy.deepcopy(by_name[("ConfigMap", "ddpm-services")])
    broken["data"]["PORT"] = 5000                                   # ConfigMap values are strings
    import kubernetes_validate
    with pytest.raises(kubernetes_validate.ValidationError):        # the check is real
        k8s_validate(broken)


def test_raycluster_pods_match_kubernetes_and_rays_kuberay_translation():
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
    from ray.autoscaler._private.util import validate_config
    cr = yaml.safe_load((K8S / "raycluster.yaml").read_text())
    assert cr["apiVersion"] == "ray.io/v1" and cr["kind"] == "RayCluster"
    groups = [cr["spec"]["headGroupSpec"], *cr["spec"]["workerGroupSpecs"]]
    for group in groups:                 # every pod template is a valid core/v1 PodTemplateSpec
        k8s_validate({"apiVersion": "v1", "kind": "PodTemplate",
                      "metadata": {"name": group.get("groupName", "head"), "namespace": "ddpm"},
                      "template": group["template"]})
    # Ray's autoscaler reads a RayCluster through this translation inside the head pod; its
    # result must pass the autoscaler's own config schema
    config = _derive_autoscaling_config_from_ray_cr(copy.deepcopy(cr))
    validate_config(config)
    types = config["available_node_types"]
    assert types["headgroup"]["resources"].get("CPU", 0) == 0       # nothing trains on the head
    gpu = types["gpu"]
    assert gpu["resources"]["GPU"] == 1 and gpu["min_workers"] == 0 and gpu["max_workers"] >= 2
    worker = cr["spec"]["workerGroupSpecs"][0]["template"]["spec"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in worker["tolerations"]
    assert worker["nodeSelector"]
    shm = next(v for v in worker["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in worker["containers"][0]["volumeMounts"]
    # the cluster runs the Ray the client has pinned, and no Ray pod sees RAY_ADDRESS
    locked = re.search(r"^ray==(\S+)", (REPO / "requirements.lock").read_text(), re.M).group(1)
    assert cr["spec"]["rayVersion"] == locked
    refs = [e["configMapRef"]["name"] for g in groups for c in g["template"]["spec"]["containers"]
            for e in c.get("envFrom", []) if "configMapRef" in e]
    assert set(refs) == {"ddpm-services"}
    broken = copy.deepcopy(cr)
    broken["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"] = "1 GPU"
    import kubernetes_validate
    with pytest.raises(kubernetes_validate.ValidationError):
        k8s_validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"},
                      "template": broken["spec"]["workerGroupSpecs"][0]["template"]})


def _placeholders(value) -> set[str]:
    if isinstance(value, dict):
        return set().union(*map(_placeholders, value.values())) if value else set()
    if isinstance(value, list):
        return set().union(*map(_placeholders, value)) if value else set()
    return set(re.findall(r"\{\{\s*(\w+)\s*\}\}", value)) if isinstance(value, str) else set()


def test_prefect_work_pool_template_renders_a_valid_job():
    from prefect.utilities.templating import apply_values
    template = json.loads((K8S / "prefect-work-pool.json").read_text())
    variables = template["variables"]["properties"]
    # the Kubernetes worker's own default template (bundled with Prefect): same configuration keys
    bundled = json.loads((Path(__import__("prefect").__file__).parent / "server" / "api" / "collections_data"
                          / "views" / "aggregate-worker-metadata.json").read_text())
    default = bundled["prefect-kubernetes"]["kubernetes"]["default_base_job_configuration"]
    assert set(template["job_configuration"]) == set(default["job_configuration"])
    assert set(default["variables"]["properties"]) <= set(variables)
    assert _placeholders(template["job_configuration"]) <= set(variables)   # nothing undeclared
    values = {k: v["default"] for k, v in variables.items() if "default" in v}
    values["name"] = "ddpm-pipeline-run"       # env stays unset: the worker turns that dict into a list
    job = apply_values(template["job_configuration"], values)["job_manifest"]
    k8s_validate(job)                                                # batch/v1 Job, strict
    container = job["spec"]["template"]["spec"]["containers"][0]
    refs = {next(iter(e.values()))["name"] for e in container["envFrom"]}
    base = {d["metadata"]["name"] for d in yaml.safe_load_all((K8S / "base.yaml").read_text())}
    assert refs - {"ddpm-s3"} <= base and job["spec"]["template"]["spec"]["serviceAccountName"] in base
    assert job["metadata"]["namespace"] == "ddpm"
