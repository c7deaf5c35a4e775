"""Trainer: overfitting, bit-identical resume, NaN stop, accumulation/DDP equivalence, checkpoints."""

import json
import os
import pickle
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from diffusion.checkpoint import CheckpointError, load_checkpoint
from diffusion.config import ConfigError, load_config
from diffusion.data import load_dataset
from tests.helpers import digits_dir
from diffusion.ema import EMA, ema_decay_at
from diffusion.losses import DiffusionLoss
from diffusion.schedule import NoiseSchedule
from diffusion.trainer import (MicroBatch, NonFiniteLossError, build_state, lr_at, train,
                               train_step)

TINY = ["data.source=digits", "data.resolution=8", f"data.prepared_dir={digits_dir()}", "model.preset=tiny", "train.batch_size=16",
        "train.log_every=2", "train.checkpoint_every=4", "train.warmup_steps=3", "train.lr=1e-3",
        "train.precision=fp32"]   # exact equivalences; auto may pick bf16 per shape on a bf16 CPU


def tiny_cfg(tmp_path, *extra):
    return load_config(None, TINY + [f"train.out_dir={tmp_path}", *extra])


@pytest.fixture(scope="module")
def digits():
    return load_dataset(load_config(None, TINY).data)


def params_of(path):
    return load_checkpoint(path)


def test_lr_warmup_and_ema_decay_closed_forms():
    assert [lr_at(s, 1.0, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_at(0, 0.1, 0) == 0.1
    assert ema_decay_at(0, 0.999, True) == pytest.approx(0.1)
    assert ema_decay_at(90, 0.999, True) == pytest.approx(91 / 100)
    assert ema_decay_at(10**6, 0.999, True) == 0.999
    # constant target: ema_n = target + (init - target) * prod(decays)
    src = torch.nn.Linear(2, 2)
    ema = EMA(src, 0.9, warmup=False)
    init = ema.model.weight.detach().clone()
    with torch.no_grad():
        src.weight.fill_(1.0)
    for _ in range(5):
        ema.update(src)
    assert torch.allclose(ema.model.weight, 1.0 + (init - 1.0) * 0.9**5)


def test_overfits_a_fixed_batch(tmp_path, digits):
    cfg = tiny_cfg(tmp_path, "train.lr=3e-3", "train.warmup_steps=0", "train.grad_clip=0")
    state = build_state(cfg, torch.device("cpu"), 10)
    sched = NoiseSchedule.create(cfg.diffusion.schedule, cfg.diffusion.timesteps)
    g = torch.Generator().manual_seed(0)
    x0 = digits.images[:8].float() / 127.5 - 1
    mb = MicroBatch(x0, None, torch.randint(0, 1000, (8,), generator=g), torch.randn(x0.shape, generator=g),
                    torch.ones(8))
    loss_fn = DiffusionLoss(sched, "eps")
    losses = [train_step(state, state.model, loss_fn, [mb], cfg, torch.device("cpu"))["loss"].item()
              for _ in range(300)]
    assert losses[-1] < losses[0] / 20, (losses[0], losses[-1])


def test_resume_is_bit_identical(tmp_path, digits):
    extra = ["model.dropout=0.2", "model.num_classes=10", "train.steps=10"]   # dropout uses the RNG
    one = train(tiny_cfg(tmp_path / "one", *extra), digits, progress=False)
    first = train(tiny_cfg(tmp_path / "two", *extra[:-1], "train.steps=4"), digits, progress=False)
    assert first.step == 4
    second = train(tiny_cfg(tmp_path / "two", *extra), digits, progress=False)
    assert second.resumed_from == 4 and second.step == 10
    a, b = params_of(one.checkpoint), params_of(second.checkpoint)
    for key in ("model", "ema"):
        sa, sb = (a[key] if key == "model" else a[key]["model"]), (b[key] if key == "model" else b[key]["model"])
        assert all(torch.equal(sa[k], sb[k]) for k in sa), key
    oa, ob = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(oa[i]["exp_avg_sq"], ob[i]["exp_avg_sq"]) for i in oa)
    # the metrics log holds each step once, as if the run had not stopped
    rows = [json.loads(r) for r in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6, 8, 10]


def test_resume_refuses_a_changed_config(tmp_path, digits):
    train(tiny_cfg(tmp_path, "train.steps=2"), digits, progress=False)
    with pytest.raises(CheckpointError, match=r"different configuration \(changed: train.lr\)"):
        train(tiny_cfg(tmp_path, "train.steps=4", "train.lr=0.5"), digits, progress=False)
    before = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(CheckpointError, match="exists and resuming is off"):
        train(tiny_cfg(tmp_path, "train.steps=4"), digits, resume=False, progress=False)
    assert (tmp_path / "checkpoint.pt").read_bytes() == before          # nothing overwritten
    # a longer run (train.steps) is a resume, not a change
    assert train(tiny_cfg(tmp_path, "train.steps=4"), digits, progress=False).resumed_from == 2


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, digits, monkeypatch):
    import dataclasses

    import diffusion.trainer as trainer
    real_step = trainer.train_step

    def poisoned(state, net, loss_fn, micro_batches, cfg, device):   # step 7 on: NaN noise -> NaN loss
        if state.step >= 6:
            micro_batches = [dataclasses.replace(mb, noise=mb.noise * float("nan")) for mb in micro_batches]
        return real_step(state, net, loss_fn, micro_batches, cfg, device)
    monkeypatch.setattr(trainer, "train_step", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"NaN or Inf at step 7; .* \(step 4\) is kept"):
        train(tiny_cfg(tmp_path, "train.steps=20"), digits, progress=False)
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["step"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_gradient_accumulation_matches_larger_batch(tmp_path, digits):
    a = train(tiny_cfg(tmp_path / "a", "train.steps=3", "train.batch_size=32"), digits, progress=False)
    b = train(tiny_cfg(tmp_path / "b", "train.steps=3", "train.batch_size=16", "train.grad_accum=2"),
              digits, progress=False)
    pa, pb = params_of(a.checkpoint)["model"], params_of(b.checkpoint)["model"]
    assert max((pa[k] - pb[k]).abs().max().item() for k in pa) < 1e-5


def _ddp_worker(rank, world, port, out_dir, overrides, result_path):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        cfg = load_config(None, TINY + [f"train.out_dir={out_dir}", *overrides])
        result = train(cfg, load_dataset(cfg.data), progress=False)
        torch.save(result.state.model.state_dict(), f"{result_path}.{rank}")   # each rank's live weights
        Path(f"{result_path}.{rank}.json").write_text(json.dumps(       # and its own loop clock
            {"train_seconds": result.state.train_seconds, "stopped_by": result.stopped_by}))
    finally:
        dist.destroy_process_group()


def test_ddp_two_workers_match_one_worker_with_double_batch(tmp_path, digits):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    overrides = ["train.steps=3", "train.batch_size=8"]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path / "ddp"), overrides, str(tmp_path / "res")),
             nprocs=2, join=True)
    ddp = torch.load(tmp_path / "res.0", weights_only=True)
    rank1 = torch.load(tmp_path / "res.1", weights_only=True)
    assert all(torch.equal(ddp[k], rank1[k]) for k in ddp)         # ranks hold identical weights
    assert all(torch.equal(ddp[k], v) for k, v in load_checkpoint(tmp_path / "ddp" / "checkpoint.pt")["model"].items())
    single = train(tiny_cfg(tmp_path / "single", "train.steps=3", "train.batch_size=16"), digits,
                   progress=False)
    ref = params_of(single.checkpoint)["model"]
    assert max((ddp[k] - ref[k]).abs().max().item() for k in ref) < 1e-5


def test_budget_stops_training_with_a_final_checkpoint(tmp_path, digits):
    cfg = tiny_cfg(tmp_path, "train.steps=1000000", "train.budget_minutes=0.02")     # 1.2 s
    clock = time.perf_counter()
    res = train(cfg, digits, progress=False)
    wall = time.perf_counter() - clock
    assert res.stopped_by == "budget" and 4 < res.step < 1000000
    assert 1.2 <= res.train_seconds <= wall
    ckpt = load_checkpoint(res.checkpoint)
    assert ckpt["step"] == res.step and ckpt["train_seconds"] == pytest.approx(res.train_seconds)
    assert ckpt["ema"]["num_updates"] == res.step         # the EMA weights of the last step
    assert res.history[-1]["step"] == res.step         # the final state is reported too
    # the budget counts over resumes: the same budget again trains no further
    again = train(cfg, digits, progress=False)
    assert (again.step, again.resumed_from, again.stopped_by) == (res.step, res.step, "budget")
    # a larger budget is a resume (like train.steps), and continues to it
    more = train(tiny_cfg(tmp_path, "train.steps=1000000", "train.budget_minutes=0.04"), digits,
                 progress=False)
    assert more.resumed_from == res.step and more.step > res.step and more.train_seconds >= 2.4
    # whichever comes first: steps
    short = train(tiny_cfg(tmp_path / "short", "train.steps=3", "train.budget_minutes=10"), digits,
                  progress=False)
    assert (short.step, short.stopped_by) == (3, "steps")


def test_a_stop_request_checkpoints_the_step_reached_and_resumes_identically(tmp_path, digits):
    # should_stop is what a signal sets (flows/interrupts.py); it becomes true after step 7, off
    # the checkpoint interval (4): step 7 is checkpointed with its EMA and RNG state, and a
    # resume from it ends with the weights of an uninterrupted run
    extra = ["model.dropout=0.2", "train.steps=10", "train.precision=fp32"]
    straight = train(tiny_cfg(tmp_path / "straight", *extra), digits, progress=False)
    polls = []
    stopped = train(tiny_cfg(tmp_path / "stopped", *extra), digits, progress=False,
                    should_stop=lambda: polls.append(1) or len(polls) > 7)   # before step 1, after each
    assert (stopped.step, stopped.stopped_by) == (7, "interrupt")
    ckpt = load_checkpoint(stopped.checkpoint)
    assert ckpt["step"] == 7 and ckpt["ema"]["num_updates"] == 7
    resumed = train(tiny_cfg(tmp_path / "stopped", *extra), digits, progress=False)
    assert (resumed.resumed_from, resumed.step, resumed.stopped_by) == (7, 10, "steps")
    a, b = params_of(straight.checkpoint)["model"], params_of(resumed.checkpoint)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ddp_ranks_stop_at_the_same_step_on_budget(tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    overrides = ["train.steps=1000000", "train.batch_size=8", "train.budget_minutes=0.02"]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path / "ddp"), overrides, str(tmp_path / "res")),
             nprocs=2, join=True)
    rank0 = torch.load(tmp_path / "res.0", weights_only=True)
    rank1 = torch.load(tmp_path / "res.1", weights_only=True)
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)     # same step count, same weights
    ckpt = load_checkpoint(tmp_path / "ddp" / "checkpoint.pt")
    assert 0 < ckpt["step"] < 1000000
    # the ranks agree to stop once any rank's clock passed the 1.2 s budget (each clock starts as
    # its rank reaches the loop, so rank 0's own, which its checkpoint keeps, may be a little short)
    clocks = [json.loads((tmp_path / f"res.{r}.json").read_text()) for r in (0, 1)]
    assert {c["stopped_by"] for c in clocks} == {"budget"}
    assert max(c["train_seconds"] for c in clocks) >= 1.2
    assert ckpt["train_seconds"] == pytest.approx(clocks[0]["train_seconds"])
    assert all(torch.equal(rank0[k], v) for k, v in ckpt["model"].items())


def test_checkpoint_files_are_safe(tmp_path, digits):
    res = train(tiny_cfg(tmp_path, "train.steps=2"), digits, progress=False)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]     # atomic: no leftovers
    assert oct(os.stat(res.checkpoint).st_mode & 0o777) == oct(0o666 & ~_umask())
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(res.checkpoint.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated.pt: not a readable checkpoint"):
        load_checkpoint(truncated)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"format": "x", "payload": Evil()}, protocol=2))
    with pytest.raises(CheckpointError, match="evil.pt: not a readable checkpoint") as refused:
        load_checkpoint(evil)
    message = str(refused.value)     # names what was refused, never advises turning safety off
    assert "refused to load the pickled global posix.system" in message
    assert "weights_only" not in message and "will likely succeed" not in message
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(CheckpointError, match="other.pt: not a ddpm-pipeline/checkpoint-v1 checkpoint"):
        load_checkpoint(other)
    with pytest.raises(CheckpointError, match="nowhere.pt: checkpoint file not found"):
        load_checkpoint(tmp_path / "nowhere.pt")


def _umask():
    m = os.umask(0)
    os.umask(m)
    return m


def test_precision_and_memory_format_options(tmp_path, digits):
    base = train(tiny_cfg(tmp_path / "fp32", "train.steps=2"), digits, progress=False)
    cl = train(tiny_cfg(tmp_path / "cl", "train.steps=2", "train.channels_last=true"), digits, progress=False)
    pa, pb = params_of(base.checkpoint)["model"], params_of(cl.checkpoint)["model"]
    assert max((pa[k] - pb[k]).abs().max().item() for k in pa) < 1e-5
    bf16 = train(tiny_cfg(tmp_path / "bf16", "train.steps=4", "train.precision=bf16"), digits, progress=False)
    pc = params_of(bf16.checkpoint)["model"]
    assert any(not torch.equal(pc[k], pa[k]) for k in pa)          # bf16 really ran differently
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in bf16.history)
    with pytest.raises(ConfigError, match="train.precision = 'fp16': needs a CUDA device"):
        train(tiny_cfg(tmp_path / "fp16", "train.steps=1", "train.precision=fp16"), digits, progress=False)


def test_batch_larger_than_dataset_is_named(tmp_path, digits):
    with pytest.raises(ConfigError, match=r"train.batch_size = 4096: the samples per step \(4096"):
        train(tiny_cfg(tmp_path, "train.steps=1", "train.batch_size=4096"), digits, progress=False)


def test_compiled_training_matches_eager(tmp_path, digits):
    # torch.compile on CPU takes ~1 minute for the tiny net; the result must match eager mode
    eager = train(tiny_cfg(tmp_path / "eager", "train.steps=3"), digits, progress=False)
    compiled = train(tiny_cfg(tmp_path / "compiled", "train.steps=3", "train.compile=true"), digits,
                     progress=False)
    pa, pb = eager.state.model.state_dict(), compiled.state.model.state_dict()
    assert max((pa[k] - pb[k]).abs().max().item() for k in pa) < 1e-5
