"""Ray workers on nodes that share nothing with the driver but the network (issue 15), with real
components: a Ray head started by ``ray start``, and raylets started inside their own mount
namespace (``unshare --mount``) in which tmpfs hides the project's ``data/`` and ``mlflow/``
directories, so their workers see neither the prepared data nor the embedded SQLite store; the
DVC remote is moto's S3 server, filled by a real ``dvc push``.

Nodes: the head (1 CPU), ``remote`` (2 CPUs, custom resource ``remote: 2``: both workers of a run
land there) and ``stale`` (1 CPU, resource ``stale: 1``, where one of the ``diffusion`` sources is
bind-mounted over with a changed copy: a node with other code)."""

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import boto3
import pytest

from diffusion.config import load_config
from diffusion.prepare import dataset_version
from tests.conftest import free_port
from tests.helpers import REPO, digits_dir, sh

pytest.importorskip("ray")

BIN = Path(sys.executable).parent
UNSHARE = ["unshare", "--mount"] + ([] if os.geteuid() == 0 else ["--map-root-user"])


def _can_unshare() -> bool:
    try:
        return subprocess.run([*UNSHARE, "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


# only the cluster tests: the unit tests below need no mount namespace
needs_unshare = pytest.mark.skipif(not _can_unshare() or shutil.which("mount") is None,
                                   reason="needs unshare --mount (Linux mount namespaces)")


@pytest.fixture(scope="module")
def project(s3_endpoint, tmp_path_factory):
    """A DVC project whose prepared data is pushed to an S3 remote on moto (real dvc commands)."""
    root = tmp_path_factory.mktemp("cluster") / "project"
    shutil.copytree(digits_dir(), root / "data" / "prepared")
    (root / "mlflow").mkdir()
    aws = {"AWS_ACCESS_KEY_ID": "testing-key-id", "AWS_SECRET_ACCESS_KEY": "very-secret-value-123",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, **{
        "aws_access_key_id": aws["AWS_ACCESS_KEY_ID"], "aws_secret_access_key": aws["AWS_SECRET_ACCESS_KEY"],
        "region_name": "us-east-1"})
    for bucket in ("dvc-remote", "ray-checkpoints"):
        s3.create_bucket(Bucket=bucket)
    env = {**os.environ, **aws, "PATH": f"{BIN}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    env.pop("AWS_ENDPOINT_URL", None)                 # the remote's own endpointurl must be enough
    sh("dvc", "init", "--no-scm", "-q", cwd=root, env=env)
    sh("dvc", "remote", "add", "-d", "store", "s3://dvc-remote/cache", cwd=root, env=env)
    sh("dvc", "remote", "modify", "store", "endpointurl", s3_endpoint, cwd=root, env=env)
    sh("dvc", "add", "-q", "data/prepared", cwd=root, env=env)
    sh("dvc", "push", "-q", cwd=root, env=env)
    version = dataset_version(root / "data" / "prepared")
    assert f"md5: {version}" in (root / "data" / "prepared.dvc").read_text()   # DVC agrees
    return {"root": root, "aws": aws, "version": version, "s3": s3_endpoint}


def _ports(base: int) -> list[str]:
    """Ports of their own for the raylets that share this machine's address (the defaults
    collide: two dashboard agents on 52365), and a worker-port range starting at ``base``."""
    named = ["--node-manager-port", "--object-manager-port", "--metrics-export-port",
             "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port"]
    return [f"{flag}={free_port()}" for flag in named] + [
        f"--min-worker-port={base}", f"--max-worker-port={base + 199}"]


# `ray` through this interpreter: a raylet starts its workers with the Python that started it
RAY = [sys.executable, "-m", "ray.scripts.scripts"]


WAIT_FOR_NODES = """
import sys, time, ray
ray.init(address=sys.argv[1], log_to_driver=False)
deadline = time.time() + 120
while len([n for n in ray.nodes() if n["Alive"]]) < int(sys.argv[2]) and time.time() < deadline:
    time.sleep(0.5)
print(len([n for n in ray.nodes() if n["Alive"]]))
"""


@pytest.fixture(scope="module")
def cluster(project, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nodes")
    root = project["root"]
    # Ray >= 2.59 authenticates cluster calls with a token: one shared secret on every node and
    # the driver, given as KubeRay and the cluster launcher give it, through the environment
    env = {**os.environ, **project["aws"], "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
           "GLOO_SOCKET_IFNAME": "lo", "RAY_USAGE_STATS_ENABLED": "0"}
    for key in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        env.pop(key, None)
    # S3 endpoint for Ray's checkpoint storage (pyarrow reads the standard setting); the data
    # path does not need it: workers take the DVC remote's own endpointurl
    env["AWS_ENDPOINT_URL"] = project["s3"]
    port = free_port()
    address = f"127.0.0.1:{port}"
    stale_copy = tmp / "ema.py"
    stale_copy.write_text((REPO / "diffusion" / "ema.py").read_text() + "# another version\n")
    # every node is a `ray start --block` of its own session, stopped by signalling that session
    # at the end (`ray stop` would stop every Ray cluster on the machine, not only this one)
    nodes = {
        "head": ("true", 1, {}, ["--head", f"--port={port}", "--include-dashboard=false"]),
        "remote": (f"mount -t tmpfs none {root / 'data'} && mount -t tmpfs none {root / 'mlflow'}",
                   2, {"remote": 2}, [f"--address={address}"]),
        "stale": (f"mount --bind {stale_copy} {REPO / 'diffusion' / 'ema.py'}", 1, {"stale": 1},
                  [f"--address={address}"]),
    }
    procs, logs = [], []
    try:
        for k, (name, (mounts, cpus, resources, role)) in enumerate(nodes.items()):
            (tmp / f"{name}-cache").mkdir()
            log = (tmp / f"{name}.log").open("w")
            logs.append(log)
            start = (f"{mounts} && exec {' '.join(RAY)} start {' '.join(role)} --num-cpus={cpus} "
                     f"--resources='{json.dumps(resources)}' --disable-usage-stats --block "
                     + " ".join(_ports(20000 + 200 * k)))
            namespace = UNSHARE if name != "head" else []
            for attempt in range(2):     # Ray gives a raylet 30 s to register: a loaded machine
                procs.append(subprocess.Popen(   # (the other test worker) may need a second start
                    [*namespace, "sh", "-c", start], stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True, env={**env, "DDPM_CACHE_DIR": str(tmp / f"{name}-cache")}))
                joined = subprocess.run([sys.executable, "-c", WAIT_FOR_NODES, address, str(k + 1)],
                                        env=env, capture_output=True, text=True, timeout=180)
                if joined.stdout.strip().endswith(str(k + 1)) or procs[-1].poll() is None:
                    break
                _stop_session(procs.pop())
            assert joined.stdout.strip().endswith(str(k + 1)), (
                f"raylet {name!r} did not join: {joined.stderr[-800:]} "
                f"{(tmp / f'{name}.log').read_text()[-800:]}")
        yield {"env": {**env, "RAY_ADDRESS": address},
               "caches": {n: tmp / f"{n}-cache" / "datasets" for n in nodes}}
    finally:
        for p in reversed(procs):
            _stop_session(p)
        for log in logs:
            log.close()


def _stop_session(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def train_on_cluster(project, cluster, tmp_path, *extra):
    """``python -m flows.stages train`` as a user runs it against the cluster (RAY_ADDRESS),
    from the project directory; returns the finished process and run.json when written."""
    overrides = [
        "data.source=digits", "data.resolution=8", "data.prepared_dir=data/prepared",
        "model.preset=tiny", "train.steps=4", "train.batch_size=8", "train.checkpoint_every=2",
        "train.log_every=1", "train.warmup_steps=2", "train.budget_minutes=0",
        f"train.out_dir={tmp_path / 'out'}", "ray.num_workers=2", "ray.worker_resources=[remote=1]",
        f"ray.storage_path={tmp_path / 'ray'}", f"tracking.local_dir={project['root'] / 'mlflow'}",
        "tracking.grid_images=4", "tracking.grid_steps=2", "tracking.system_metrics_every=0", *extra]
    done = subprocess.run([sys.executable, "-m", "flows.stages", "train", "--params",
                           str(REPO / "params.yaml"), *overrides], cwd=project["root"],
                          env=cluster["env"], capture_output=True, text=True, timeout=600)
    run_json = tmp_path / "out" / "run.json"
    return done, (json.loads(run_json.read_text()) if done.returncode == 0 else None)


@pytest.mark.slow(minutes=3)
@needs_unshare
def test_remote_workers_get_the_data_by_version_once_per_node(project, cluster, tmp_path):
    """Both workers on the node that cannot see data/: one downloads from S3, the other waits
    for it and reads the node's cache; rank 0's metrics and grids reach the embedded SQLite
    store (which that node cannot see either) through the driver; checkpoints go through S3;
    a second run resumes from S3 and downloads nothing."""
    version = project["version"]
    storage = "ray.storage_path=s3://ray-checkpoints/runs"
    done, info = train_on_cluster(project, cluster, tmp_path, storage)
    assert done.returncode == 0, done.stderr[-3000:]
    assert info["step"] == 4 and info["world_size"] == 2
    hows = sorted(v.split(" on ")[0] for v in info["data_obtained"].values())
    assert hows == ["downloaded", "node cache"], info["data_obtained"]
    assert "downloaded from the DVC remote" in done.stdout                     # said on the console
    cache = cluster["caches"]["remote"]
    assert sorted(p.name for p in cache.iterdir()) == sorted(      # no partial download left
        [version, f"{version}.lock", f"{version}.files.json", "downloads.log"])
    assert dataset_version(cache / version) == version               # exactly the pushed version
    downloads = [json.loads(line) for line in (cache / "downloads.log").read_text().splitlines()]
    assert [(d["version"], d["remote"]) for d in downloads] == [(version, "s3://dvc-remote/cache")]
    assert not cluster["caches"]["head"].exists() and not cluster["caches"]["stale"].exists()

    from mlflow import MlflowClient
    client = MlflowClient(f"sqlite:///{project['root'] / 'mlflow' / 'mlflow.db'}")
    history = client.get_metric_history(info["mlflow_run_id"], "loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]        # routed through the driver
    images = [a.path for a in client.list_artifacts(info["mlflow_run_id"], "images")]
    assert any(p.startswith("images/samples") for p in images)
    assert client.get_run(info["mlflow_run_id"]).data.tags["data.rank0"].startswith(
        ("downloaded on", "node cache on"))

    assert Path(info["checkpoint"]).is_file()        # copied from S3 to train.out_dir
    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=project["s3"], region_name="us-east-1", **{
        "aws_access_key_id": project["aws"]["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": project["aws"]["AWS_SECRET_ACCESS_KEY"]}).list_objects_v2(
        Bucket="ray-checkpoints", Prefix="runs/")["Contents"]]
    assert any(k.endswith("/checkpoint.pt") for k in keys)

    done, again = train_on_cluster(project, cluster, tmp_path, storage, "train.steps=6")
    assert done.returncode == 0, done.stderr[-3000:]
    assert again["step"] == 6 and again["resumed_from"] == 4          # resumed from S3
    assert {v.split(" on ")[0] for v in again["data_obtained"].values()} == {"node cache"}
    assert len((cache / "downloads.log").read_text().splitlines()) == 1


@pytest.mark.slow
@needs_unshare
def test_a_version_missing_on_the_remote_fails_before_training(project, cluster, tmp_path):
    other = project["root"] / "data" / "other"     # prepared, never pushed; hidden from the node
    shutil.copytree(project["root"] / "data" / "prepared", other)
    (other / "notes.txt").write_text("changed after the push\n")
    version = dataset_version(other)
    done, _ = train_on_cluster(project, cluster, tmp_path, f"data.prepared_dir={other}",
                               "ray.max_failures=0", "ray.num_workers=1")
    assert done.returncode == 2, done.stderr[-3000:]
    assert (f"error: train stage: dataset version {version} is not on the DVC remote "
            "s3://dvc-remote/cache") in done.stderr
    assert "dvc push" in done.stderr
    assert f"warning: dataset version {version} is not on the DVC remote" in done.stdout  # said first
    assert not list((tmp_path / "ray").rglob("checkpoint.pt"))            # nothing was trained


@pytest.mark.slow
@needs_unshare
def test_a_worker_with_other_code_refuses_to_train(project, cluster, tmp_path):
    done, _ = train_on_cluster(project, cluster, tmp_path, "ray.worker_resources=[stale=1]",
                               "ray.max_failures=0", "ray.num_workers=1")
    assert done.returncode == 2, done.stderr[-3000:]
    assert "error: train stage: the worker on node" in done.stderr
    assert "the driver runs" in done.stderr and "deploy the driver's image" in done.stderr
    assert not list((tmp_path / "ray").rglob("checkpoint.pt"))


def test_bad_worker_resources_are_refused_with_the_key(tmp_path):
    from diffusion.config import ConfigError
    from flows.ray_train import _worker_resources
    cfg = load_config(None, ["ray.worker_resources=[remote]", f"ray.storage_path={tmp_path}"])
    with pytest.raises(ConfigError, match=r"ray.worker_resources: 'remote': expected name=amount"):
        _worker_resources(cfg)


def test_a_remote_listing_that_escapes_or_is_corrupt_is_refused(tmp_path):
    import hashlib
    from flows.datasets import DatasetUnavailable, Remote, obtain

    def put(entries, digest=None):
        blob = json.dumps(entries, sort_keys=True).encode()
        md5 = digest or hashlib.md5(blob).hexdigest()
        path = tmp_path / "remote" / "files" / "md5" / md5[:2] / f"{md5[2:]}.dir"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(blob)
        return f"{md5}.dir"

    remote = Remote(str(tmp_path / "remote"))
    escaping = put([{"md5": "0" * 32, "relpath": "../outside.npy"}])
    with pytest.raises(DatasetUnavailable, match="would escape the dataset directory"):
        obtain(escaping, tmp_path / "absent", remote, cache=tmp_path / "cache")
    corrupt = put([{"md5": "0" * 32, "relpath": "a.npy"}], digest="f" * 32)
    with pytest.raises(DatasetUnavailable, match="the remote copy is corrupt"):
        obtain(corrupt, tmp_path / "absent", remote, cache=tmp_path / "cache")
    # a sound listing whose object is missing: the download has begun (a partial exists) when it fails
    missing = put([{"md5": "0" * 32, "relpath": "a.npy"}])
    with pytest.raises(DatasetUnavailable, match=r"a.npy \(md5 0{32}\) could not be read .*no such object"):
        obtain(missing, tmp_path / "absent", remote, cache=tmp_path / "cache")
    # only the lock files: no partial (".<version>.partial-<host>-<pid>-<random>"), nothing half-written
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted(
        f"{v}.lock" for v in (escaping, corrupt, missing))
