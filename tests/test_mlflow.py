"""MLflow for real: an `mlflow server` subprocess on loopback (SQLite backend) whose artifact
store is an S3 bucket on moto's standalone server. The pipeline's own stages log to it; the
registry gate, the pyfunc generator in a fresh process and `mlflow models serve` are checked
against it."""

import dataclasses
import json
import math
import re
import os
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import boto3
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from diffusion.config import load_config
from diffusion.data import to_uint8
from diffusion.sampling import load_generator, sample
from diffusion.checkpoint import load_checkpoint, weights_sha256
from diffusion.evaluate import evaluate, features_path, yardstick
from flows.registry import CHAMPION, CHALLENGER, register
from flows.tracking import flatten
from flows.stages import (already_registered, evaluate_stage, extractor_stage, load_extractor,
                          register_stage, train_stage)
from tests.conftest import free_port
from tests.helpers import digits_dir, wait_http

REPO = Path(__file__).resolve().parents[1]
BUCKET = "mlflow-artifacts"


def stop(proc: subprocess.Popen) -> None:
    """Stop a server started in its own session and every process it started (`mlflow server`
    spawns job consumers that outlive it when only the server is signalled)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=20)
    except ProcessLookupError:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)              # the group's stragglers
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def server(s3_endpoint, tmp_path_factory):
    """`mlflow server` with S3 artifacts (proxied: clients never see the bucket's credentials)."""
    aws = {"AWS_ACCESS_KEY_ID": "testing-key-id", "AWS_SECRET_ACCESS_KEY": "very-secret-value-123",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    boto3.client("s3", endpoint_url=s3_endpoint, **{
        "aws_access_key_id": aws["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": aws["AWS_SECRET_ACCESS_KEY"], "region_name": "us-east-1",
    }).create_bucket(Bucket=BUCKET)
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    env = {**os.environ, **aws, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint,
           "MLFLOW_DISABLE_TELEMETRY": "true"}
    # output to a file: a pipe that nobody reads fills up with access logs and blocks the server
    log = (root / "server.log").open("w")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", f"s3://{BUCKET}/artifacts"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", proc)
        yield {"url": url, "s3": s3_endpoint, "aws": aws}
    finally:
        stop(proc)
        log.close()


def stage_cfg(tmp_path, uri, *extra):
    return load_config(None, [
        "data.source=digits", "data.resolution=8", f"data.prepared_dir={digits_dir()}",
        "model.preset=tiny", "model.num_classes=10",
        f"extractor.path={tmp_path / 'extractor.pt'}", "extractor.epochs=20", "extractor.min_accuracy=0.8",
        "train.steps=12", "train.batch_size=32", "train.log_every=3", "train.checkpoint_every=6",
        f"train.out_dir={tmp_path / 'run'}", "ray.enabled=false",
        "evaluate.fid_samples=100", "evaluate.fid_seeds=2", "evaluate.steps=8",
        "evaluate.kid_subset_size=100", f"evaluate.reference_cache={tmp_path / 'refs'}",
        f"evaluate.metrics_path={tmp_path / 'metrics' / 'eval.json'}",
        f"evaluate.grid_path={tmp_path / 'metrics' / 'samples.png'}",
        f"tracking.tracking_uri={uri}", "tracking.model_name=digits-gen", "tracking.experiment=t",
        "tracking.grid_images=4", "tracking.grid_steps=4", "tracking.system_metrics_every=0.5", *extra])


@pytest.fixture(scope="module")
def registered(server, tmp_path_factory):
    """The pipeline's stages end to end: train (logging), evaluate, register -> version 1."""
    tmp = tmp_path_factory.mktemp("pipeline")
    cfg = stage_cfg(tmp, server["url"])
    extractor_stage(cfg, progress=False)
    trained = train_stage(cfg, progress=False, tags={"purpose": "test"})
    metrics = evaluate_stage(cfg, progress=False)
    reg = register_stage(cfg, flow_run_id="flow-run-1234")
    return {"cfg": cfg, "trained": trained, "metrics": metrics, "reg": reg, "tmp": tmp}


@pytest.mark.slow(minutes=2)
def test_run_logs_params_metrics_images_and_artifacts_to_s3(server, registered):
    client = MlflowClient(server["url"])
    run = client.get_run(registered["trained"]["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    cfg = registered["cfg"]
    # the params are the choices people vary (no paths, no tracking or sweep settings); names tell
    # runs apart
    assert run.data.params["train.lr"] == str(cfg.train.lr) and run.data.params["model.preset"] == "tiny"
    assert run.data.params == {k: v for k, v in flatten(cfg.to_dict()).items()
                               if not k.startswith(("tracking.", "sweep.", "data.prepared_dir", "train.out_dir",
                                                    "extractor.path", "evaluate.metrics_path",
                                                    "evaluate.grid_path", "evaluate.reference_cache",
                                                    "data.validation_dir", "ray.storage_path"))}
    assert "train.out_dir" not in run.data.params and run.data.params["train.steps"] == "12"
    dataset = registered["metrics"]["dataset_version"]
    assert re.fullmatch(rf"tiny-12steps-d{dataset[:7]}-[0-9a-f]{{4}}", run.info.run_name), run.info.run_name
    # what the device resolved ("auto") as tags, so runs from different machines compare honestly
    hardware = registered["trained"]["hardware"]
    assert run.data.params["train.precision"] == "auto" and hardware["precision_requested"] == "auto"
    assert not any(k.startswith("resolved.") for k in run.data.params)
    assert run.data.tags["resolved.train.precision"] == hardware["precision"] in ("fp32", "bf16")
    assert run.data.tags["resolved.train.device_description"] == hardware["device_description"]
    assert run.data.tags["resolved.train.precision_reason"] == hardware["precision_reason"]
    assert run.data.tags["resolved.evaluate.precision"] == registered["metrics"]["precision"]
    assert run.data.tags["resolved.evaluate.memory_format"] == registered["metrics"]["memory_format"]
    assert run.data.tags["purpose"] == "test" and run.data.tags["params_hash"]
    loss = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in loss] == [3, 6, 9, 12] and all(math.isfinite(m.value) for m in loss)
    for key in ("lr", "grad_norm", "img_per_s"):
        assert len(client.get_metric_history(run.info.run_id, key)) == 4
    assert run.data.metrics["fid"] == pytest.approx(registered["metrics"]["fid"])
    assert run.data.metrics["fid_std"] == pytest.approx(registered["metrics"]["fid_std"])
    assert "floor_fid" in run.data.metrics and "kid" in run.data.metrics
    assert any(k.startswith("system/") for k in run.data.metrics)       # system metrics monitor
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config", "evaluation", "images"} <= names
    assert {a.path for a in client.list_artifacts(run.info.run_id, "config")} == {"config/params.yaml"}
    # the sample grids over training: one per checkpoint, each with its step
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    steps = sorted({int(p.split("+step+")[1].split("+")[0]) for p in images if p.endswith(".png")})
    assert steps == [6, 12]
    # the artifact bytes live in the S3 bucket behind the server
    s3 = boto3.client("s3", endpoint_url=server["s3"], region_name="us-east-1",
                      aws_access_key_id=server["aws"]["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=server["aws"]["AWS_SECRET_ACCESS_KEY"])
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET).get("Contents", [])]
    assert any(k.endswith("params.yaml") for k in keys) and any(k.endswith("checkpoint.pt") for k in keys)


def test_first_version_is_champion_with_lineage(server, registered):
    client = MlflowClient(server["url"])
    reg, metrics = registered["reg"], registered["metrics"]
    assert reg["alias"] == CHAMPION and reg["previous_champion"] is None
    mv = client.get_model_version_by_alias("digits-gen", CHAMPION)
    assert mv.version == reg["version"] and mv.run_id == registered["trained"]["mlflow_run_id"]
    tags = mv.tags
    assert tags["dataset_version"] == metrics["dataset_version"] and tags["dataset_version"].endswith(".dir")
    assert tags["extractor_sha256"] == metrics["extractor_sha256"]
    assert tags["prefect_flow_run_id"] == "flow-run-1234" and tags["ray_run_name"] == "none"
    assert len(tags["params_hash"]) == 64 and tags["params_hash"] == registered["cfg"].hash()
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert tags["git_commit"].startswith(head)
    assert float(tags["fid"]) == pytest.approx(metrics["fid"])
    assert tags["gate.status"] == "done" and tags["gate.decision"] == CHAMPION
    assert tags["gate.yardstick"] == metrics["yardstick"] == yardstick(metrics["yardstick_parts"])
    assert tags["gate.yardstick.steps"] == "8" and tags["gate.yardstick.seeds"] == "2"
    assert tags["gate.yardstick.extractor_sha256"] == metrics["extractor_sha256"]
    ckpt = load_checkpoint(registered["tmp"] / "run" / "checkpoint.pt")
    assert tags["weights_sha256"] == weights_sha256(ckpt)
    # the samples' features are on the run, for the next gates to pair with
    names = {a.path for a in client.list_artifacts(mv.run_id, "evaluation")}
    assert "evaluation/features.npz" in names
    on_disk = json.loads((registered["tmp"] / "metrics" / "registry.json").read_text())
    assert on_disk["version"] == reg["version"]


def test_the_same_weights_are_not_registered_again(server, registered):
    """A re-run that trained nothing re-evaluates the same checkpoint: the registry already holds
    it, so the register stage names that version and creates none."""
    client = MlflowClient(server["url"])
    before = client.search_model_versions("name='digits-gen'")
    v1 = registered["reg"]["version"]
    digest = client.get_model_version("digits-gen", v1).tags["weights_sha256"]
    # a champion registered before digests were recorded: its checkpoint is hashed, the tag filled in
    client.delete_model_version_tag("digits-gen", v1, "weights_sha256")
    backfilled = register_stage(registered["cfg"], flow_run_id="flow-run-again")
    assert backfilled["duplicate_of"] == v1
    assert client.get_model_version("digits-gen", v1).tags["weights_sha256"] == digest
    again = register_stage(registered["cfg"], flow_run_id="flow-run-again")
    assert again["duplicate_of"] == registered["reg"]["version"]
    assert f"already registered as version {registered['reg']['version']}" in again["reason"]
    assert len(client.search_model_versions("name='digits-gen'")) == len(before)
    assert already_registered(registered["cfg"])["version"] == registered["reg"]["version"]


def test_crash_before_the_alias_moves_leaves_the_champion(server, registered, monkeypatch):
    uri, cfg, reg = server["url"], registered["cfg"], registered["reg"]
    client = MlflowClient(uri)
    before = client.get_model_version_by_alias("digits-gen", CHAMPION).version

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed")                      # the process dies at the commit point

    run_id = client.create_run(client.get_run(reg["run_id"]).info.experiment_id).info.run_id
    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", crash)
    with pytest.raises(KeyboardInterrupt):
        register(uri, cfg, model_uri=reg["model_uri"], run_id=run_id, evaluation=registered["metrics"],
                 features_file=features_path(cfg.evaluate.metrics_path), lineage={},
                 weights_sha256="not-yet-registered")
    monkeypatch.undo()
    assert client.get_model_version_by_alias("digits-gen", CHAMPION).version == before
    newest = max(client.search_model_versions("name='digits-gen'"), key=lambda v: int(v.version))
    assert newest.tags["gate.status"] == "pending" and newest.run_id == run_id
    assert newest.tags["gate.decision"] == CHALLENGER      # the champion's own samples: no gain


LOAD_AND_PREDICT = """
import sys, numpy as np, pandas as pd, mlflow
model = mlflow.pyfunc.load_model(sys.argv[1])
rows = pd.DataFrame([{"num_images": 3, "class_label": 7}, {"num_images": 2, "class_label": -1}])
a = model.predict(rows, params={"steps": 6, "seed": 5})
b = model.predict(rows, params={"steps": 6, "seed": 5})
c = model.predict(rows, params={"steps": 6, "seed": 6})
np.save(sys.argv[2], np.stack([a, b, c]))
"""


def test_champion_loads_in_a_fresh_process_and_is_seed_deterministic(server, registered, tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": server["url"], "MLFLOW_DISABLE_TELEMETRY": "true"}
    out = tmp_path / "images.npy"
    proc = subprocess.run([sys.executable, "-c", LOAD_AND_PREDICT, "models:/digits-gen@champion",
                           str(out)], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    a, b, c = np.load(out)
    assert a.shape == (5, 8, 8, 1) and a.dtype == np.uint8
    assert np.array_equal(a, b)                                  # same seed, same images
    assert not np.array_equal(a, c)                              # another seed, other images
    # image j uses seed + j: seed 6's first image is seed 5's second (same class 7)
    assert np.array_equal(c[0], a[1])
    # every registered version points at the one trained checkpoint: the library sampling it
    # directly must give the same pixels
    model, schedule, trained, _ = load_generator(registered["tmp"] / "run" / "checkpoint.pt")
    ref = sample(model, schedule, 3, channels=1, resolution=8, steps=6, seed=5,
                 labels=torch.full((3,), 7), target=trained.diffusion.target, progress=False)
    assert np.array_equal(a[:3], to_uint8(ref).permute(0, 2, 3, 1).numpy())


@pytest.mark.slow
def test_models_serve_answers_invocations(server, registered, tmp_path):
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": server["url"], "MLFLOW_DISABLE_TELEMETRY": "true",
           # the scoring server is started as `uvicorn` from PATH: the activated environment
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "models", "serve",
                             "-m", "models:/digits-gen@champion", "--env-manager", "local",
                             "--host", "127.0.0.1", "-p", str(port), "-w", "1"],
                            env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", proc, timeout=180)

        def invoke(records, params):
            req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations",
                                         data=json.dumps({"dataframe_records": records,
                                                          "params": params}).encode(),
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=120) as r:
                return json.loads(r.read())

        request = ([{"num_images": 2, "class_label": 1}, {"num_images": 1, "class_label": -1}],
                   {"steps": 5, "seed": 3})
        images = np.asarray(invoke(*request)["predictions"])
        assert images.shape == (3, 8, 8, 1) and images.min() >= 0 and images.max() <= 255
        assert np.array_equal(images, np.asarray(invoke(*request)["predictions"]))
        with pytest.raises(urllib.error.HTTPError) as bad:
            invoke([{"num_images": 2, "class_label": 42}], {})
        assert bad.value.code in (400, 500)
        assert "class_label = 42" in bad.value.read().decode()
        with pytest.raises(urllib.error.HTTPError) as missing:                  # schema enforced
            invoke([{"num_images": 2}], {})
        assert missing.value.code == 400 and "class_label" in missing.value.read().decode()
    finally:
        stop(proc)
        log.close()


READ_BACK = """
import json, sys
from mlflow import MlflowClient
url, name, runs, versions = sys.argv[1], sys.argv[2], sys.argv[3].split(","), sys.argv[4].split(",")
c = MlflowClient(url)
out = {"experiment": c.get_experiment_by_name("t").tags, "runs": {}, "versions": {}}
for run_id in runs:
    r = c.get_run(run_id)
    out["runs"][run_id] = {
        "tags": r.data.tags, "metrics": sorted(r.data.metrics), "params": r.data.params,
        "inputs": [{"name": d.dataset.name, "digest": d.dataset.digest, "source": d.dataset.source,
                    "context": {t.key: t.value for t in d.tags}.get("mlflow.data.context")}
                   for d in r.inputs.dataset_inputs],
        "images": [a.path for a in c.list_artifacts(run_id, "images")]}
for v in versions:
    out["versions"][v] = c.get_model_version(name, v).description
print(json.dumps(out))
"""


@pytest.mark.slow
def test_the_ui_gets_training_runs_with_datasets_sources_and_decisions(server, registered):
    """After a second training run and registration, what the MLflow UI shows, read back with
    MlflowClient in another process: a model-training experiment, MLflow's source tags, the DVC
    version as each run's dataset digest (training and held-out evaluation inputs), the metrics
    that decide under the same names, the evaluation grid among the images, a note on each run
    and a description on each version with the gate's decision."""
    tmp = registered["tmp"] / "second"
    # another model, evaluated under another yardstick (6 sampler steps, not 8): the gate first
    # re-scores the champion from the registry under this run's yardstick
    cfg = stage_cfg(tmp, server["url"], "train.seed=1", f"extractor.path={registered['tmp'] / 'extractor.pt'}",
                    "evaluate.steps=6")
    trained = train_stage(cfg, progress=False, tags={"prefect_flow_run_id": "flow-run-5678"})
    metrics = evaluate_stage(cfg, progress=False)
    champion = MlflowClient(server["url"]).get_model_version_by_alias("digits-gen", CHAMPION)
    reg = register_stage(cfg, flow_run_id="flow-run-5678")
    assert reg["champion_rescored"] and reg["previous_champion"] == champion.version
    decided = MlflowClient(server["url"]).get_model_version("digits-gen", reg["version"]).tags
    assert decided["gate.champion_rescored"] == "true"
    assert decided["gate.champion_yardstick"] == champion.tags["gate.yardstick"] != metrics["yardstick"]
    # the re-scored FID is the champion's own evaluation under this yardstick, done independently
    # (its checkpoint is the first run's: every version so far holds those weights)
    parts = metrics["yardstick_parts"]
    again = evaluate(registered["tmp"] / "run" / "checkpoint.pt", dataclasses.replace(cfg, evaluate=dataclasses.replace(
        cfg.evaluate, precision=parts["precision"], metrics_path=str(tmp / "check" / "eval.json"),
        grid_path=str(tmp / "check" / "grid.png"))), load_extractor(cfg), progress=False)
    assert again["yardstick"] == metrics["yardstick"]
    assert float(decided["gate.champion_fid"]) == pytest.approx(again["fid"], rel=1e-6)
    assert float(decided["gate.champion_fid_std"]) == pytest.approx(again["fid_std"], rel=1e-6)
    # the alias follows the stated rule: promoted exactly when the lower bound clears the margin
    promoted = float(decided["gate.lower_bound"]) > cfg.tracking.champion_margin
    assert reg["alias"] == (CHAMPION if promoted else CHALLENGER) == decided["gate.decision"]
    runs = [registered["trained"]["mlflow_run_id"], trained["mlflow_run_id"]]
    versions = [registered["reg"]["version"], reg["version"]]
    done = subprocess.run([sys.executable, "-c", READ_BACK, server["url"], "digits-gen", ",".join(runs),
                           ",".join(versions)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.splitlines()[-1])
    assert seen["experiment"]["mlflow.experimentKind"] == "custom_model_development"
    version = metrics["dataset_version"]
    for run_id, job, steps in zip(runs, (False, True), (8, 6)):
        run = seen["runs"][run_id]
        tags = run["tags"]
        assert tags["mlflow.source.type"] == ("JOB" if job else "LOCAL") and tags["mlflow.source.name"]
        assert tags["mlflow.source.git.commit"] == tags["git_commit"].removesuffix("-dirty")
        assert {(i["name"], i["digest"], i["context"]) for i in run["inputs"]} == {
            ("digits-train", version, "training"), ("digits-heldout", version, "evaluation")}
        assert all(version.removesuffix(".dir")[2:] in i["source"] for i in run["inputs"])  # DVC remote copy
        assert {"fid", "fid_std", "fid_over_floor", "kid", "confident_share", "class_entropy_ratio"} \
            <= set(run["metrics"])
        assert run["params"]["evaluate.sampler"] == cfg.evaluate.sampler
        assert run["params"]["evaluate.steps"] == str(steps)
        assert any("evaluation_samples" in p for p in run["images"])     # the grid, by eye
        assert any(p.startswith("images/samples") for p in run["images"])  # per-checkpoint grids
        assert tags["mlflow.note.content"].startswith("Registered as digits-gen version ")
    for v, alias, steps in zip(versions, (CHAMPION, reg["alias"]), (8, 6)):
        text = seen["versions"][v]
        assert text.startswith(f"**{alias}**") and "FID " in text
        assert f"{steps} steps" in text and version in text and "floor" in text


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="needs Debian's chromium (apt-get install chromium) for headless screenshots")
def test_ui_screenshot_script_captures_the_four_views(server, registered, tmp_path):
    from PIL import Image
    done = subprocess.run([sys.executable, str(REPO / "bench" / "ui_screenshots.py"), "--tracking-uri",
                           server["url"], "--experiment", "t", "--model", "digits-gen",
                           "--out", str(tmp_path), "--wait-ms", "6000"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    for name in ("runs", "run", "compare", "model"):
        with Image.open(tmp_path / f"{name}.png") as shot:
            pixels = np.asarray(shot.convert("L"))
        assert shot.size == (1500, 1000) and pixels.std() > 5, name     # a rendered page, not blank
