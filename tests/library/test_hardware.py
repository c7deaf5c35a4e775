"""Precision chosen by the device: the capability decision (CPU flags and oneDNN), the timed
probe, its cache and its lock, the warning for an explicit bf16 that the CPU only emulates, the
record in the checkpoint and the precision pinned over resumes."""

import json
import platform
import threading
import time

import pytest
import torch

from diffusion import hardware
from diffusion.checkpoint import load_checkpoint
from diffusion.config import ConfigError, load_config
from diffusion.data import load_dataset
from diffusion.hardware import (BF16_MIN_SPEEDUP, PrecisionError, choose_fastest, cpu_auto_precision,
                                cpu_flags, cpu_native_bf16, measure, native_bf16, probe_key,
                                resolve_precision)
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


# per-call costs 10x apart: a loaded machine stretches a sleep by milliseconds, never the ratio
# below 2 (the 5 % threshold needs 1.05)
SLOW, FAST = 0.02, 0.002


def resolve(requested, work, shape=None):
    return resolve_precision(requested, CPU, shape=shape or {"work": "test"}, workload=work)


def test_auto_is_fp32_without_native_bf16_and_never_probes(monkeypatch):
    monkeypatch.setattr(hardware, "native_bf16", lambda device: False)
    work = TimedWork(0.01, 0.001)               # even a "faster" bf16 is not tried
    choice = resolve("auto", work)
    assert choice.precision == "fp32" and "no native bf16" in choice.reason and work.calls == 0
    assert choice.autocast_dtype is None and choice.warning == ""


def _cache_table(tmp_path) -> dict:
    return json.loads((tmp_path / "cache" / "precision.json").read_text())


def test_auto_measures_in_an_empty_cache_and_reports_the_numbers_it_cached(monkeypatch, tmp_path):
    monkeypatch.setattr(hardware, "native_bf16", lambda device: True)
    monkeypatch.setattr(hardware, "PROBE_SECONDS", 0.05)
    work = TimedWork(SLOW, FAST)
    fast = resolve("auto", work, {"work": "a"})
    assert work.calls > 0 and fast.reason.startswith("auto: native bf16, measured ")
    assert fast.precision == "bf16" and fast.autocast_dtype is torch.bfloat16
    (entry,) = _cache_table(tmp_path).values()
    assert entry == fast.measured                  # the reported measurement is the cached one
    assert f"fp32 {entry['fp32']:.0f} img/s, bf16 {entry['bf16']:.0f} img/s" in fast.reason
    again = TimedWork(SLOW, FAST)
    hit = resolve("auto", again, {"work": "a"})
    assert again.calls == 0 and "cached measurement" in hit.reason and hit.measured == entry
    other = TimedWork(SLOW, FAST)
    resolve("auto", other, {"work": "other"})            # another work shape is measured on its own
    assert other.calls > 0 and len(_cache_table(tmp_path)) == 2
    (tmp_path / "cache" / "precision.json").write_text("{not json")      # a damaged cache
    damaged = TimedWork(SLOW, FAST)
    assert resolve("auto", damaged, {"work": "a"}).precision == "bf16" and damaged.calls > 0


def test_auto_chooses_from_the_rates(monkeypatch, tmp_path):
    """The decision as a function of measured rates, and resolve_precision following the rates
    in the cache (injected) rather than anything else."""
    assert cpu_auto_precision({"fp32": 100.0, "bf16": 100.0 * BF16_MIN_SPEEDUP + 0.1})[0] == "bf16"
    assert cpu_auto_precision({"fp32": 100.0, "bf16": 100.0 * BF16_MIN_SPEEDUP - 0.1})[0] == "fp32"
    assert cpu_auto_precision({"fp32": 100.0, "bf16": 50.0}) == ("fp32", 0.5)
    monkeypatch.setattr(hardware, "native_bf16", lambda device: True)
    monkeypatch.setattr(hardware, "PROBE_SECONDS", 0.02)
    resolve("auto", TimedWork(0.001, 0.001), {"work": "b"})            # creates the entry
    path = tmp_path / "cache" / "precision.json"
    (key,) = _cache_table(tmp_path)
    for rates, expected, says in (({"fp32": 50.0, "bf16": 150.0}, "bf16", "3.00x faster"),
                                  ({"fp32": 150.0, "bf16": 50.0}, "fp32", "not faster")):
        path.write_text(json.dumps({key: rates}))
        work = TimedWork(0.001, 0.001)
        choice = resolve("auto", work, {"work": "b"})
        assert (choice.precision, choice.measured, work.calls) == (expected, rates, 0)
        assert says in choice.reason


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


SKYLAKE = {"fpu", "sse2", "avx2", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"}
SAPPHIRE_RAPIDS = SKYLAKE | {"avx512_bf16", "amx_tile", "amx_bf16"}


def test_native_bf16_needs_the_cpu_flags_and_onednn():
    # oneDNN reports bf16 support on every AVX-512 CPU; without a bf16 flag it only emulates it
    assert not cpu_native_bf16(SKYLAKE, onednn_bf16=True)
    assert cpu_native_bf16(SAPPHIRE_RAPIDS, onednn_bf16=True)
    assert cpu_native_bf16(SKYLAKE | {"avx512_bf16"}, onednn_bf16=True)       # Cooper Lake, Zen 4
    assert not cpu_native_bf16(SAPPHIRE_RAPIDS, onednn_bf16=False)            # a torch without it
    assert cpu_native_bf16({"fp", "asimd", "bf16"}, onednn_bf16=True)          # Arm FEAT_BF16
    x86 = "processor\t: 0\nmodel name\t: Xeon\nflags\t\t: fpu avx512f amx_bf16\n\nprocessor\t: 1\n"
    assert cpu_flags(x86) == {"fpu", "avx512f", "amx_bf16"}
    assert cpu_flags("processor\t: 0\nFeatures\t: fp asimd bf16\n") == {"fp", "asimd", "bf16"}
    assert cpu_flags("processor\t: 0\n") == frozenset()
    if platform.system() == "Linux" and platform.machine() == "x86_64":      # this machine's file
        assert {"fpu", "sse2"} <= cpu_flags()
    assert hardware.cpu_description().endswith(f"({torch.backends.cpu.get_cpu_capability()})")


def test_probe_key_includes_a_digest_of_the_cpu_flags():
    shape = {"work": "train", "batch": 32}
    assert probe_key(CPU, shape, SKYLAKE) != probe_key(CPU, shape, SAPPHIRE_RAPIDS)
    assert probe_key(CPU, shape, sorted(SKYLAKE)) == probe_key(CPU, shape, set(SKYLAKE))
    assert probe_key(CPU, shape) == probe_key(CPU, shape, cpu_flags())
    assert probe_key(CPU, shape, SKYLAKE) != probe_key(CPU, {**shape, "batch": 64}, SKYLAKE)


def test_one_probe_per_node_the_others_read_its_result(monkeypatch, tmp_path):
    """Ranks that resolve at the same moment: one measures (alone), the others wait on the
    lock and report the numbers it cached. flock locks belong to an open file, so threads that
    each open the lock file contend exactly as processes do."""
    monkeypatch.setattr(hardware, "native_bf16", lambda device: True)
    monkeypatch.setattr(hardware, "PROBE_SECONDS", 0.1)
    ranks = 4
    works = [TimedWork(SLOW, FAST) for _ in range(ranks)]
    start, choices = threading.Barrier(ranks), [None] * ranks

    def rank(i):
        start.wait()
        choices[i] = resolve("auto", works[i], {"work": "ddp"})
    threads = [threading.Thread(target=rank, args=(i,)) for i in range(ranks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(w.calls > 0 for w in works) == [False] * (ranks - 1) + [True]
    (entry,) = _cache_table(tmp_path).values()
    assert all(c.measured == entry and c.precision == "bf16" for c in choices)
    assert sum("cached measurement" in c.reason for c in choices) == ranks - 1


def test_training_records_the_resolved_precision(tmp_path, monkeypatch):
    """auto resolves on this machine through the real check (and, where the CPU has native
    bf16, the real probe on the real network); the choice reaches the callback, the result and
    the checkpoint. With the check patched off, an explicit bf16 warns with measured numbers."""
    monkeypatch.setattr(hardware, "PROBE_SECONDS", 0.2)
    data = load_dataset(load_config(None, TINY).data)
    seen = []
    res = train(load_config(None, TINY + [f"train.out_dir={tmp_path / 'auto'}", "train.steps=2"]), data,
                progress=False, on_setup=seen.append)
    measured = res.hardware["precision_measured"]
    if native_bf16(CPU):        # the probe decided, and its numbers are the cached ones
        assert res.hardware["precision"] == cpu_auto_precision(measured)[0]
        assert list(_cache_table(tmp_path).values()) == [measured]
    else:
        assert res.hardware["precision"] == "fp32" and measured is None
    assert res.hardware["precision_requested"] == "auto"
    assert seen == [res.hardware] and res.state.precision == res.hardware["precision"]
    stored = json.loads(load_checkpoint(res.checkpoint)["hardware"])
    assert stored["precision"] == res.hardware["precision"] and stored["precision_reason"]
    assert stored["device"] == "cpu" and stored["threads"] == torch.get_num_threads()
    assert stored["precision_history"] == [{"step": 0, "precision": res.hardware["precision"],
                                            "requested": "auto", "reason": stored["precision_reason"]}]

    monkeypatch.setattr(hardware, "native_bf16", lambda device: False)
    res = train(load_config(None, TINY + [f"train.out_dir={tmp_path / 'bf16'}", "train.steps=2",
                                          "train.precision=bf16"]), data, progress=False)
    assert res.hardware["precision"] == "bf16" and "slower than fp32" in res.hardware["precision_warning"]
    assert set(res.hardware["precision_measured"]) == {"fp32", "bf16"}


def test_a_resumed_run_keeps_its_precision_unless_train_precision_changes(tmp_path, monkeypatch):
    """Precision is pinned per run: a resume does not probe again (a deleted cache, another
    node or timings near the threshold could answer otherwise) but keeps the checkpoint's; an
    explicit change of train.precision switches, and the switch and its step are recorded."""
    monkeypatch.setattr(hardware, "native_bf16", lambda device: True)      # the probe decides
    monkeypatch.setattr(hardware, "PROBE_SECONDS", 0.05)
    data = load_dataset(load_config(None, TINY).data)

    def run(out, *overrides):
        return train(load_config(None, TINY + [f"train.out_dir={tmp_path / out}", *overrides]), data,
                     progress=False)
    first = run("run", "train.steps=2")
    chosen = first.hardware["precision"]
    other = {"fp32": "bf16", "bf16": "fp32"}[chosen]
    path = tmp_path / "cache" / "precision.json"
    (key,) = json.loads(path.read_text())
    path.write_text(json.dumps({key: {chosen: 50.0, other: 150.0}}))   # now the other wins 3x
    assert run("fresh", "train.steps=2").hardware["precision"] == other  # as a new run shows

    resumed = run("run", "train.steps=4")
    hw = resumed.hardware
    assert resumed.resumed_from == 2 and resumed.state.precision == hw["precision"] == chosen
    assert hw["precision_reason"].startswith("auto: kept from the checkpoint (step 2); chosen at step 0")
    assert hw["precision_switched_at_step"] is None
    assert [s["precision"] for s in hw["precision_history"]] == [chosen]

    switched = run("run", "train.steps=6", f"train.precision={other}")
    hw = switched.hardware
    assert switched.state.precision == hw["precision"] == other and hw["precision_switched_at_step"] == 4
    assert f"switched from {chosen} at step 4 (train.precision auto -> {other})" in hw["precision_reason"]
    assert [(s["step"], s["precision"], s["requested"]) for s in hw["precision_history"]] == [
        (0, chosen, "auto"), (4, other, other)]
    assert json.loads(load_checkpoint(switched.checkpoint)["hardware"])["precision_history"] == \
        hw["precision_history"]
    again = run("run", "train.steps=7", f"train.precision={other}")     # no change: no new switch
    assert again.hardware["precision_switched_at_step"] == 4
    assert again.hardware["precision_history"] == hw["precision_history"]


def test_choose_fastest_keeps_the_default_unless_another_is_clearly_faster(monkeypatch, tmp_path):
    monkeypatch.setattr(hardware, "PROBE_SECONDS", 0.05)
    slow, fast = TimedWork(SLOW, SLOW), TimedWork(FAST, FAST)
    options = {"contiguous": lambda: slow(None), "channels_last": lambda: fast(None)}
    best, why = choose_fastest(options, device=CPU, shape={"work": "fmt"}, default="contiguous")
    assert best == "channels_last" and why.startswith("measured: contiguous ")
    best, why = choose_fastest(options, device=CPU, shape={"work": "fmt"}, default="contiguous")
    assert best == "channels_last" and why.startswith("cached measurement")
    (key,) = _cache_table(tmp_path)
    for channels_last, expected in ((104.0, "contiguous"), (106.0, "channels_last")):   # the threshold
        (tmp_path / "cache" / "precision.json").write_text(
            json.dumps({key: {"contiguous": 100.0, "channels_last": channels_last}}))
        assert choose_fastest(options, device=CPU, shape={"work": "fmt"}, default="contiguous")[0] == expected
