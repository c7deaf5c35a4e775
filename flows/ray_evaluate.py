"""The evaluate stage as a Ray task on a GPU of the cluster, for a driver without one (a laptop
or a CPU head node driving a GPU cluster through ``RAY_ADDRESS``).

The task gets everything by value or by version, like the training workers: the checkpoint and
the extractor file travel as bytes through Ray's object store, the prepared data by its DVC
version (:func:`flows.datasets.obtain`), and the code is checked against the driver's digest.
It runs :func:`diffusion.evaluate.evaluate` on the GPU and returns the metrics and the sample
grid, which the driver writes to ``evaluate.metrics_path`` / ``evaluate.grid_path`` exactly as a
local evaluation would. The reference statistics are computed there (the driver's cache stays
as it is).
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import tempfile
from pathlib import Path

import ray
import torch

from diffusion.checkpoint import CheckpointError
from diffusion.config import Config, ConfigError, config_from_dict
from flows.datasets import Remote, obtain


def wanted(cfg: Config) -> bool:
    """Evaluate on the cluster: the driver has no CUDA device, training runs on Ray at
    ``RAY_ADDRESS`` and may use GPUs (``train.device`` not cpu, ``ray.use_gpu`` not false),
    and the cluster has a GPU."""
    if torch.cuda.is_available() or not cfg.ray.enabled or not os.environ.get("RAY_ADDRESS"):
        return False
    if cfg.train.device == "cpu" or cfg.ray.use_gpu is False:
        return False
    from flows.ray_train import init_ray
    init_ray()
    return ray.cluster_resources().get("GPU", 0) >= 1


def _evaluate_on_worker(cfg_dict: dict, code: dict, data: dict, checkpoint: bytes,
                        extractor_file: bytes, use_gpu: bool) -> dict:
    from diffusion.evaluate import evaluate, features_path
    from diffusion.hardware import device_description
    from flows.ray_train import _check_code, check_gpu
    from flows.stages import load_extractor
    _check_code(code)
    if use_gpu:
        check_gpu()
    cfg = config_from_dict(cfg_dict, "evaluate task config")
    got = obtain(data["version"], cfg.data.prepared_dir,
                 Remote(**data["remote"]) if data.get("remote") else None)
    with tempfile.TemporaryDirectory(prefix="ddpm-evaluate-") as tmp:
        work = Path(tmp)
        (work / "checkpoint.pt").write_bytes(checkpoint)
        (work / "extractor.pt").write_bytes(extractor_file)
        local = dataclasses.replace(
            cfg,
            data=dataclasses.replace(cfg.data, prepared_dir=str(got.path)),
            train=dataclasses.replace(cfg.train, out_dir=str(work)),
            extractor=dataclasses.replace(cfg.extractor, path=str(work / "extractor.pt")),
            evaluate=dataclasses.replace(cfg.evaluate, metrics_path=str(work / "eval.json"),
                                         grid_path=str(work / "samples.png"),
                                         reference_cache=str(work / "reference")))
        device = torch.device("cuda" if use_gpu else "cpu")
        setup: dict = {}
        metrics = evaluate(work / "checkpoint.pt", local, load_extractor(local), progress=False,
                           device=device, on_setup=setup.update)
        return {"metrics": metrics, "grid": (work / "samples.png").read_bytes(),
                "features": features_path(work / "eval.json").read_bytes(),
                "setup": {**setup, "device_description": device_description(device),
                          "node": socket.gethostname()}}


def remote_evaluate(cfg: Config, *, use_gpu: bool = True, dataset: str | None = None) -> tuple[dict, dict]:
    """Run the evaluate stage as one Ray task holding a GPU (``use_gpu``; without, a CPU: the
    same path, as the tests run it) and write its results where the local stage would. Returns
    (metrics, setup: the sampling choices and the device they ran on)."""
    from flows.ray_train import WORKER_SETUP_ERRORS, _git_commit, code_version, data_source, init_ray
    init_ray()
    out = Path(cfg.train.out_dir) / "checkpoint.pt"
    task = ray.remote(num_cpus=1, num_gpus=1 if use_gpu else 0, max_retries=0,
                      max_calls=1)(_evaluate_on_worker)            # the process exits: the GPU is freed
    cfg_dict = dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, prepared_dir=str(Path(cfg.data.prepared_dir).absolute()))
    ).to_dict()
    try:
        result = ray.get(task.remote(cfg_dict, {**code_version(), "git": _git_commit()},
                                     data_source(cfg, dataset), out.read_bytes(),
                                     Path(cfg.extractor.path).read_bytes(), use_gpu))
    except ray.exceptions.RayTaskError as exc:     # the task's own error, as the task said it
        if isinstance(exc.cause, (ConfigError, CheckpointError, *WORKER_SETUP_ERRORS)):
            raise exc.cause from None
        raise
    from diffusion.evaluate import features_path
    ev = cfg.evaluate
    for path in (ev.metrics_path, ev.grid_path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(ev.grid_path).write_bytes(result["grid"])
    features_path(ev.metrics_path).write_bytes(result["features"])
    Path(ev.metrics_path).write_text(json.dumps(result["metrics"], indent=2) + "\n")
    return result["metrics"], result["setup"]
