"""Prefect for real: `prefect server start` on loopback, the flow served as a deployment from a
project checkout (git + DVC with its local remote), runs triggered with `prefect deployment run`
from the CLI. The first run trains on Ray and registers in MLflow; the second hits the cache; a
run whose data fails validation ends FAILED with nothing registered."""

import asyncio
import contextvars
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from diffusion.checkpoint import checkpoint_step
from tests.conftest import free_port
from tests.helpers import make_project, wait_http

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
# training in-process keeps the suite short: the Ray path of the same train stage is exercised by
# `dvc repro` (tests/data/test_dvc.py) and tests/test_ray.py
FAST = ["evaluate.fid_samples=100", "evaluate.fid_seeds=2", "ray.enabled=false"]


SERVED: dict = {}           # the `python -m flows.serve` process of the module's fixture


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prefect")
    root, env = make_project(tmp)
    port = free_port()
    env = {**env, "PREFECT_HOME": str(tmp / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "MLFLOW_DISABLE_TELEMETRY": "true",
           "PYTHONPATH": str(root), "GLOO_SOCKET_IFNAME": "lo"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    logs = (tmp / "server.log").open("w"), (tmp / "serve.log").open("w")
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], cwd=tmp, env=env, stdout=logs[0],
                              stderr=subprocess.STDOUT)
    served = None
    try:
        wait_http(f"http://127.0.0.1:{port}/api/health", server, timeout=180)
        served = subprocess.Popen([sys.executable, "-m", "flows.serve", "--name", "test"], cwd=root,
                                  env=env, stdout=logs[1], stderr=subprocess.STDOUT)
        SERVED["process"] = served
        deadline = time.time() + 120
        while time.time() < deadline:               # the deployment exists once serve registered it
            out = subprocess.run([str(BIN / "prefect"), "deployment", "inspect", "ddpm-pipeline/test"],
                                 cwd=root, env=env, capture_output=True, text=True)
            if out.returncode == 0:
                break
            assert served.poll() is None, (tmp / "serve.log").read_text()
            time.sleep(1)
        yield root, env, tmp
    finally:
        for proc in (served, server):
            if proc is not None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
        for f in logs:
            f.close()


def run_deployment(root, env, overrides) -> dict:
    """`prefect deployment run --watch`, then the flow run and its task runs from the API."""
    out = subprocess.run([str(BIN / "prefect"), "deployment", "run", "ddpm-pipeline/test",
                          "--param", f"overrides={json.dumps(overrides)}", "--watch",
                          "--watch-timeout", "600"],
                         cwd=root, env=env, capture_output=True, text=True, timeout=700)
    text = out.stdout + out.stderr
    flow_run_id = next(line.split("UUID:")[1].strip() for line in text.splitlines() if "UUID:" in line)
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings
    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
        with get_client(sync_client=True) as client:
            run = client.read_flow_run(flow_run_id)
            tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
    return {"rc": out.returncode, "text": text, "state": run.state,
            "tasks": {t.name.rsplit("-", 1)[0]: t.state.name for t in tasks}, "id": flow_run_id}


@pytest.mark.slow(minutes=3)
def test_deployment_runs_train_register_then_cache_hits(deployment):
    root, env, tmp = deployment
    first = run_deployment(root, env, FAST)
    assert first["state"].type.value == "COMPLETED", first["text"] + (tmp / "serve.log").read_text()[-5000:]
    assert first["tasks"]["train"] == "Completed" and first["tasks"]["dvc-push"] == "Completed"
    registry = json.loads((root / "metrics" / "registry.json").read_text())
    mv = MlflowClient(registry["tracking_uri"]).get_model_version_by_alias("ddpm-mnist", "champion")
    assert mv.tags["prefect_flow_run_id"] == first["id"]
    assert mv.tags["ray_run_name"] == "none" and mv.tags["checkpoint_step"] == "10"
    assert mv.tags["dataset_version"].endswith(".dir") and len(mv.tags["params_hash"]) == 64
    run_info = json.loads((root / "runs" / "default" / "run.json").read_text())
    assert run_info["mlflow_run_id"] == mv.run_id and run_info["step"] == 10
    # the flow recorded the data in dvc.lock and pushed it to the local remote, as dvc repro would
    lock = (root / "dvc.lock").read_text()
    assert mv.tags["dataset_version"].removesuffix(".dir") in lock
    assert any((root / ".dvc-storage").rglob("*"))

    second = run_deployment(root, env, FAST)
    assert second["state"].type.value == "COMPLETED", second["text"]
    assert second["tasks"]["train"] == "Cached" and second["tasks"]["evaluate"] == "Cached"
    assert second["tasks"]["register"] == "Cached"
    versions = MlflowClient(registry["tracking_uri"]).search_model_versions("name='ddpm-mnist'")
    assert len(versions) == 1                                           # nothing registered twice

    # a changed setting re-runs training, which resumes at step 10 of 10: nothing new is trained,
    # the weights are version 1's, so evaluation and registration are skipped and said to be
    third = run_deployment(root, env, FAST + ["train.log_every=2"])
    assert third["state"].type.value == "COMPLETED", third["text"]
    assert third["tasks"]["train"] == "Completed" and "evaluate" not in third["tasks"]
    assert "register" not in third["tasks"]
    assert len(MlflowClient(registry["tracking_uri"]).search_model_versions("name='ddpm-mnist'")) == 1
    shown = (tmp / "serve.log").read_text()
    assert "trained nothing new: step 10 was reached before and its weights are ddpm-mnist version 1" in shown


@pytest.mark.slow
def test_registrations_take_turns_on_a_prefect_global_concurrency_limit(deployment):
    """The first run's registration created the limit (limit 1); while one holder has the slot
    another cannot take it; a rollback deployment with a version that does not exist fails with
    the reason and leaves the champion."""
    root, env, tmp = deployment
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.registry import GateError, _prefect_lock, gcl_name
    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
        with get_client(sync_client=True) as client:
            assert client.read_global_concurrency_limit_by_name(gcl_name("ddpm-mnist")).limit == 1
        held, release = threading.Event(), threading.Event()

        def hold():
            with _prefect_lock("ddpm-mnist", 60):
                held.set()
                release.wait(60)
        # the thread runs in this context: Prefect's settings (the API URL) live in a contextvar
        holder = threading.Thread(target=contextvars.copy_context().run, args=(hold,))
        holder.start()
        assert held.wait(60)
        with pytest.raises(GateError, match="another registration held it"):
            with _prefect_lock("ddpm-mnist", 2):
                pass
        release.set()
        holder.join(60)
        with _prefect_lock("ddpm-mnist", 30):                  # free again
            pass
    store = MlflowClient(f"sqlite:///{root / 'mlflow' / 'mlflow.db'}")
    champion = store.get_model_version_by_alias("ddpm-mnist", "champion").version
    out = subprocess.run([str(BIN / "prefect"), "deployment", "run", "ddpm-rollback/test", "--param", "to=7",
                          "--param", "reason=test", "--watch", "--watch-timeout", "300"],
                         cwd=root, env=env, capture_output=True, text=True, timeout=400)
    assert out.returncode != 0 and "has no version 7" in out.stdout + out.stderr + (tmp / "serve.log").read_text()
    assert store.get_model_version_by_alias("ddpm-mnist", "champion").version == champion


@pytest.mark.slow
def test_failing_validation_fails_the_run_and_registers_nothing(deployment):
    root, env, tmp = deployment
    store = MlflowClient(f"sqlite:///{root / 'mlflow' / 'mlflow.db'}")
    count = len(store.search_model_versions("name='ddpm-mnist'"))
    bad = run_deployment(root, env, FAST + ["data.min_pixel_std=10000.0"])
    assert bad["state"].type.value == "FAILED" and bad["rc"] != 0
    assert bad["tasks"]["validate"] == "Failed" and "train" not in bad["tasks"]
    assert "validate stage failed: ValidationFailed" in bad["state"].message
    assert "pixel_stats" in bad["state"].message
    assert len(store.search_model_versions("name='ddpm-mnist'")) == count


def test_kubernetes_work_pool_template_is_accepted_by_the_server(deployment):
    """infra/k8s/prefect-work-pool.json registered on the real server as a Kubernetes pool (the
    server checks the template: variables schema, placeholders) and read back unchanged."""
    root, env, _ = deployment
    template = REPO / "infra" / "k8s" / "prefect-work-pool.json"
    made = subprocess.run([str(BIN / "prefect"), "work-pool", "create", "ddpm-k8s", "--type", "kubernetes",
                           "--base-job-template", str(template)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stdout + made.stderr
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def read():
        async with get_client() as client:
            return await client.read_work_pool("ddpm-k8s")
    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
        pool = asyncio.run(read())
    assert pool.type == "kubernetes"
    assert pool.base_job_template == json.loads(template.read_text())
    bad = subprocess.run([str(BIN / "prefect"), "work-pool", "create", "ddpm-bad", "--type", "kubernetes",
                          "--base-job-template", str(root / "params.yaml")], cwd=root, env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0


@pytest.mark.slow
def test_sigterm_to_the_served_deployment_ends_its_run_in_order(deployment):
    """Last in the module: it stops the served deployment. SIGTERM while a run trains: the run
    stops at a step with a checkpoint of it, its MLflow run ends KILLED and the flow run
    Cancelled (or Crashed), and `python -m flows.serve` exits."""
    root, env, tmp = deployment
    out = subprocess.run([str(BIN / "prefect"), "deployment", "run", "ddpm-pipeline/test", "--param",
                          "overrides=" + json.dumps(FAST + ["train.steps=100000", "train.log_every=5",
                                                            "train.out_dir=runs/long"])],
                         cwd=root, env=env, capture_output=True, text=True, timeout=300)
    flow_run_id = next(line.split("UUID:")[1].strip() for line in out.stdout.splitlines() if "UUID:" in line)
    metrics = root / "runs" / "long" / "metrics.jsonl"
    deadline = time.time() + 600
    while not (metrics.is_file() and metrics.read_text().strip()):      # training has reached a step
        assert time.time() < deadline, (tmp / "serve.log").read_text()[-5000:]
        time.sleep(1)
    served = SERVED["process"]
    served.send_signal(signal.SIGTERM)
    served.wait(timeout=180)
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings
    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(flow_run_id).state
    shown = (tmp / "serve.log").read_text()
    assert state.type.value in ("CANCELLED", "CRASHED"), shown[-5000:]
    step = checkpoint_step(root / "runs" / "long" / "checkpoint.pt")
    assert step is not None and step >= 5, shown[-5000:]
    store = MlflowClient(f"sqlite:///{root / 'mlflow' / 'mlflow.db'}")
    runs = store.search_runs([e.experiment_id for e in store.search_experiments()],
                             filter_string=f"tags.prefect_flow_run_id = '{flow_run_id}'")
    assert [r.info.status for r in runs] == ["KILLED"], shown[-5000:]
