"""One typed, immutable config tree loaded from ``params.yaml``.

Sections match the pipeline stages. Loading is strict: an unknown key, a wrong type or an
out-of-range value fails with one :class:`ConfigError` that lists every problem as
``<file>: <key.path> = <value>: <what is allowed>``. Command-line overrides
``section.key=value`` go through the same checks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import operator
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from diffusion.presets import MODEL_PRESETS


class ConfigError(ValueError):
    """Invalid configuration; the message names the key path, the value and what is allowed."""


def _bound(default: Any, *, ge: float | None = None, gt: float | None = None,
           le: float | None = None, lt: float | None = None) -> Any:
    """A dataclass field with a numeric range checked at load time."""
    return field(default=default, metadata={"ge": ge, "gt": gt, "le": le, "lt": lt})


DataSource = Literal["mnist", "digits", "folder", "s3"]
BadFiles = Literal["fail", "skip"]
Schedule = Literal["linear", "cosine"]
Target = Literal["eps", "v"]
LossWeighting = Literal["none", "min_snr"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
Device = Literal["auto", "cpu", "cuda"]
SamplerName = Literal["ddpm", "ddim", "dpmpp_2m", "unipc"]
Spacing = Literal["linspace", "trailing"]
MemoryFormat = Literal["auto", "contiguous", "channels_last"]
PrepareEngine = Literal["local", "ray"]
ExtractorKind = Literal["domain", "inception"]
SweepScheduler = Literal["asha", "none"]
Auto = Literal["auto"]


@dataclass(frozen=True)
class DataConfig:
    source: DataSource = "mnist"        # mnist (5,000 at 28x28) | digits (8x8) | folder | s3
    path: str = ""                      # folder path, or s3://bucket/prefix (for folder / s3)
    resolution: int = _bound(28, ge=4, le=1024)  # centre crop to square, bilinear resize to this
    channels: int = _bound(1, ge=1, le=3)        # 1 = grayscale, 3 = RGB
    heldout_fraction: float = _bound(0.1, gt=0.0, lt=1.0)  # share kept out of training (by hash)
    bad_files: BadFiles = "fail"        # fail: stop at the first bad file | skip: list in rejects.csv
    min_pixel_std: float = _bound(1.0, ge=0.0)   # validation: a shard flatter than this fails
    s3_workers: int = _bound(16, ge=1, le=256)   # concurrent S3 downloads (local engine)
    engine: PrepareEngine = "local"     # local: decode in this process | ray: on Ray Data, cluster-wide
    ray_workers: int = _bound(0, ge=0)  # ray engine: decode tasks at a time (0 = as many as CPUs)
    prepared_dir: str = "data/prepared"          # DVC-tracked output of the prepare stage
    validation_dir: str = "data/validation"      # validation report (written even on failure)


@dataclass(frozen=True)
class ModelConfig:
    preset: str = "custom"                       # a name from diffusion.presets; keys below override it
    base_channels: int = _bound(32, ge=8)        # channels at full resolution
    channel_mult: tuple[int, ...] = (1, 2, 2)    # per-level multiplier; one downsampling between levels
    num_res_blocks: int = _bound(2, ge=1)        # residual blocks per level (encoder)
    attention_resolutions: tuple[int, ...] = (7,)  # feature-map sizes that get self-attention
    num_heads: int = _bound(1, ge=1)
    dropout: float = _bound(0.0, ge=0.0, lt=1.0)
    num_classes: int = _bound(0, ge=0)           # 0 = unconditional; >0 adds a class embedding
    class_dropout: float = _bound(0.1, ge=0.0, le=1.0)  # label dropout (null class) for CFG


@dataclass(frozen=True)
class DiffusionConfig:
    schedule: Schedule = "cosine"                # linear (Ho et al. 2020) or cosine (Nichol & Dhariwal)
    timesteps: int = _bound(1000, ge=2)          # T
    target: Target = "eps"                       # what the network predicts: eps or v
    loss_weighting: LossWeighting = "none"       # none or min_snr (Hang et al. 2023)
    min_snr_gamma: float = _bound(5.0, gt=0.0)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = _bound(2000, ge=1)              # optimizer steps in total (resume continues to this)
    budget_minutes: float = _bound(0.0, ge=0.0)  # wall-clock training budget (0 = none): whichever of
                                                 # steps and budget comes first ends training
    batch_size: int = _bound(64, ge=1)           # per worker and micro-batch
    grad_accum: int = _bound(1, ge=1)            # micro-batches per optimizer step
    lr: float = _bound(2e-4, gt=0.0, le=1.0)
    weight_decay: float = _bound(0.0, ge=0.0)
    adam_beta1: float = _bound(0.9, ge=0.0, lt=1.0)
    adam_beta2: float = _bound(0.999, ge=0.0, lt=1.0)
    warmup_steps: int = _bound(100, ge=0)        # linear LR warm-up, then constant
    grad_clip: float = _bound(1.0, ge=0.0)       # max global grad norm; 0 disables clipping
    ema_decay: float = _bound(0.999, ge=0.0, lt=1.0)
    ema_warmup: bool = True                      # decay_n = min(decay, (1+n)/(10+n))
    precision: Precision = "auto"                # auto: bf16 where the device runs it natively and
                                                 # faster (measured), else fp32 (diffusion.hardware);
                                                 # bf16 autocast (CPU/CUDA) | fp16 + grad scaler (CUDA)
    channels_last: bool = False
    compile: bool = False                        # torch.compile the network
    device: Device = "auto"
    seed: int = _bound(0, ge=0)
    checkpoint_every: int = _bound(500, ge=1)    # steps between checkpoints (and at the end)
    log_every: int = _bound(50, ge=1)            # steps between metric reports
    out_dir: str = "runs/default"                # checkpoints and samples go here


@dataclass(frozen=True)
class RayConfig:
    enabled: bool = True                         # false: the library loop in this process (no Ray)
    num_workers: Auto | int = _bound("auto", ge=1)  # DDP ranks (auto: one per GPU on a GPU cluster, else 2);
                                                 # global batch = batch_size x grad_accum x this
    use_gpu: Auto | bool = "auto"                # auto: GPUs when the cluster has them; NCCL on GPUs, gloo on CPUs
    cpus_per_worker: float = _bound(1.0, gt=0.0)
    gpus_per_worker: float = _bound(1.0, ge=0.0)  # used when use_gpu
    max_failures: int = _bound(2, ge=-1)         # worker restarts from the last checkpoint (-1: no limit)
    storage_path: str = "runs/ray"               # local directory or s3://bucket/prefix
    run_name: str = "default"                    # re-running the same name resumes
    worker_resources: tuple[str, ...] = ()       # custom Ray resources per worker, name=amount


@dataclass(frozen=True)
class ExtractorConfig:
    kind: ExtractorKind = "domain"               # domain (offline classifier) | inception (TorchScript)
    path: str = "models/extractor.pt"            # domain: written by the extractor stage; inception: yours
    epochs: int = _bound(12, ge=1)               # domain classifier training
    batch_size: int = _bound(128, ge=1)
    lr: float = _bound(2e-3, gt=0.0, le=1.0)
    seed: int = _bound(0, ge=0)
    min_accuracy: float = _bound(0.9, ge=0.0, le=1.0)   # the stage fails below this held-out accuracy


@dataclass(frozen=True)
class EvaluateConfig:
    sampler: SamplerName = "ddim"                # ddpm | ddim | dpmpp_2m (DPM-Solver++ 2M) | unipc (bh2)
    steps: int = _bound(50, ge=1)                # network evaluations (<= diffusion.timesteps)
    spacing: Spacing = "linspace"                # timesteps of dpmpp_2m / unipc (diffusers' conventions)
    eta: float = _bound(0.0, ge=0.0, le=1.0)     # DDIM stochasticity; 0 = deterministic
    guidance_scale: float = _bound(1.0, ge=0.0)  # classifier-free guidance; 1 = plain conditional
    num_samples: int = _bound(64, ge=1)          # images in the sample grid
    batch_size: int = _bound(256, ge=1)
    seed: int = _bound(0, ge=0)
    clip_denoised: bool = True                   # clip predicted x0 to [-1, 1] at each step
    precision: Precision = "auto"                # network autocast while sampling: auto | fp32 | bf16 | fp16
    memory_format: MemoryFormat = "auto"         # auto: channels_last only where measured faster
    confidence_threshold: float = _bound(0.9, gt=0.0, le=1.0)  # "recognised" = classifier prob >= this
    fid_samples: int = _bound(1000, ge=2)        # generated images per seed for FID / KID
    fid_seeds: int = _bound(3, ge=1)             # repeats; the report gives mean and spread
    kid_subset_size: int = _bound(1000, ge=2)
    reference_cache: str = "data/reference_stats"  # cached real-data statistics (keyed, never stale)
    metrics_path: str = "metrics/eval.json"      # for dvc metrics show
    grid_path: str = "metrics/samples.png"       # fixed-seed sample grid


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow tracking and registry (used by flows/, never imported by the library)."""
    tracking_uri: str = ""                       # "" : $MLFLOW_TRACKING_URI, else SQLite under local_dir
    local_dir: str = "mlflow"                    # embedded store: mlflow.db + artifacts/
    experiment: str = "ddpm"
    model_name: str = "ddpm"                     # registered model
    champion_margin: float = _bound(0.0, ge=0.0)  # FID points a challenger must win by (at gate_confidence)
    gate_confidence: float = _bound(0.95, ge=0.5, lt=1.0)  # one-sided confidence of a promotion
    flush_every: int = _bound(50, ge=1)          # buffered metric values per MLflow batch call
    grid_images: int = _bound(16, ge=0)          # sample grid logged at each checkpoint (0: none)
    grid_steps: int = _bound(20, ge=1)           # DDIM steps for those grids
    system_metrics_every: float = _bound(10.0, ge=0.0)  # seconds between CPU/memory/GPU samples (0: off)


@dataclass(frozen=True)
class SweepConfig:
    """A budgeted hyper-parameter search (flows/sweep.py); decides no single model, so it is not
    part of :meth:`Config.hash`. ``space`` maps a config key path to a list of choices or to
    ``{low, high, log}`` for a number, each checked against that key's type and range."""
    space: dict = field(default_factory=dict)    # section.key -> [choices] | {low, high, log}
    trials: int = _bound(8, ge=1)                # trials drawn from the space (seeded, stratified)
    budget_minutes: float = _bound(20.0, gt=0.0)  # wall clock of the whole search
    scheduler: SweepScheduler = "asha"           # asha: stop weak trials early | none: run all to the end
    grace_minutes: float = _bound(2.0, gt=0.0)   # training minutes a trial gets before ASHA may stop it
    reduction_factor: float = _bound(2.0, gt=1.0)  # ASHA keeps 1 / this many at each rung
    quick_fid_samples: int = _bound(200, ge=2)   # samples per quick FID (one seed, fp32, evaluate.sampler)
    checkpoint_every: int = _bound(100, ge=1)    # trials' train.checkpoint_every: steps between quick FIDs
    max_concurrent: Auto | int = _bound("auto", ge=1)  # auto: cluster CPUs (GPUs) / per trial, >= 1
    cpus_per_trial: float = _bound(1.0, gt=0.0)  # what one trial holds, all its workers together
    gpus_per_trial: float = _bound(0.0, ge=0.0)  # > 0: trials train on GPUs
    workers_per_trial: int = _bound(1, ge=1)     # > 1: each trial is a Ray Train DDP run of this many
                                                 # workers, sharing the trial's CPUs / GPUs equally
    seed: int = _bound(0, ge=0)                  # draws the trials' points from the space
    storage_path: str = "runs/sweep"             # Tune's experiment; a re-run of the same name resumes it
    name: str = "default"


@dataclass(frozen=True)
class Config:
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    train: TrainConfig = TrainConfig()
    ray: RayConfig = RayConfig()
    extractor: ExtractorConfig = ExtractorConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    tracking: TrackingConfig = TrackingConfig()
    sweep: SweepConfig = SweepConfig()

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def public_dict(self) -> dict[str, Any]:
        """:meth:`to_dict` with every URL's user-info removed (:func:`redact_url`): what
        checkpoints and tracking records keep, which others may read."""
        return _plain(dataclasses.asdict(self), redact_url)

    def hash(self, exclude: typing.Iterable[str] = ()) -> str:
        """sha256 of the canonical JSON of the tree, without the dotted key paths in ``exclude``."""
        tree = self.to_dict()
        tree.pop("sweep")
        for dotted in exclude:
            section, key = dotted.split(".")
            tree[section].pop(key, None)
        blob = json.dumps(tree, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()


def _plain(value: Any, text: typing.Callable[[str], str] = str) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v, text) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, text) for v in value]
    return text(value) if isinstance(value, str) else value


# scheme://user-info@ (RFC 3986: the user-info ends at the authority's last "@")
_URL_USERINFO = re.compile(r"\b([A-Za-z][A-Za-z0-9+.-]*://)[^/?#\s]*@")


def redact_url(text: str) -> str:
    """``text`` with the user-info (``user:password@``, ``token@``) of every URL in it removed,
    e.g. ``https://user:token@host/x.git`` -> ``https://host/x.git``; other text is unchanged."""
    return _URL_USERINFO.sub(r"\1", text)


# --------------------------------------------------------------------------- loading

_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _type_name(tp: Any) -> str:
    if get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) is tuple:
        return f"a list of {_type_name(get_args(tp)[0])}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        tp, str(tp))


def _coerce(value: Any, tp: Any, path: str, errors: list[str]) -> Any:
    """Check ``value`` against the annotation ``tp``; return the typed value or record an error."""
    bad = f"{path} = {value!r}: expected {_type_name(tp)}"
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):     # the first alternative that fits
        for alternative in get_args(tp):
            trial: list[str] = []
            typed = _coerce(value, alternative, path, trial)
            if not trial:
                return typed
        errors.append(bad)
    elif origin is Literal:
        if value in get_args(tp) and isinstance(value, str):
            return value
        errors.append(bad)
    elif origin is tuple:
        if not isinstance(value, (list, tuple)):
            errors.append(bad)
            return None
        return tuple(_coerce(v, get_args(tp)[0], f"{path}[{i}]", errors) for i, v in enumerate(value))
    elif tp is bool:
        if isinstance(value, bool):
            return value
        errors.append(bad)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        errors.append(bad)
    elif tp is float:
        # PyYAML reads "1e-3" as a string (YAML 1.1); accept any decimal literal here.
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            return float(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        errors.append(bad)
    elif tp is str:
        if isinstance(value, str):
            return value
        errors.append(bad)
    else:  # pragma: no cover - a new annotation kind needs a branch above
        raise TypeError(f"unsupported config annotation {tp!r} at {path}")
    return None


_RANGE_RULES = {"ge": (operator.ge, ">="), "gt": (operator.gt, ">"),
                "le": (operator.le, "<="), "lt": (operator.lt, "<")}


def _check_range(value: Any, meta: typing.Mapping[str, Any], path: str, errors: list[str]) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    for key, (holds, symbol) in _RANGE_RULES.items():
        limit = meta.get(key)
        if limit is not None and not holds(value, limit):
            errors.append(f"{path} = {value!r}: must be {symbol} {limit}")


def _build_section(cls: type, raw: Any, path: str, errors: list[str]) -> Any:
    if not isinstance(raw, dict):
        errors.append(f"{path} = {raw!r}: expected a mapping of keys for section '{path}'")
        return cls()
    if cls is SweepConfig and "space" in raw:
        space = _check_space(raw["space"], errors)
        return dataclasses.replace(_build_section(cls, {k: v for k, v in raw.items() if k != "space"},
                                                  path, errors), space=space)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    for key in unknown:
        errors.append(f"{path}.{key} = {raw[key]!r}: unknown key; allowed keys: {', '.join(fields)}")
    kwargs = {}
    for name, value in raw.items():
        if name not in fields:
            continue
        n_errors = len(errors)
        typed = _coerce(value, hints[name], f"{path}.{name}", errors)
        if len(errors) == n_errors:
            _check_range(typed, fields[name].metadata, f"{path}.{name}", errors)
            kwargs[name] = typed
    return cls(**kwargs)


_SECTIONS: dict[str, type] = {f.name: typing.get_type_hints(Config)[f.name]
                              for f in dataclasses.fields(Config)}


# sweep.space keys: only what changes the trained model (every trial has the same yardstick,
# data and bookkeeping); the others, with why
_SWEEPABLE_SECTIONS = ("model", "diffusion", "train")
_UNSWEEPABLE_TRAIN = {
    "out_dir": "each trial writes to its own directory",
    "device": "trials' devices come from sweep.gpus_per_trial",
    "checkpoint_every": "set sweep.checkpoint_every (the steps between the trials' quick-FID reports)",
    "log_every": "it does not change the trained model",
    "compile": "it does not change the trained model, only its speed",
}
_UNSWEEPABLE_SECTIONS = {
    "evaluate": "evaluate.* would give trials different yardsticks (the quick FID uses the base's evaluate)",
    "extractor": "extractor.* would give trials different yardsticks",
    "data": "data.* would train trials on different data (a sweep is of one data version)",
}


def _unsweepable(section: str, name: str) -> str | None:
    """Why ``section.name`` may not vary in a sweep, or None."""
    if section == "train":
        return _UNSWEEPABLE_TRAIN.get(name)
    if section not in _SWEEPABLE_SECTIONS:
        return _UNSWEEPABLE_SECTIONS.get(section, f"{section}.* does not change the trained model")
    return None


def _check_space(raw: Any, errors: list[str]) -> dict[str, Any]:
    """``sweep.space``: each key a real ``section.key`` (not of the sweep section), each value a
    non-empty list of choices of that key's type and range, or ``{low, high, log}`` for a number."""
    if not isinstance(raw, dict):
        errors.append(f"sweep.space = {raw!r}: expected a mapping of section.key -> list of choices "
                      "or {low, high, log}")
        return {}
    out: dict[str, Any] = {}
    for key, value in raw.items():
        path = f"sweep.space.{key}"
        section, _, name = str(key).partition(".")
        cls = _SECTIONS.get(section)
        fields = {f.name: f for f in dataclasses.fields(cls)} if cls and cls is not SweepConfig else {}
        if name not in fields:
            errors.append(f"{path}: unknown config key; expected section.key of "
                          f"{', '.join(s for s in _SECTIONS if s != 'sweep')}, e.g. train.lr")
            continue
        why = _unsweepable(section, name)
        if why:
            errors.append(f"{path}: not a key a sweep may vary (model.*, diffusion.*, train.* but "
                          f"{', '.join('train.' + k for k in _UNSWEEPABLE_TRAIN)}): {why}")
            continue
        tp, meta, n_errors = typing.get_type_hints(cls)[name], fields[name].metadata, len(errors)
        if isinstance(value, list) and value:
            typed = [_coerce(v, tp, f"{path}[{i}]", errors) for i, v in enumerate(value)]
            if len(errors) == n_errors:
                for i, v in enumerate(typed):
                    _check_range(v, meta, f"{path}[{i}]", errors)
                    if key == "model.preset" and v not in MODEL_PRESETS:
                        errors.append(f"{path}[{i}] = {v!r}: expected one of "
                                      f"{', '.join(map(repr, MODEL_PRESETS))}")
            out[key] = typed
        elif isinstance(value, dict) and tp in (int, float):
            extra = sorted(set(value) - {"low", "high", "log"})
            if extra or not {"low", "high"} <= set(value):
                errors.append(f"{path} = {value!r}: expected {{low, high}} with optional log: true/false")
                continue
            low, high = (_coerce(value[k], tp, f"{path}.{k}", errors) for k in ("low", "high"))
            log = _coerce(value.get("log", False), bool, f"{path}.log", errors)
            if len(errors) == n_errors:
                _check_range(low, meta, f"{path}.low", errors)
                _check_range(high, meta, f"{path}.high", errors)
                if not low < high:
                    errors.append(f"{path}: low = {low!r} must be < high = {high!r}")
                if log and low <= 0:
                    errors.append(f"{path}.low = {low!r}: must be > 0 with log: true")
            out[key] = {"low": low, "high": high, "log": log}
        else:
            kind = "a non-empty list of choices" + (" or {low, high, log}" if tp in (int, float) else "")
            errors.append(f"{path} = {value!r}: expected {kind} ({_type_name(tp)})")
    return out


def _expand_model_preset(raw: dict[str, Any], errors: list[str]) -> None:
    model = raw.get("model")
    if not isinstance(model, dict) or "preset" not in model:
        return
    name = model["preset"]
    if name not in MODEL_PRESETS:
        errors.append(f"model.preset = {name!r}: expected one of {', '.join(map(repr, MODEL_PRESETS))}")
        return
    raw["model"] = {**MODEL_PRESETS[name], **model}


def _check_cross_fields(cfg: Config, errors: list[str]) -> None:
    m, d = cfg.model, cfg.data
    levels = len(cfg.model.channel_mult)
    if levels == 0:
        errors.append("model.channel_mult = (): expected at least one level")
        return
    if any(c < 1 for c in m.channel_mult):
        errors.append(f"model.channel_mult = {list(m.channel_mult)}: multipliers must be >= 1")
    factor = 2 ** (levels - 1)
    if d.resolution % factor:
        errors.append(f"data.resolution = {d.resolution}: must be divisible by {factor} "
                      f"for {levels} levels of model.channel_mult")
    sizes = [d.resolution // 2 ** i for i in range(levels)]
    for r in m.attention_resolutions:
        if r not in sizes:
            errors.append(f"model.attention_resolutions contains {r}: feature-map sizes of this "
                          f"model are {sizes}")
    for c in {m.base_channels * k for k in m.channel_mult}:
        if c % m.num_heads:
            errors.append(f"model.num_heads = {m.num_heads}: must divide every level's channels")
            break
    if d.channels == 2:
        errors.append("data.channels = 2: expected 1 (grey) or 3 (RGB)")
    if d.source in ("folder", "s3") and not d.path:
        errors.append(f"data.path = '': data.source = {d.source!r} needs a path"
                      + (" (s3://bucket/prefix)" if d.source == "s3" else ""))
    if d.source == "s3" and d.path and not d.path.startswith("s3://"):
        errors.append(f"data.path = {d.path!r}: expected s3://bucket/prefix for data.source = 's3'")
    if cfg.evaluate.steps > cfg.diffusion.timesteps:
        errors.append(f"evaluate.steps = {cfg.evaluate.steps}: must be <= diffusion.timesteps "
                      f"({cfg.diffusion.timesteps})")


def config_from_dict(raw: Any, source: str = "params") -> Config:
    """Build and check a :class:`Config` from a plain mapping (e.g. parsed YAML)."""
    errors: list[str] = []
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    raw = dict(raw)
    for key in sorted(set(raw) - set(_SECTIONS)):
        errors.append(f"{key}: unknown section; allowed sections: {', '.join(_SECTIONS)}")
    _expand_model_preset(raw, errors)
    sections = {name: _build_section(cls, raw.get(name, {}), name, errors)
                for name, cls in _SECTIONS.items()}
    cfg = Config(**sections)
    if not errors:
        _check_cross_fields(cfg, errors)
    if errors:
        raise ConfigError(f"{source}: invalid configuration:\n  " + "\n  ".join(errors))
    return cfg


def apply_overrides(raw: dict[str, Any], overrides: typing.Sequence[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with ``section.key=value`` overrides applied (values parsed as YAML)."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in (raw or {}).items()}
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) != 2 or not all(parts):
            raise ConfigError(f"override {item!r}: expected section.key=value, e.g. train.lr=1e-4")
        section, name = parts
        out.setdefault(section, {})
        if not isinstance(out[section], dict):
            raise ConfigError(f"override {item!r}: section '{section}' is not a mapping")
        out[section][name] = yaml.safe_load(text) if text.strip() else ""
    return out


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Load ``params.yaml`` (or defaults when ``path`` is None) and apply overrides."""
    raw: Any = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        try:
            raw = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: file not found") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if overrides:
        if raw is not None and not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a mapping of sections")
        raw = apply_overrides(raw or {}, overrides)
        source += " (with overrides)"
    return config_from_dict(raw, source)
