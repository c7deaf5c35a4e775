"""The extractor, train and evaluate stages through their entry points, on real digits."""

import json
import os

import pytest

from diffusion.config import load_config
from flows.stages import evaluate_stage, extractor_stage, main, register_stage, train_stage
from tests.helpers import digits_dir


def stage_cfg(tmp_path, *extra):
    return load_config(None, [
        "data.source=digits", "data.resolution=8", f"data.prepared_dir={digits_dir()}",
        "model.preset=tiny", "model.num_classes=10",
        f"extractor.path={tmp_path / 'extractor.pt'}", "extractor.epochs=20", "extractor.min_accuracy=0.8",
        "train.steps=6", "train.batch_size=32", f"train.out_dir={tmp_path / 'run'}",
        "evaluate.fid_samples=120", "evaluate.fid_seeds=2", "evaluate.steps=10",
        "evaluate.kid_subset_size=100", f"evaluate.reference_cache={tmp_path / 'refs'}",
        f"evaluate.metrics_path={tmp_path / 'metrics' / 'eval.json'}",
        f"evaluate.grid_path={tmp_path / 'metrics' / 'samples.png'}",
        "ray.enabled=false", f"tracking.local_dir={tmp_path / 'mlflow'}", "tracking.grid_images=0",
        *extra])


@pytest.mark.slow(minutes=1)
def test_extractor_train_evaluate(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)    # the embedded default store
    cfg = stage_cfg(tmp_path)
    ext = extractor_stage(cfg, progress=False)
    assert ext["heldout_accuracy"] >= 0.8 and len(ext["sha256"]) == 64
    train_stage(cfg, progress=False)
    m = evaluate_stage(cfg, progress=False)
    assert m["seeds"] == 2 and len(m["fid_per_seed"]) == 2 and m["fid_std"] >= 0
    # a 6-step model is far from the data; two real splits are close
    assert m["fid"] > 3 * m["floor_fid"] and m["fid_over_floor"] > 3
    assert m["extractor_sha256"] == ext["sha256"] and m["dataset_version"].endswith(".dir")
    assert m["reference_cache_hit"] is False
    # recognisability over both seeds' samples, by the same domain classifier
    assert m["quality_samples"] == 2 * m["samples_per_seed"]
    assert 0 <= m["confident_share"] <= 1 and 0 <= m["class_entropy_ratio"] <= 1
    assert 0 <= m["label_agreement"] <= 1 and m["sampling_seconds"] > 0
    on_disk = json.loads((tmp_path / "metrics" / "eval.json").read_text())
    assert on_disk["fid"] == m["fid"] and (tmp_path / "metrics" / "samples.png").exists()
    again = evaluate_stage(cfg, progress=False)
    assert again["reference_cache_hit"] is True and again["fid"] == pytest.approx(m["fid"])
    # register into the embedded store (SQLite under tracking.local_dir); MLflow's process-wide
    # tracking URI is borrowed for the call and given back
    before = os.environ.get("MLFLOW_TRACKING_URI")
    reg = register_stage(cfg)
    assert reg["alias"] == "champion" and reg["version"] == "1"
    assert reg["tracking_uri"] == f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    assert os.environ.get("MLFLOW_TRACKING_URI") == before


def test_extractor_below_min_accuracy_fails_the_stage(tmp_path, capsys):
    rc = main(["extractor", "--params", "params.yaml", "data.source=digits", "data.resolution=8",
               f"data.prepared_dir={digits_dir()}", "model.preset=tiny",
               f"extractor.path={tmp_path / 'e.pt'}", "extractor.epochs=1", "extractor.min_accuracy=0.99"])
    assert rc == 2
    assert "extractor stage: extractor.min_accuracy = 0.99: the domain classifier reached only" \
        in capsys.readouterr().err
    assert not (tmp_path / "e.pt").exists()


def test_evaluate_names_what_is_missing(tmp_path, capsys):
    args = ["evaluate", "--params", "params.yaml", "data.source=digits", "data.resolution=8",
            f"data.prepared_dir={digits_dir()}", "model.preset=tiny", f"train.out_dir={tmp_path / 'none'}"]
    assert main(args + [f"extractor.path={tmp_path / 'x.pt'}"]) == 2
    assert "x.pt: domain extractor not found; run the extractor stage first" in capsys.readouterr().err
    cfg = stage_cfg(tmp_path)
    extractor_stage(cfg, progress=False)
    assert main(args + [f"extractor.path={tmp_path / 'extractor.pt'}"]) == 2
    assert "checkpoint.pt: checkpoint file not found" in capsys.readouterr().err


def test_register_names_what_is_missing_or_stale(tmp_path, capsys):
    base = ["register", "--params", "params.yaml", f"train.out_dir={tmp_path / 'run'}",
            f"evaluate.metrics_path={tmp_path / 'eval.json'}", f"tracking.local_dir={tmp_path / 'ml'}"]
    assert main(base) == 2
    assert "run.json: not found; run the train stage first" in capsys.readouterr().err
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text(json.dumps(
        {"step": 99, "mlflow_run_id": "x", "tracking_uri": f"sqlite:///{tmp_path / 'ml.db'}"}))
    assert main(base) == 2
    assert "eval.json: not found; run the evaluate stage first" in capsys.readouterr().err
    (tmp_path / "eval.json").write_text(json.dumps(
        {"fid": 1.0, "fid_std": 0.1, "checkpoint_step": 6, "dataset_version": "d.dir",
         "extractor_sha256": "e"}))
    assert main(base) == 2
    err = capsys.readouterr().err
    assert "evaluates step 6 but" in err and "trained to step 99; re-run the evaluate stage" in err
    assert not (tmp_path / "registry.json").exists()                 # nothing was registered


def _colour_folder(root, per_class=40):
    """Three classes of 40x40 RGB images, each class its own dominant colour plus seeded noise."""
    from PIL import Image
    import numpy as np
    rng = np.random.default_rng(0)
    for c, colour in enumerate(((200, 40, 40), (40, 200, 40), (40, 40, 200))):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            arr = np.clip(np.array(colour) + rng.normal(0, 40, (40, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / f"class{c}" / f"{i:03d}.png")
    return root


@pytest.mark.slow
def test_colour_folder_prepares_trains_evaluates_and_registers(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    folder = _colour_folder(tmp_path / "images")
    overrides = ["data.source=folder", f"data.path={folder}", "data.resolution=32", "data.channels=3",
                 f"data.prepared_dir={tmp_path / 'prepared'}", f"data.validation_dir={tmp_path / 'val'}",
                 "model.preset=rgb_small", "model.num_classes=3", "extractor.epochs=8",
                 "extractor.min_accuracy=0.9", "train.steps=4", "train.batch_size=8",
                 "evaluate.fid_samples=60", "evaluate.fid_seeds=1", "evaluate.steps=4",
                 "evaluate.kid_subset_size=30"]
    for stage in ("prepare", "validate"):
        assert main([stage, "--params", "params.yaml", *overrides]) == 0, capsys.readouterr().err
    cfg = stage_cfg(tmp_path, *overrides)
    assert extractor_stage(cfg, progress=False)["heldout_accuracy"] >= 0.9
    train_stage(cfg, progress=False)
    m = evaluate_stage(cfg, progress=False)
    assert m["samples_per_seed"] == 60 and m["fid"] > 0 and m["floor_fid"] >= 0
    reg = register_stage(cfg)
    assert reg["version"] == "1" and reg["alias"] == "champion"
    # the GPU preset builds and takes a training step on the same colour data
    big = stage_cfg(tmp_path, *overrides, "model.preset=ddpm_cifar10", "train.steps=1",
                    "train.batch_size=2", f"train.out_dir={tmp_path / 'run-cifar'}")
    assert train_stage(big, progress=False)["step"] == 1
