"""ray.use_gpu / ray.num_workers: ``auto`` resolved from the cluster's resources, explicit values
checked against them, and the sentence for a worker that got a GPU torch cannot see (units; the
same paths on a real Ray cluster are in tests/test_ray.py)."""

import pytest

from diffusion.config import ConfigError, load_config

pytest.importorskip("ray")
from flows.ray_train import gpu_problem, resolve_scaling  # noqa: E402

LOCAL = "this machine's local Ray cluster"


def scaling(resources, *overrides):
    return resolve_scaling(load_config(None, list(overrides)), resources, cluster=LOCAL)


def test_defaults_are_auto():
    cfg = load_config("params.yaml")
    assert cfg.ray.use_gpu == "auto" and cfg.ray.num_workers == "auto"


@pytest.mark.parametrize("resources, overrides, workers, gpu", [
    ({"CPU": 2.0}, [], 2, False),                                   # CPU cluster: the 2 CPU workers
    ({"CPU": 16.0, "GPU": 1.0}, [], 1, True),                       # one H200 box: one GPU worker
    ({"CPU": 64.0, "GPU": 8.0}, [], 8, True),                       # one worker per GPU
    ({"CPU": 64.0, "GPU": 8.0}, ["ray.gpus_per_worker=2"], 4, True),
    ({"CPU": 64.0, "GPU": 1.0}, ["ray.gpus_per_worker=2"], 2, False),  # not one worker's worth
    ({"CPU": 64.0, "GPU": 8.0}, ["ray.num_workers=3"], 3, True),
    ({"CPU": 16.0, "GPU": 1.0}, ["ray.num_workers=2"], 2, False),   # auto: not every worker fits
    ({"CPU": 64.0, "GPU": 8.0}, ["ray.use_gpu=false"], 2, False),
    ({"CPU": 64.0, "GPU": 8.0}, ["train.device=cpu"], 2, False),
    ({"CPU": 64.0, "GPU": 4.0}, ["ray.use_gpu=true"], 4, True),
])
def test_auto_resolves_from_cluster_resources(resources, overrides, workers, gpu):
    s = scaling(resources, *overrides)
    assert (s.num_workers, s.use_gpu) == (workers, gpu)
    assert s.reason.startswith(f"{workers} {'GPU' if gpu else 'CPU'} worker")


@pytest.mark.parametrize("resources, overrides, message", [
    ({"CPU": 2.0}, ["ray.use_gpu=true"],
     r"ray.use_gpu = true: this machine's local Ray cluster has 0 GPUs and a worker needs 1"),
    ({"CPU": 8.0, "GPU": 2.0}, ["ray.use_gpu=true", "ray.num_workers=4"],
     r"has 2 GPUs and ray.num_workers x ray.gpus_per_worker = 4 are needed"),
    ({"CPU": 2.0}, ["train.device=cuda"], r"train.device = 'cuda': .* has 0 GPUs"),
    ({"CPU": 8.0, "GPU": 2.0}, ["train.device=cuda", "ray.use_gpu=false"], r"request no GPU see none"),
    ({"CPU": 8.0, "GPU": 2.0}, ["ray.use_gpu=true", "train.device=cpu"], r"hold GPUs and not use them"),
    ({"CPU": 8.0, "GPU": 2.0}, ["ray.use_gpu=true", "ray.gpus_per_worker=0"], r"gpus_per_worker = 0"),
])
def test_impossible_gpu_requests_fail_with_what_is_missing(resources, overrides, message):
    with pytest.raises(ConfigError, match=message):
        scaling(resources, *overrides)


@pytest.mark.parametrize("value", ["maybe", "0.5", "[1]"])
def test_bad_values_are_refused_at_load(value):
    with pytest.raises(ConfigError, match=r"ray.use_gpu = .*expected one of 'auto' or true or false"):
        load_config(None, [f"ray.use_gpu={value}"])
    with pytest.raises(ConfigError, match=r"ray.num_workers = .*expected one of 'auto' or an integer"):
        load_config(None, [f"ray.num_workers={value}"])


def test_num_workers_range_still_checked():
    with pytest.raises(ConfigError, match=r"ray.num_workers = 0: must be >= 1"):
        load_config(None, ["ray.num_workers=0"])


def test_gpu_problem_sentence():
    seen = {"node": "n1", "ray_gpu_ids": ["0"], "visible": "0", "cuda": False, "devices": [],
            "torch": "2.13.0+cpu", "torch_cuda": "none"}
    text = gpu_problem(seen)
    assert text.startswith("Ray gave this worker a GPU (node n1, GPU ids 0, CUDA_VISIBLE_DEVICES=0) "
                           "but torch sees no CUDA device: torch 2.13.0+cpu is a build without CUDA")
    assert "driver" in gpu_problem({**seen, "torch": "2.11.0+cu130", "torch_cuda": "13.0"})
    assert gpu_problem({**seen, "cuda": True, "devices": ["NVIDIA H200"]}) is None
    assert gpu_problem({**seen, "ray_gpu_ids": []}) is None       # no GPU given: nothing to say
