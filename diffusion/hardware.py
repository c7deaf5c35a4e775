"""Hardware-dependent choices, made on the device that runs the work, never by a constant.

``precision: auto`` (train and evaluate) resolves here:

- CUDA: bf16 autocast when the GPU reports bf16 support, else fp32 (fp16 is never chosen
  automatically: it needs a grad scaler and can overflow).
- CPU: fp32 unless the CPU computes bf16 natively: its flags (``/proc/cpuinfo``) name bf16
  arithmetic (``avx512_bf16``, ``amx_bf16``; ``bf16`` on Arm) and oneDNN has bf16 kernels for it
  (oneDNN's check alone is true on every AVX-512 CPU, which only emulates bf16). Native support
  is not enough on its own (on some Xeons bf16 autocast trains a small U-Net slower than fp32),
  so there a timed probe runs the actual network at the actual batch in both precisions, a few
  seconds in all, and bf16 is kept only if it is measurably faster. The result is cached per
  machine (CPU model and a digest of its flags), torch version, thread count and work shape in
  ``$DDPM_CACHE_DIR`` (default ``~/.cache/ddpm-pipeline``), so the probe runs once. Processes
  that resolve at the same time (DDP ranks on one node) take turns under a file lock: the first
  measures alone, the others read its result, so every rank reports the number that was cached.
- An explicit ``bf16`` on a CPU without native support still runs, with a warning that gives
  the measured slow-down (bf16 is emulated there: ~10x slower was seen on an AVX2 EPYC).

:func:`choose_fastest` applies the same measured, cached choice where detection cannot decide
at all (the memory format for sampling: channels_last was 30 % faster on one CPU and slower on
another).

Every resolution returns a :class:`PrecisionChoice` whose ``reason`` says why; callers print it,
store it in checkpoints and metrics, and log it with the run.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from diffusion.config import ConfigError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16,
                                                  "fp16": torch.float16}
BF16_MIN_SPEEDUP = 1.05      # bf16 must beat fp32 by 5 % to be chosen (timing noise is ~2 %)
PROBE_SECONDS = 1.5          # per precision; the probe stops early once this is spent
CACHE_ENV = "DDPM_CACHE_DIR"
# CPU flags that name bf16 arithmetic: AVX-512 BF16 and AMX-BF16 (x86), FEAT_BF16 (Arm "Features")
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})

# One timed unit of work in a precision: runs it once (the caller adds warm-up) and returns
# the number of images it processed.
Workload = Callable[[torch.dtype | None], int]


class PrecisionError(ConfigError):
    """A precision that cannot run on this device (fp16 on a CPU)."""


@dataclass(frozen=True)
class PrecisionChoice:
    requested: str            # what the configuration asked for: auto | fp32 | bf16 | fp16
    precision: str            # what runs: fp32 | bf16 | fp16
    reason: str               # one sentence, for people
    warning: str = ""         # set when an explicit choice will run badly here
    measured: dict[str, float] | None = None   # images/s per precision, when the probe ran

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return AUTOCAST_DTYPES[self.precision]

    def to_dict(self) -> dict:
        return asdict(self)


def cpu_description() -> str:
    """The CPU model and torch's vector capability, e.g. 'AMD EPYC (AVX2)'."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({torch.backends.cpu.get_cpu_capability()})"


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The CPU's feature flags: the ``flags`` (x86) or ``Features`` (Arm) line of ``cpuinfo``
    (default: this machine's ``/proc/cpuinfo``); empty where the system does not say."""
    if cpuinfo is None:
        return _this_cpu_flags()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


@functools.cache
def _this_cpu_flags() -> frozenset[str]:
    try:
        return cpu_flags(Path("/proc/cpuinfo").read_text())
    except OSError:
        return frozenset()


def flags_digest(flags: Iterable[str]) -> str:
    return hashlib.sha256(" ".join(sorted(flags)).encode()).hexdigest()[:16]


def cpu_native_bf16(flags: Iterable[str], onednn_bf16: bool) -> bool:
    """Native bf16 on a CPU: the CPU names bf16 arithmetic among its ``flags`` and oneDNN has
    bf16 kernels (``onednn_bf16``). Either alone is not enough: oneDNN says yes on any AVX-512
    CPU (Skylake, Cascade Lake), which only emulates bf16."""
    return bool(onednn_bf16) and not BF16_CPU_FLAGS.isdisjoint(flags)


def native_bf16(device: torch.device) -> bool:
    """Whether the device computes bf16 natively (CUDA's check; a CPU's flags and oneDNN's)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        return cpu_native_bf16(cpu_flags(), torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA)"
    return f"{cpu_description()}, {torch.get_num_threads()} thread(s)"


def measure(options: dict[str, Callable[[], int]], seconds: float = PROBE_SECONDS) -> dict[str, float]:
    """Images per second of each option (a callable that does one unit of work and returns the
    images it processed): one warm-up call each, then calls alternating between the options (so
    drift hits all alike) until each has run ``seconds`` or 20 calls. Bounded: an option whose
    one call outlasts ``seconds`` is measured once."""
    spent = {name: 0.0 for name in options}
    images = {name: 0 for name in options}
    for run in options.values():
        run()
    calls = 0
    while calls < 20 and any(spent[n] < seconds for n in options):
        for name, run in options.items():
            if spent[name] >= seconds and calls > 0:
                continue
            start = time.perf_counter()
            images[name] += run()
            spent[name] += time.perf_counter() - start
        calls += 1
    return {name: images[name] / max(spent[name], 1e-9) for name in options}


def _precision_options(workload: Workload) -> dict[str, Callable[[], int]]:
    return {p: (lambda dtype=AUTOCAST_DTYPES[p]: workload(dtype)) for p in ("fp32", "bf16")}


def _cache_path() -> Path:
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "ddpm-pipeline"
    return Path(root) / "precision.json"


def probe_key(device: torch.device, shape: dict, flags: Iterable[str] | None = None) -> str:
    """What a measurement depends on: the machine (on a CPU its model, threads and a digest of
    its ``flags``, default this CPU's: cloud CPUs often report a generic model name), torch and
    the work's shape."""
    machine = {"device": device_description(device), "torch": torch.__version__}
    if device.type == "cpu":
        machine["cpu_flags"] = flags_digest(cpu_flags() if flags is None else flags)
    blob = json.dumps({**machine, "shape": shape}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _cached(key: str, options: Iterable[str]) -> dict[str, float] | None:
    """The cached rates of exactly ``options``, in their order, or None."""
    try:
        entry = json.loads(_cache_path().read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        return None
    names = list(options)
    if (isinstance(entry, dict) and set(entry) == set(names)
            and all(isinstance(v, (int, float)) for v in entry.values())):
        return {k: float(entry[k]) for k in names}
    return None


def _store(key: str, rates: dict[str, float]) -> None:
    """Add one measurement to the cache file (written atomically; a lost race loses one entry)."""
    path = _cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            table = json.loads(path.read_text())
            table = table if isinstance(table, dict) else {}
        except (OSError, ValueError):
            table = {}
        table[key] = rates
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)
    except OSError:
        pass                      # a read-only home only costs a probe next time


@contextlib.contextmanager
def _probe_lock() -> Iterator[None]:
    """One probe at a time per cache (per node): an exclusive ``flock`` beside the cache file,
    released when the process ends however it ends. Without a writable cache directory there is
    nothing to share, and every process measures for itself."""
    path = _cache_path().with_name("probe.lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _rates(device: torch.device, shape: dict, options: dict[str, Callable[[], int]]
           ) -> tuple[dict[str, float], bool]:
    """Images/s per option and whether they came from the cache. A miss measures under the
    probe lock, so concurrent processes wait for one uncontended measurement and all return it:
    the numbers a process reports are the numbers in the cache."""
    key = probe_key(device, {**shape, "options": sorted(options)})
    cached = _cached(key, options)
    if cached is not None:
        return cached, True
    with _probe_lock():
        cached = _cached(key, options)          # measured by another process while we waited
        if cached is not None:
            return cached, True
        rates = measure(options)
        _store(key, rates)
    return rates, False


def _fmt(rates: dict[str, float]) -> str:
    return ", ".join(f"{p} {r:.0f} img/s" for p, r in rates.items())


def cpu_auto_precision(rates: dict[str, float]) -> tuple[str, float]:
    """``auto`` on a CPU with native bf16, from measured images/s: bf16 only when it beats fp32
    by ``BF16_MIN_SPEEDUP``; returns (precision, bf16 speed-up)."""
    speedup = rates["bf16"] / max(rates["fp32"], 1e-9)
    return ("bf16" if speedup >= BF16_MIN_SPEEDUP else "fp32"), speedup


def resolve_precision(requested: str, device: torch.device, *, shape: dict,
                      workload: Workload, what: str = "train.precision") -> PrecisionChoice:
    """Resolve ``requested`` (auto | fp32 | bf16 | fp16) for ``device``. ``workload`` runs the
    real network once in a given autocast dtype; it is timed only where detection cannot decide
    (auto on a CPU with native bf16) or to say how slow an explicit bf16 will be."""
    if requested not in PRECISIONS:
        raise PrecisionError(f"{what} = {requested!r}: expected one of {', '.join(map(repr, PRECISIONS))}")
    cpu = device.type != "cuda"
    if requested == "fp16" and cpu:
        raise PrecisionError(f"{what} = 'fp16': needs a CUDA device; use 'auto', 'bf16' or 'fp32' "
                             "on a CPU")
    native = native_bf16(device)
    if requested in ("fp32", "fp16"):
        return PrecisionChoice(requested, requested, "as configured")
    if requested == "bf16":
        if native or not cpu:
            return PrecisionChoice(requested, "bf16", "as configured")
        rates, _ = _rates(device, shape, _precision_options(workload))
        slower = rates["fp32"] / max(rates["bf16"], 1e-9)
        return PrecisionChoice(requested, "bf16", "as configured", measured=rates, warning=(
            f"{what} = 'bf16' on a CPU without native bf16 ({cpu_description()}): measured "
            f"{slower:.1f}x slower than fp32 here ({_fmt(rates)}); set {what}=auto or fp32"))
    if not cpu:
        return (PrecisionChoice(requested, "bf16", "auto: the CUDA device supports bf16") if native
                else PrecisionChoice(requested, "fp32", "auto: the CUDA device has no bf16 support"))
    if not native:
        return PrecisionChoice(requested, "fp32", "auto: this CPU has no native bf16 (no "
                               f"{'/'.join(sorted(BF16_CPU_FLAGS))} flag, or no oneDNN bf16; "
                               f"{torch.backends.cpu.get_cpu_capability()})")
    rates, hit = _rates(device, shape, _precision_options(workload))
    precision, speedup = cpu_auto_precision(rates)
    source = "cached measurement" if hit else "measured"
    if precision == "bf16":
        return PrecisionChoice(requested, "bf16", f"auto: native bf16, {source} {speedup:.2f}x "
                                                  f"faster than fp32 ({_fmt(rates)})", measured=rates)
    return PrecisionChoice(requested, "fp32", f"auto: native bf16 but {source} not faster "
                                              f"({_fmt(rates)})", measured=rates)


def choose_fastest(options: dict[str, Callable[[], int]], *, device: torch.device, shape: dict,
                   default: str, min_speedup: float = BF16_MIN_SPEEDUP) -> tuple[str, str]:
    """The option that measured fastest on this device (cached like the precision probe), and
    why; ``default`` unless another beats it by ``min_speedup``. For choices detection cannot
    make at all, such as the memory format."""
    rates, hit = _rates(device, shape, options)
    best = max(rates, key=rates.get)
    source = "cached measurement" if hit else "measured"
    if best != default and rates[best] >= rates[default] * min_speedup:
        return best, f"{source}: {_fmt(rates)}"
    return default, f"{source}: {_fmt(rates)}"
