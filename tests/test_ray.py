"""Ray Train DDP through a real local Ray cluster (gloo on CPU)."""

import json
import os

import pytest
import torch

from diffusion.checkpoint import load_checkpoint
from diffusion.config import load_config
from diffusion.data import load_dataset
from diffusion.trainer import train
from tests.helpers import digits_dir

ray = pytest.importorskip("ray")
from flows.ray_train import ray_run_name, ray_train  # noqa: E402

BASE = ["data.source=digits", "data.resolution=8", f"data.prepared_dir={digits_dir()}",
        "model.preset=tiny", "train.checkpoint_every=2", "train.log_every=2", "train.warmup_steps=2"]


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.pop("RAY_ADDRESS", None)
    yield
    ray.shutdown()


def test_two_workers_match_one_process_with_double_batch_then_resume(tmp_path):
    # 2 workers x batch 8 train on exactly the samples of 1 process x batch 16 (the library draws
    # every step's samples for the whole global batch); DDP averages the same gradients, so the
    # weights agree to float rounding (tolerance 1e-5). Inside the run, every rank's weights are
    # compared by checksum and the run fails if any rank differs.
    cfg = load_config(None, BASE + ["train.steps=4", "train.batch_size=8", "ray.num_workers=2",
                                    f"ray.storage_path={tmp_path / 'ray'}", "ray.run_name=r1",
                                    f"train.out_dir={tmp_path / 'out'}"])
    result = ray_train(cfg)
    assert result.step == 4 and result.checkpoint.exists()
    single_cfg = load_config(None, BASE + ["train.steps=4", "train.batch_size=16",
                                           f"train.out_dir={tmp_path / 'single'}"])
    single = train(single_cfg, load_dataset(single_cfg.data), progress=False)
    a = load_checkpoint(result.checkpoint)["model"]
    b = single.state.model.state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in b) < 1e-5
    losses = [json.loads(line)["loss"] for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert losses == pytest.approx([h["loss"] for h in single.history], rel=1e-4)

    # the driver stopped; re-running the same run name continues to the new step count
    longer = load_config(None, BASE + ["train.steps=6", "train.batch_size=8", "ray.num_workers=2",
                                       f"ray.storage_path={tmp_path / 'ray'}", "ray.run_name=r1",
                                       f"train.out_dir={tmp_path / 'out'}"])
    again = ray_train(longer)
    assert again.step == 6
    steps = [json.loads(line)["step"] for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6]                      # steps 1-4 were not trained again
    assert torch.isfinite(torch.tensor(again.metrics["loss"]))


def _worker_pids():
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if b"RayTrainWorker" in f.read():
                        pids.append(int(entry))
            except OSError:
                pass
    return pids


def _registered_checkpoint(snapshot):
    try:
        return json.loads(snapshot.read_text()).get("latest_checkpoint_result") is not None
    except (OSError, ValueError):
        return False


def test_sigkilled_worker_resumes_from_last_checkpoint(tmp_path):
    import signal
    import threading
    import time
    ray.shutdown()
    cfg = load_config(None, BASE + ["train.steps=400", "train.batch_size=32", "train.checkpoint_every=25",
                                    "train.log_every=25", "ray.num_workers=2", "ray.max_failures=2",
                                    f"ray.storage_path={tmp_path / 'ray'}", "ray.run_name=ft",
                                    f"train.out_dir={tmp_path / 'out'}"])
    stale = set(_worker_pids())                           # workers of earlier tests still exiting
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
    pids = [p for p in _worker_pids() if p not in stale]
    assert pids, "no RayTrainWorker process found"
    os.kill(pids[-1], signal.SIGKILL)                     # like a spot pre-emption or the OOM killer
    thread.join(timeout=400)
    assert "result" in box, "the run did not finish after the worker was killed"
    result = box["result"]
    assert result.step == 400                              # exactly the configured steps
    # the final attempt started from a reported checkpoint, so at most one interval was redone
    assert result.metrics["resumed_from"] >= 25 and result.metrics["resumed_from"] % 25 == 0
