"""The champion gate on a real MLflow registry (the embedded SQLite store) with synthetic
features of known quality: serialised decisions, duplicate refusal, a champion that cannot be
re-scored, bad input, and rollback (API and CLI). The re-scoring of a real champion under another
yardstick runs against an `mlflow server` in tests/test_mlflow.py."""

import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from diffusion.config import load_config
from diffusion.evaluate import Reference, save_features, yardstick
from flows.registry import CHALLENGER, CHAMPION, GateError, register, rollback
from flows.tracking import client_for, experiment_id, tracking_uri

REPO = Path(__file__).resolve().parents[1]
D, N, SEEDS = 16, 200, 2
PARTS = {"extractor_sha256": "e" * 64, "reference": "r" * 64, "dataset_version": "abc.dir",
         "sampler": "unipc", "steps": 8, "spacing": "linspace", "eta": 0.0, "guidance_scale": 1.5,
         "clip_denoised": True, "samples_per_seed": N, "seeds": SEEDS, "seed": 0, "precision": "fp32"}
RNG = np.random.default_rng(0)
_A = RNG.normal(size=(D, D)) / np.sqrt(D)
SIGMA = _A @ _A.T + 0.2 * np.eye(D)
MU = RNG.normal(size=D)
NOISE = RNG.normal(size=(SEEDS, N, D)) @ np.linalg.cholesky(SIGMA).T     # shared: paired rows


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory):
    """One SQLite store for the module (creating its tables takes about 15 s on 2 cores)."""
    root = tmp_path_factory.mktemp("gate")
    cfg = load_config(None, [f"tracking.local_dir={root / 'mlflow'}", "tracking.experiment=gate"])
    return tracking_uri(cfg), root


@pytest.fixture
def store(shared_store, request, tmp_path):
    """The shared store, with a registered model of this test's own (``gate-<test name>``)."""
    uri, root = shared_store
    name = "gate-" + request.node.name.removeprefix("test_")[:40].replace("_", "-")
    cfg = load_config(None, [f"tracking.local_dir={root / 'mlflow'}", f"tracking.model_name={name}",
                             "tracking.experiment=gate"])
    return cfg, uri, tmp_path


def candidate(store, shift: float, parts: dict = PARTS, digest: str | None = None):
    """A training run with a model directory and features ``shift`` away from the reference in
    every dimension (FID about D * shift^2): the register() arguments of one evaluated model."""
    cfg, uri, tmp = store
    client = client_for(uri)
    run = client.create_run(experiment_id(client, cfg)).info
    model = tmp / f"model-{run.run_id}"
    model.mkdir()
    (model / "MLmodel").write_text("artifact_path: generator\n")
    client.log_artifacts(run.run_id, str(model), "generator")
    path = tmp / f"eval-{run.run_id}" / "eval.features.npz"
    stick = yardstick(parts)
    save_features(path, NOISE + MU + shift, Reference("k", MU, SIGMA, np.zeros((0, D)), 0), stick)
    return dict(model_uri=f"{run.artifact_uri}/generator", run_id=run.run_id,
                evaluation={"fid": D * shift ** 2, "fid_std": 0.0, "yardstick_parts": parts},
                features_file=path, lineage={"checkpoint_step": "1"},
                weights_sha256=digest or uuid.uuid4().hex)


def versions(store):
    cfg, uri, _ = store
    return sorted(int(v.version) for v in
                  client_for(uri).search_model_versions(f"name = '{cfg.tracking.model_name}'"))


def champion(store) -> str:
    cfg, uri, _ = store
    return str(client_for(uri).get_model_version_by_alias(cfg.tracking.model_name, CHAMPION).version)


def tags_of(store, version) -> dict:
    cfg, uri, _ = store
    return client_for(uri).get_model_version(cfg.tracking.model_name, str(version)).tags


def test_two_registrations_at_once_the_better_one_ends_champion(store):
    """The worse model decides first and is slow to move the alias; the better one starts
    meanwhile. Without the lock the better one reads the old champion, promotes itself, and the
    worse one then overwrites the alias."""
    cfg, uri, _ = store
    first = register(uri, cfg, **candidate(store, 0.6))
    assert first.alias == CHAMPION and "no champion yet" in first.reason
    worse, better = candidate(store, 0.3), candidate(store, 0.0)
    deciding, results = threading.Event(), {}

    def slow(alias):
        deciding.set()
        time.sleep(3)

    t_worse = threading.Thread(target=lambda: results.update(worse=register(uri, cfg, **worse, on_decided=slow)))
    t_better = threading.Thread(target=lambda: results.update(better=register(uri, cfg, **better)))
    t_worse.start()
    assert deciding.wait(60)
    t_better.start()
    t_worse.join(120)
    t_better.join(120)
    assert results["worse"].alias == CHAMPION and results["worse"].previous_champion == first.version
    assert results["better"].alias == CHAMPION
    assert results["better"].previous_champion == results["worse"].version      # decided after it
    assert champion(store) == results["better"].version
    tags = tags_of(store, champion(store))
    assert float(tags["gate.lower_bound"]) > 0 and tags["gate.champion_rescored"] == "false"
    assert tags["gate.yardstick"] == yardstick(PARTS) and tags["gate.confidence"] == "0.95"
    assert float(tags["gate.champion_fid"]) == pytest.approx(D * 0.3 ** 2, rel=0.5)


def test_an_equal_model_stays_challenger_and_the_same_weights_are_not_registered_twice(store):
    cfg, uri, _ = store
    first = register(uri, cfg, **candidate(store, 0.3, digest="w" * 64))
    equal = register(uri, cfg, **candidate(store, 0.3))            # the same samples: gain 0
    assert equal.alias == CHALLENGER and "does not beat" in equal.reason
    before = versions(store)
    again = register(uri, cfg, **candidate(store, 0.0, digest="w" * 64))
    assert again.duplicate_of == first.version and "already registered as version 1" in again.reason
    assert versions(store) == before and champion(store) == first.version


def test_a_champion_that_cannot_be_rescored_is_an_error_and_changes_nothing(store):
    cfg, uri, _ = store
    register(uri, cfg, **candidate(store, 0.6))
    other = dict(PARTS, steps=20)                                  # another yardstick: re-score
    before = versions(store)
    with pytest.raises(GateError, match="cannot be re-scored"):
        register(uri, cfg, **candidate(store, 0.0, parts=other))
    assert versions(store) == before and champion(store) == "1"


def test_bad_evaluation_input_names_the_missing_part(store):
    cfg, uri, _ = store
    args = candidate(store, 0.1)
    args["evaluation"]["yardstick_parts"] = {k: v for k, v in PARTS.items() if k != "precision"}
    with pytest.raises(GateError, match="precision"):
        register(uri, cfg, **args)
    args = candidate(store, 0.1)
    args["evaluation"]["yardstick_parts"] = dict(PARTS, steps=9)    # metrics and features disagree
    with pytest.raises(GateError, match="re-run the evaluate stage"):
        register(uri, cfg, **args)
    assert versions(store) == []


@pytest.mark.slow
def test_rollback_moves_the_champion_back_and_records_why(store):
    cfg, uri, _ = store
    register(uri, cfg, **candidate(store, 0.6))
    assert register(uri, cfg, **candidate(store, 0.0)).alias == CHAMPION
    name = cfg.tracking.model_name
    done = rollback(uri, name, "1", "v2 blurs the 7s", who="ana")
    assert done["changed"] and done["previous_champion"] == "2" and champion(store) == "1"
    back, away = tags_of(store, 1), tags_of(store, 2)
    assert back["rollback.from"] == "2" and back["rollback.reason"] == "v2 blurs the 7s"
    assert back["rollback.by"] == "ana" and back["rollback.at"].endswith("+00:00")
    assert away["rolled_back.to"] == "1" and away["rolled_back.reason"] == "v2 blurs the 7s"
    for bad, message in (("9", "has no version 9"), ("models:/other-model/1", f"not of '{name}'"),
                         ("latest", "expected a version number")):
        with pytest.raises(GateError, match=message):
            rollback(uri, name, bad, "why")
    assert champion(store) == "1"
    # the command line: exit 2 with the reason for a bad version, the alias unchanged; then a good one
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    cli = [sys.executable, "-m", "flows.registry", "rollback", f"tracking.local_dir={Path(uri[10:]).parent}",
           f"tracking.model_name={name}", "tracking.experiment=gate"]
    bad = subprocess.run(cli + ["--to", "7", "--reason", "x"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and f"model '{name}' has no version 7" in bad.stderr
    assert champion(store) == "1"
    good = subprocess.run(cli + ["--to", "2", "--reason", "fixed upstream"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert good.returncode == 0, good.stderr
    assert champion(store) == "2"
    assert tags_of(store, 2)["rollback.reason"] == "fixed upstream"
