"""Ray Train DDP through a real local Ray cluster (gloo on CPU)."""

import json
import os
import time

import pytest
import torch

from diffusion.checkpoint import load_checkpoint
from diffusion.config import ConfigError, load_config
from diffusion.data import load_dataset
from diffusion.trainer import train
from tests.helpers import digits_dir

ray = pytest.importorskip("ray")
from flows.ray_train import GpuUnavailable, ray_run_name, ray_train  # noqa: E402

BASE = ["data.source=digits", "data.resolution=8", f"data.prepared_dir={digits_dir()}",
        "model.preset=tiny", "train.checkpoint_every=2", "train.log_every=2", "train.warmup_steps=2"]


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.pop("RAY_ADDRESS", None)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_two_workers_match_one_process_with_double_batch(tmp_path):
    # 2 workers x batch 8 train on exactly the samples of 1 process x batch 16 (the library draws
    # every step's samples for the whole global batch); DDP averages the same gradients, so the
    # weights agree to float rounding (tolerance 1e-5). Inside the run, every rank's weights are
    # compared by checksum and the run fails if any rank differs. The 2 workers are the defaults
    # (ray.use_gpu and ray.num_workers auto) on this machine's cluster, which has no GPU.
    # (Re-running the same run name continues it: tests/test_cluster_data.py, resumed from S3.)
    # On a GPU machine auto would pick one GPU worker: there the CPU workers are asked for.
    events = []
    cpu = ["ray.use_gpu=false", "ray.num_workers=2"] if torch.cuda.is_available() else []
    cfg = load_config(None, BASE + cpu + ["train.steps=4", "train.batch_size=8",
                                          f"ray.storage_path={tmp_path / 'ray'}", "ray.run_name=r1",
                                          f"train.out_dir={tmp_path / 'out'}"])
    # the job's own SIGTERM and SIGINT handlers (flows/interrupts.py) outlive ray.init, which
    # installs one that exits, and Ray Train's fit(), which installs one that kills the workers
    import signal
    ours = {sig: (lambda signum, frame: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    before = {sig: signal.signal(sig, handler) for sig, handler in ours.items()}
    ray.shutdown()                                      # init_ray starts the cluster under them
    try:
        result = ray_train(cfg, on_event=events.append, should_stop=lambda: False)
        assert {sig: signal.getsignal(sig) for sig in ours} == ours
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
    assert result.step == 4 and result.checkpoint.exists() and result.stopped_by == "steps"
    assert [e for e in events if e["kind"] == "scaling"] == [{
        "kind": "scaling", "workers": 2, "use_gpu": False,
        "reason": "2 CPU workers (as configured; ray.use_gpu = false)" if cpu else
        "2 CPU workers (the CPU default; no GPUs in this machine's local Ray cluster)"}]
    assert result.hardware["ray_use_gpu"] is False and result.hardware["world_size"] == 2
    assert result.hardware["device"] == "cpu" and result.hardware["dist_backend"] == "gloo"
    single_cfg = load_config(None, BASE + ["train.steps=4", "train.batch_size=16",
                                           f"train.out_dir={tmp_path / 'single'}"])
    single = train(single_cfg, load_dataset(single_cfg.data), progress=False)
    a = load_checkpoint(result.checkpoint)["model"]
    b = single.state.model.state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in b) < 1e-5
    losses = [json.loads(line)["loss"] for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert losses == pytest.approx([h["loss"] for h in single.history], rel=1e-4)


def test_a_start_begun_early_is_waited_for_outlives_its_thread_and_none_begins_after_stop():
    # the pipeline begins Ray's start in a thread as the flow begins (flows/ray_early.py): the
    # stage's init_ray waits for it instead of starting a second cluster, the cluster keeps
    # working after that start returned (Ray ties it to the starting thread), and the job's
    # teardown shuts it down; an early start after the teardown starts nothing
    from flows import ray_early
    from flows.ray_train import init_ray, start_early
    ray.shutdown()
    early = ray_early.start()
    deadline = time.time() + 60
    while not ray_early.LOCK.locked() and not ray.is_initialized() and time.time() < deadline:
        time.sleep(0.01)                     # the thread has imported and holds the start
    assert init_ray() is False               # waited; the early thread started it
    assert ray.is_initialized() and early.is_alive()
    assert ray.get(ray.remote(lambda: 41).remote(), timeout=120) + 1 == 42
    ray_early.stop()
    assert not ray.is_initialized() and ray_early.STOPPED.is_set()
    start_early()                            # returns at once: the job is being torn down
    assert not ray.is_initialized()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without GPUs")
def test_use_gpu_true_without_gpus_fails_before_ray_train_waits(tmp_path):
    # the real local cluster (this machine: no GPU) is asked for GPU workers: an error naming what
    # is missing, at once, and no Ray Train run was started (no run directory)
    cfg = load_config(None, BASE + ["train.steps=2", "ray.use_gpu=true", f"ray.storage_path={tmp_path / 'ray'}",
                                    f"train.out_dir={tmp_path / 'out'}"])
    with pytest.raises(ConfigError, match=r"ray.use_gpu = true: this machine's local Ray cluster has 0 "
                                          r"GPUs and a worker needs 1"):
        ray_train(cfg)
    assert not (tmp_path / "ray").exists()


def test_evaluate_as_a_ray_task_writes_what_the_local_stage_writes(tmp_path):
    # the path a GPU-less driver takes to a cluster's GPU (flows/ray_evaluate.py), here on a CPU
    # worker: checkpoint and extractor by value, data by version, the driver writes the results
    from diffusion.evaluate import evaluate
    from diffusion.features import save_classifier, train_classifier
    from diffusion.data import load_prepared
    from flows.ray_evaluate import remote_evaluate
    from flows.stages import load_extractor
    model, acc = train_classifier(load_prepared(digits_dir(), "train"), load_prepared(digits_dir(), "heldout"),
                                  epochs=2, progress=False)
    save_classifier(model, tmp_path / "extractor.pt", {"heldout_accuracy": acc})
    common = BASE + ["train.steps=2", "train.batch_size=16", f"train.out_dir={tmp_path / 'out'}",
                     f"extractor.path={tmp_path / 'extractor.pt'}", "evaluate.fid_samples=32",
                     "evaluate.fid_seeds=1", "evaluate.kid_subset_size=16", "evaluate.steps=4",
                     "evaluate.precision=fp32", "evaluate.memory_format=contiguous"]
    cfg = load_config(None, common + [f"evaluate.metrics_path={tmp_path / 'local' / 'eval.json'}",
                                      f"evaluate.grid_path={tmp_path / 'local' / 'grid.png'}",
                                      f"evaluate.reference_cache={tmp_path / 'ref'}"])
    train(cfg, load_dataset(cfg.data), progress=False)
    local = evaluate(tmp_path / "out" / "checkpoint.pt", cfg, load_extractor(cfg), progress=False)
    remote_cfg = load_config(None, common + [f"evaluate.metrics_path={tmp_path / 'remote' / 'eval.json'}",
                                             f"evaluate.grid_path={tmp_path / 'remote' / 'grid.png'}",
                                             f"evaluate.reference_cache={tmp_path / 'ref2'}"])
    metrics, setup = remote_evaluate(remote_cfg, use_gpu=False)
    assert setup["precision"] == "fp32" and setup["node"]
    from PIL import Image
    with Image.open(tmp_path / "remote" / "grid.png") as a, Image.open(tmp_path / "local" / "grid.png") as b:
        assert a.size == b.size and a.mode == b.mode
    assert json.loads((tmp_path / "remote" / "eval.json").read_text()) == metrics
    assert metrics["checkpoint_step"] == local["checkpoint_step"] == 2
    assert metrics["extractor_sha256"] == local["extractor_sha256"]
    for key in ("fid", "kid", "floor_fid", "confident_share"):
        assert metrics[key] == pytest.approx(local[key], rel=1e-6, abs=1e-9), key
    assert not (tmp_path / "ref2").exists()        # the task's reference statistics stay there


def _worker_pids(marker: str) -> list[int]:
    """Ray Train workers of this test's own cluster (its processes inherit ``marker`` in their
    environment; a test running beside this one has Ray Train workers of its own)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if b"RayTrainWorker" not in f.read():
                        continue
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if marker.encode() in f.read().split(b"\0"):
                        pids.append(int(entry))
            except OSError:
                pass
    return pids


def _registered_checkpoint(snapshot):
    try:
        return json.loads(snapshot.read_text()).get("latest_checkpoint_result") is not None
    except (OSError, ValueError):
        return False


@pytest.mark.slow
def test_sigkilled_worker_resumes_from_last_checkpoint(tmp_path):
    import signal
    import threading
    import time
    import uuid
    ray.shutdown()
    marker = f"DDPM_TEST_CLUSTER={uuid.uuid4().hex}"     # the cluster started below inherits it
    os.environ["DDPM_TEST_CLUSTER"] = marker.split("=")[1]
    cfg = load_config(None, BASE + ["train.steps=400", "train.batch_size=32", "train.checkpoint_every=25",
                                    "train.log_every=25", "ray.num_workers=2", "ray.max_failures=2",
                                    f"ray.storage_path={tmp_path / 'ray'}", "ray.run_name=ft",
                                    f"train.out_dir={tmp_path / 'out'}"])
    stale = set(_worker_pids(marker))                           # workers of earlier tests still exiting
    box = {}
    thread = threading.Thread(target=lambda: box.update(result=ray_train(cfg)), daemon=True)
    thread.start()
    snapshot = tmp_path / "ray" / ray_run_name(cfg) / "checkpoint_manager_snapshot.json"
    deadline = time.time() + 240
    # a checkpoint directory can exist before the controller has registered it; wait until Ray's
    # own checkpoint-manager snapshot (what a restart reads) names a latest checkpoint
    while time.time() < deadline and not _registered_checkpoint(snapshot):
        time.sleep(0.2)
    assert _registered_checkpoint(snapshot), "no checkpoint was registered in time"
    pids = [p for p in _worker_pids(marker) if p not in stale]
    assert pids, "no RayTrainWorker process found"
    os.kill(pids[-1], signal.SIGKILL)                     # like a spot pre-emption or the OOM killer
    thread.join(timeout=400)
    assert "result" in box, "the run did not finish after the worker was killed"
    result = box["result"]
    assert result.step == 400                              # exactly the configured steps
    # the final attempt started from a reported checkpoint, so at most one interval was redone
    assert result.metrics["resumed_from"] >= 25 and result.metrics["resumed_from"] % 25 == 0


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where torch sees no CUDA device")
def test_a_gpu_that_torch_cannot_see_is_named_not_a_stack_trace(tmp_path):
    # a Ray node that declares a GPU on a machine whose torch has no CUDA (a CPU image on a GPU
    # node, a missing driver): use_gpu auto picks the GPU, and the run stops with the sentence
    ray.shutdown()
    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False)
    try:
        cfg = load_config(None, BASE + ["train.steps=2", f"ray.storage_path={tmp_path / 'ray'}",
                                        f"train.out_dir={tmp_path / 'out'}"])
        with pytest.raises(GpuUnavailable, match=r"^Ray gave this worker a GPU \(node .*, GPU ids 0, "
                                                 r"CUDA_VISIBLE_DEVICES=0\) but torch sees no CUDA device: "
                                                 r"torch \S+ (is a build without CUDA|\(CUDA .*\) finds no "
                                                 r"usable device)"):
            ray_train(cfg)
        assert not (tmp_path / "ray").exists()            # before Ray Train started
    finally:
        ray.shutdown()
