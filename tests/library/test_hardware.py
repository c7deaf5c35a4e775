"""Precision chosen by the device: the capability check, the timed probe and its cache, the
warning for an explicit bf16 that the CPU only emulates, and the record in the checkpoint."""

import json
import time

import pytest
import torch

from diffusion import hardware
from diffusion.checkpoint import load_checkpoint
from diffusion.config import ConfigError, load_config
from diffusion.data import load_dataset
from diffusion.hardware import PrecisionError, choose_fastest, measure, native_bf16, resolve_precision
from diffusion.trainer import train
from tests.helpers import digits_dir

CPU = torch.device("cpu")
TINY = ["data.source=digits", "data.resolution=8", f"data.prepared_dir={digits_dir()}",
        "model.preset=tiny", "model.num_classes=10",
        "train.batch_size=16", "train.log_every=1", "train.checkpoint_every=100"]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Each test measures afresh, in its own cache directory (never the user's)."""
    monkeypatch.setenv(hardware.CACHE_ENV, str(tmp_path / "cache"))


class TimedWork:
    """A workload whose cost per call depends on the dtype (a real, controlled timing)."""

    def __init__(self, fp32_s: float, bf16_s: float):
        self.cost = {None: fp32_s, torch.bfloat16: bf16_s}
        self.calls = 0

    def __call__(self, dtype):
        self.calls += 1
        time.sleep(self.cost[dtype])
        return 8


def resolve(requested, work, shape=None):
    return resolve_precision(requested, CPU, shape=shape or {"work": "test"}, workload=work)


def test_auto_is_fp32_without_native_bf16_and_never_probes(monkeypatch):
    monkeypatch.setattr(hardware, "native_bf16", lambda device: False)
    work = TimedWork(0.01, 0.001)               # even a "faster" bf16 is not tried
    choice = resolve("auto", work)
    assert choice.precision == "fp32" and "no native bf16" in choice.reason and work.calls == 0
    assert choice.autocast_dtype is None and choice.warning == ""


def test_auto_with_native_bf16_keeps_what_the_probe_measures_faster(monkeypatch):
    monkeypatch.setattr(hardware, "native_bf16", lambda device: True)
    monkeypatch.setattr(hardware, "PROBE_SECONDS", 0.05)
    fast = resolve("auto", TimedWork(0.004, 0.001), {"work": "a"})
    assert fast.precision == "bf16" and fast.autocast_dtype is torch.bfloat16
    assert "measured" in fast.reason and fast.measured["bf16"] > fast.measured["fp32"]
    # native support alone is not enough: where bf16 is slower (seen on AMX Xeons), fp32
    slow = resolve("auto", TimedWork(0.001, 0.004), {"work": "b"})
    assert slow.precision == "fp32" and "not faster" in slow.reason


def test_probe_results_are_cached_per_machine_and_shape(monkeypatch, tmp_path):
    monkeypatch.setattr(hardware, "native_bf16", lambda device: True)
    monkeypatch.setattr(hardware, "PROBE_SECONDS", 0.05)
    first = TimedWork(0.004, 0.001)
    assert resolve("auto", first, {"batch": 32}).precision == "bf16" and first.calls > 0
    again = TimedWork(0.004, 0.001)
    choice = resolve("auto", again, {"batch": 32})
    assert again.calls == 0 and "cached measurement" in choice.reason and choice.precision == "bf16"
    other = TimedWork(0.004, 0.001)
    resolve("auto", other, {"batch": 64})        # another work shape is measured on its own
    assert other.calls > 0
    table = json.loads((tmp_path / "cache" / "precision.json").read_text())
    assert len(table) == 2
    (tmp_path / "cache" / "precision.json").write_text("{not json")      # a damaged cache
    assert resolve("auto", TimedWork(0.004, 0.001), {"batch": 32}).precision == "bf16"


def test_measure_is_bounded():
    """A probe never runs long: one call per precision beyond the warm-up once a call outlasts
    the allowance."""
    work = TimedWork(0.2, 0.2)
    started = time.perf_counter()
    rates = measure({"fp32": lambda: work(None), "bf16": lambda: work(torch.bfloat16)}, seconds=0.1)
    assert time.perf_counter() - started < 1.5 and work.calls == 4
    assert rates["fp32"] == pytest.approx(8 / 0.2, rel=0.3)


def test_explicit_choices(monkeypatch):
    monkeypatch.setattr(hardware, "native_bf16", lambda device: False)
    monkeypatch.setattr(hardware, "PROBE_SECONDS", 0.05)
    assert resolve("fp32", TimedWork(0, 0)).precision == "fp32"
    emulated = resolve("bf16", TimedWork(0.001, 0.01))
    assert emulated.precision == "bf16"                       # still runs, as configured
    assert "without native bf16" in emulated.warning and "x slower than fp32" in emulated.warning
    assert "set train.precision=auto or fp32" in emulated.warning
    with pytest.raises(PrecisionError, match="train.precision = 'fp16': needs a CUDA device"):
        resolve("fp16", TimedWork(0, 0))
    assert issubclass(PrecisionError, ConfigError)
    with pytest.raises(PrecisionError, match="expected one of 'auto', 'fp32', 'bf16', 'fp16'"):
        resolve("int8", TimedWork(0, 0))


def test_the_real_capability_check_on_this_machine():
    assert native_bf16(CPU) == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert hardware.cpu_description().endswith(f"({torch.backends.cpu.get_cpu_capability()})")


def test_training_records_the_resolved_precision(tmp_path, monkeypatch):
    """auto resolves on this machine through the real check (and, where the CPU has native
    bf16, the real probe on the real network); the choice reaches the callback, the result and
    the checkpoint. With the check patched off, an explicit bf16 warns with measured numbers."""
    data = load_dataset(load_config(None, TINY).data)
    seen = []
    res = train(load_config(None, TINY + [f"train.out_dir={tmp_path / 'auto'}", "train.steps=2"]), data,
                progress=False, on_setup=seen.append)
    expected = {"fp32", "bf16"} if native_bf16(CPU) else {"fp32"}
    assert res.hardware["precision"] in expected and res.hardware["precision_requested"] == "auto"
    assert seen == [res.hardware] and res.state.precision == res.hardware["precision"]
    stored = json.loads(load_checkpoint(res.checkpoint)["hardware"])
    assert stored["precision"] == res.hardware["precision"] and stored["precision_reason"]
    assert stored["device"] == "cpu" and stored["threads"] == torch.get_num_threads()

    monkeypatch.setattr(hardware, "native_bf16", lambda device: False)
    res = train(load_config(None, TINY + [f"train.out_dir={tmp_path / 'bf16'}", "train.steps=2",
                                          "train.precision=bf16"]), data, progress=False)
    assert res.hardware["precision"] == "bf16" and "slower than fp32" in res.hardware["precision_warning"]
    assert set(res.hardware["precision_measured"]) == {"fp32", "bf16"}
    monkeypatch.setattr(hardware, "native_bf16", lambda device: True)
    monkeypatch.setattr(hardware, "PROBE_SECONDS", 0.2)
    res = train(load_config(None, TINY + [f"train.out_dir={tmp_path / 'probe'}", "train.steps=2"]), data,
                progress=False)
    assert res.hardware["precision"] in ("fp32", "bf16") and "measure" in res.hardware["precision_reason"]
    assert set(res.hardware["precision_measured"]) == {"fp32", "bf16"}


def test_choose_fastest_keeps_the_default_unless_another_is_clearly_faster(monkeypatch):
    monkeypatch.setattr(hardware, "PROBE_SECONDS", 0.05)
    slow, fast = TimedWork(0.004, 0.004), TimedWork(0.001, 0.001)
    best, why = choose_fastest({"contiguous": lambda: slow(None), "channels_last": lambda: fast(None)},
                               device=CPU, shape={"work": "fmt"}, default="contiguous")
    assert best == "channels_last" and why.startswith("measured: contiguous ")
    best, why = choose_fastest({"contiguous": lambda: slow(None), "channels_last": lambda: fast(None)},
                               device=CPU, shape={"work": "fmt"}, default="contiguous")
    assert best == "channels_last" and why.startswith("cached measurement")
    tie = TimedWork(0.002, 0.002)
    best, _ = choose_fastest({"contiguous": lambda: tie(None), "channels_last": lambda: tie(None)},
                             device=CPU, shape={"work": "tie"}, default="contiguous")
    assert best == "contiguous"
