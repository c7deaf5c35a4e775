"""CUDA paths: fp16 with a grad scaler, bf16, device-side determinism. Skipped without a GPU."""

import pytest
import torch

from diffusion.config import load_config
from diffusion.data import load_dataset
from tests.helpers import digits_dir
from diffusion.sampling import sample
from diffusion.schedule import NoiseSchedule
from diffusion.trainer import train
from diffusion.unet import UNet

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

TINY = ["data.source=digits", "data.resolution=8", f"data.prepared_dir={digits_dir()}", "model.preset=tiny", "train.batch_size=32",
        "train.log_every=5", "train.checkpoint_every=5", "train.device=cuda"]


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_cuda_training_precisions(tmp_path, precision):
    cfg = load_config(None, TINY + [f"train.out_dir={tmp_path}", "train.steps=10",
                                    f"train.precision={precision}"])
    result = train(cfg, load_dataset(cfg.data), progress=False)
    assert result.step == 10
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)
    if precision == "fp16":
        assert result.state.scaler.is_enabled() and result.state.scaler.get_scale() > 0


def test_cuda_resume_matches_one_go(tmp_path):
    one = train(load_config(None, TINY + [f"train.out_dir={tmp_path / 'a'}", "train.steps=10"]),
                load_dataset(load_config(None, TINY).data), progress=False)
    data = load_dataset(load_config(None, TINY).data)
    train(load_config(None, TINY + [f"train.out_dir={tmp_path / 'b'}", "train.steps=5"]), data, progress=False)
    two = train(load_config(None, TINY + [f"train.out_dir={tmp_path / 'b'}", "train.steps=10"]), data,
                progress=False)
    a, b = one.state.model.state_dict(), two.state.model.state_dict()
    # cuDNN kernels may be non-deterministic; the CPU test checks bit-identity
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) < 1e-4


def test_cuda_sampling_is_seed_deterministic():
    cfg = load_config(None, TINY)
    model = UNet(cfg.model, 1, 8).cuda()
    sched = NoiseSchedule.create("cosine", 100).to("cuda")
    kw = dict(channels=1, resolution=8, steps=10, device="cuda", progress=False)
    a = sample(model, sched, 4, seed=7, **kw)
    b = sample(model, sched, 4, seed=7, batch_size=2, **kw)
    assert torch.allclose(a, b, atol=1e-5)


def test_cuda_per_sample_randomness_matches_the_cpu():
    from diffusion import counter_rng as rng
    samples = torch.arange(40, 104)
    bits = rng.sample_words(3, 11, rng.STREAM_NOISE, samples, 50)
    assert torch.equal(bits, rng.sample_words(3, 11, rng.STREAM_NOISE, samples.cuda(), 50).cpu())
    for fn, args in ((rng.randint, (1000,)), (rng.uniform, ())):
        assert torch.equal(fn(3, 11, rng.STREAM_TIMESTEP, samples, *args),
                           fn(3, 11, rng.STREAM_TIMESTEP, samples.cuda(), *args).cpu())
    cpu = rng.normal(3, 11, rng.STREAM_NOISE, samples, (3, 8, 8))
    gpu = rng.normal(3, 11, rng.STREAM_NOISE, samples.cuda(), (3, 8, 8)).cpu()
    assert (cpu - gpu).abs().max() < 1e-4          # float32 log / cos may differ in the last bit


def test_cuda_batches_do_not_depend_on_the_split_across_ranks():
    from diffusion.trainer import BatchPlan, DistContext
    cfg = load_config(None, TINY)
    data = load_dataset(cfg.data)
    device = torch.device("cuda")
    one = BatchPlan(data, cfg, DistContext(0, 1), device, 10).micro_batches(77)[0]
    half = load_config(None, TINY + ["train.batch_size=16"])
    parts = [BatchPlan(data, half, DistContext(r, 2), device, 10).micro_batches(77)[0] for r in (0, 1)]
    for name in ("x0", "t", "noise", "labels"):
        assert torch.equal(getattr(one, name), torch.cat([getattr(p, name) for p in parts])), name
    assert one.noise.device.type == "cuda"


def test_ray_train_uses_the_gpu_with_nccl_by_default(tmp_path):
    # the defaults (ray.use_gpu: auto, ray.num_workers: auto) on a GPU machine's local cluster:
    # one worker per GPU, NCCL, training on CUDA; then the evaluate stage's Ray task on a GPU
    ray = pytest.importorskip("ray")
    from flows.ray_evaluate import remote_evaluate
    from flows.ray_train import ray_train
    from diffusion.features import save_classifier, train_classifier
    from diffusion.data import load_prepared
    base = [a for a in TINY if a != "train.device=cuda"] + [
        "train.steps=10", f"train.out_dir={tmp_path / 'out'}", f"ray.storage_path={tmp_path / 'ray'}"]
    events = []
    try:
        result = ray_train(load_config(None, base), on_event=events.append)
        assert result.step == 10
        scaling = next(e for e in events if e["kind"] == "scaling")
        assert scaling["use_gpu"] is True and scaling["workers"] == torch.cuda.device_count()
        hw = result.hardware
        assert hw["device"] == "cuda" and hw["ray_use_gpu"] is True and hw["dist_backend"] == "nccl"
        assert "(CUDA)" in hw["device_description"]
        assert hw["precision"] == ("bf16" if torch.cuda.is_bf16_supported() else "fp32")
        model, acc = train_classifier(load_prepared(digits_dir(), "train"), load_prepared(digits_dir(), "heldout"),
                                      epochs=2, progress=False, device="cuda")
        save_classifier(model, tmp_path / "extractor.pt", {"heldout_accuracy": acc})
        cfg = load_config(None, base + [f"extractor.path={tmp_path / 'extractor.pt'}", "evaluate.fid_samples=64",
                                        "evaluate.fid_seeds=1", "evaluate.kid_subset_size=32",
                                        f"evaluate.metrics_path={tmp_path / 'eval.json'}",
                                        f"evaluate.grid_path={tmp_path / 'grid.png'}",
                                        f"evaluate.reference_cache={tmp_path / 'ref'}"])
        metrics, setup = remote_evaluate(cfg, use_gpu=True)
        assert "(CUDA)" in setup["device_description"] and metrics["checkpoint_step"] == 10
        assert (tmp_path / "eval.json").exists() and (tmp_path / "grid.png").exists()
    finally:
        ray.shutdown()


def test_prefetched_pinned_batches_equal_direct_reads(tmp_path):
    # the CUDA loop reads step k+1's images in a thread into pinned memory: same samples as
    # reading them in the loop (the CPU path), so a run is the same whichever path fed it
    from diffusion.trainer import BatchPlan, DistContext
    from diffusion.throughput import Prefetcher
    cfg = load_config(None, TINY + [f"train.out_dir={tmp_path}"])
    data = load_dataset(cfg.data)
    plan = BatchPlan(data, cfg, DistContext(), torch.device("cuda"), 10)
    ahead = Prefetcher(plan.read, enabled=True)
    try:
        for step in range(5):
            host = ahead.get(step)
            assert all(images.is_pinned() for _, images, _ in host)
            a, b = plan.micro_batches(step, host), plan.micro_batches(step)
            for x, y in zip(a, b):
                assert torch.equal(x.x0, y.x0) and torch.equal(x.t, y.t) and torch.equal(x.labels, y.labels)
    finally:
        ahead.close()
