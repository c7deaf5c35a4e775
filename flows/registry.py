"""The generator as an MLflow model, and the registry gate that guards the ``champion`` alias.

Every evaluated model becomes a new version of ``tracking.model_name``, tagged with its lineage
(dataset version, git commit, params hash, FID and spread, extractor hash, Prefect flow-run id,
Ray run name), the digest of its weights and its *yardstick* (:func:`diffusion.evaluate.yardstick`:
what makes two FIDs comparable). The gate compares like with like: when the champion was measured
under another yardstick (or under none), it is first re-scored under the challenger's: its model
is loaded from the registry and sampled with the same seeds, sample count, sampler and precision.
Then the decision is :func:`diffusion.gate.compare` on the paired samples: the champion moves only
when the challenger's gain exceeds ``tracking.champion_margin`` with one-sided confidence
``tracking.gate_confidence``; otherwise the new version gets ``challenger``.

Weights already registered (same digest) are not registered again. Registration and the gate run
under one lock: a Prefect global concurrency limit when running in a Prefect flow, and a file lock
beside the embedded store (or in the user cache for a tracking server) always, so two
registrations never decide on a stale champion. The decision, the numbers and the reason are
written on the version before the alias moves; moving the alias is one registry call and the
last step, so a crash at any point leaves the old champion in place (the version then shows
``gate.status = pending``). ``python -m flows.registry rollback --to VERSION --reason "..."``
moves the champion back, under the same lock, recording who, why and when on both versions.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import fcntl
import getpass
import hashlib
import importlib.metadata
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

import diffusion
from diffusion.checkpoint import checkpoint_config, load_checkpoint
from diffusion.config import Config, ConfigError, load_config
from diffusion.evaluate import YARDSTICK_PARTS, load_features, yardstick
from diffusion.gate import Comparison, compare, per_seed_fid
from flows import generator_model
from flows.tracking import client_for, tracking_uri, using_tracking_uri

CHAMPION, CHALLENGER = "champion", "challenger"
FEATURES_ARTIFACT = "evaluation/features.npz"      # on each training run: its samples' features




class GateError(RuntimeError):
    """The gate cannot decide or a registry request is refused; the alias is unchanged."""

_REQUIREMENTS = ("mlflow", "torch", "numpy", "pandas", "pyyaml", "tqdm", "pillow", "scipy")


def pip_requirements() -> list[str]:
    """The serving environment, pinned to this one (no network look-ups at log time)."""
    pins = []
    for name in _REQUIREMENTS:
        version = importlib.metadata.version(name).split("+")[0]
        pins.append(f"{name}=={version}")
    return pins


def generator_signature(cfg: Config) -> ModelSignature:
    import numpy as np
    inputs = Schema([ColSpec(t, name, required=req) for name, (t, req) in generator_model.INPUTS.items()])
    params = ParamSchema([ParamSpec(name, t, default) for name, (t, default) in generator_model.PARAMS.items()])
    r, c = cfg.data.resolution, cfg.data.channels
    return ModelSignature(inputs=inputs, outputs=Schema([TensorSpec(np.dtype("uint8"), (-1, r, r, c))]),
                          params=params)


def log_generator(uri: str, run_id: str, checkpoint: str | Path, steps: int = 10) -> str:
    """Log the checkpoint as the pyfunc generator on ``run_id``; returns the model URI."""
    cfg = checkpoint_config(load_checkpoint(checkpoint), checkpoint)
    example = (pd.DataFrame([{"num_images": 2, "class_label": 0 if cfg.model.num_classes else -1}]),
               {"steps": min(steps, cfg.diffusion.timesteps), "seed": 0})
    try:
        with using_tracking_uri(uri), mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="generator", python_model=generator_model.__file__,
                artifacts={"checkpoint": str(checkpoint)},
                code_paths=[str(Path(diffusion.__file__).parent)],
                signature=generator_signature(cfg), input_example=example,
                pip_requirements=pip_requirements())
    except BaseException:              # an interrupt or error here: the training itself finished
        client_for(uri).set_terminated(run_id, "FINISHED")
        raise
    return info.model_uri


@dataclass(frozen=True)
class Registration:
    name: str
    version: str
    alias: str
    previous_champion: str | None
    reason: str
    model_uri: str
    run_id: str
    duplicate_of: str | None = None       # the version that already holds these weights
    champion_rescored: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def _current_champion(client: MlflowClient, name: str):
    """The champion's version, None when there is none; any other registry error is raised (a
    server that does not answer must not read as "no champion yet")."""
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as exc:
        if exc.error_code in ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
            return None
        raise


def registered_version(client: MlflowClient, name: str, weights_sha256: str):
    """The version of ``name`` that holds these weights, or None. A version whose gate never
    finished (``gate.status`` pending and no alias: the process died before the alias moved)
    does not count."""
    try:
        found = client.search_model_versions(f"name = '{name}' and tags.weights_sha256 = '{weights_sha256}'")
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    held = [v for v in found if v.tags.get("gate.status") != "pending" or v.aliases]
    return min(held, key=lambda v: int(v.version)) if held else None


# ---- the lock ------------------------------------------------------------------------------

def _lock_file(uri: str, name: str) -> Path:
    """Beside the embedded SQLite store; for a server, in the user cache (one machine)."""
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///")).parent / f".registry-{name}.lock"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ddpm-pipeline" / "locks"
    return cache / f"registry-{hashlib.sha256(f'{uri}|{name}'.encode()).hexdigest()[:16]}.lock"


@contextlib.contextmanager
def _file_lock(path: Path, timeout: float) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:            # flock: per open file, so threads exclude each other too
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise GateError(f"{path}: another registration held the registry lock for more "
                                    f"than {timeout:.0f} s") from None
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _in_prefect_run() -> bool:
    if "prefect" not in sys.modules:
        return False
    from prefect.context import FlowRunContext, TaskRunContext
    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def gcl_name(name: str) -> str:
    return f"ddpm-registry-{name}"


@contextlib.contextmanager
def _prefect_lock(name: str, timeout: float) -> Iterator[None]:
    """One slot of the global concurrency limit ``ddpm-registry-<model>`` (created with limit 1
    when missing): registrations from every flow run on the Prefect server take turns."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectAlreadyExists
    with get_client(sync_client=True) as client:
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=gcl_name(name), limit=1))
        except ObjectAlreadyExists:
            pass
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(concurrency(gcl_name(name), occupy=1, timeout_seconds=timeout, strict=True))
        except TimeoutError:
            raise GateError(f"Prefect global concurrency limit {gcl_name(name)!r}: another registration "
                            f"held it for more than {timeout:.0f} s") from None
        yield


@contextlib.contextmanager
def registry_lock(uri: str, name: str, timeout: float = 1800.0) -> Iterator[None]:
    """Registration, the gate and rollback of ``name`` run one at a time."""
    with contextlib.ExitStack() as stack:
        if _in_prefect_run():
            stack.enter_context(_prefect_lock(name, timeout))
        elif os.environ.get("PREFECT_API_URL"):   # a CLI rollback or `dvc repro` beside deployments
            try:
                stack.enter_context(_prefect_lock(name, timeout))
            except GateError:
                raise
            except Exception as exc:   # noqa: BLE001 - the server is down: this machine's lock only
                print(f"warning: the Prefect server at PREFECT_API_URL did not answer "
                      f"({type(exc).__name__}); the registry lock holds on this machine only",
                      file=sys.stderr)
        stack.enter_context(_file_lock(_lock_file(uri, name), timeout))
        yield


# ---- the champion's numbers under the challenger's yardstick ---------------------------------

def _download(uri: str, **kwargs) -> Path:
    with using_tracking_uri(uri):            # models:/ URIs resolve through the global registry URI
        return Path(mlflow.artifacts.download_artifacts(tracking_uri=uri, **kwargs))


def _checkpoint_of(uri: str, name: str, version, dst: Path) -> Path:
    """The registered version's checkpoint file, downloaded under ``dst`` (once)."""
    try:
        dst.mkdir(parents=True, exist_ok=True)
        found = list(dst.rglob("checkpoint.pt"))
        if found:
            return found[0]
        model_dir = _download(uri, artifact_uri=f"models:/{name}/{version.version}", dst_path=str(dst))
        return next(model_dir.rglob("checkpoint.pt"))
    except (MlflowException, OSError, StopIteration) as exc:
        raise GateError(f"champion {name} version {version.version} cannot be re-scored: its model "
                        f"could not be loaded from the registry ({type(exc).__name__}: {exc})") from None


def _backfill_digest(client: MlflowClient, uri: str, name: str, version, dst: Path) -> str:
    """The weights digest of a version registered before digests were recorded, recorded now."""
    from diffusion.checkpoint import weights_sha256
    digest = weights_sha256(load_checkpoint(_checkpoint_of(uri, name, version, dst)))
    client.set_model_version_tag(name, version.version, "weights_sha256", digest)
    if "gate.status" not in version.tags:
        client.set_model_version_tag(name, version.version, "gate.status", "done")
    return digest


def rescore(uri: str, cfg: Config, version, parts: dict, dst: Path,
            device: str = "cpu") -> np.ndarray:
    """Sample the registered ``version`` under the yardstick ``parts`` (same seeds, sample count,
    sampler, precision; the configured extractor and prepared data, which must be the
    yardstick's) and return its features (seeds, samples, d)."""
    from diffusion.evaluate import evaluate, features_path
    from flows.stages import load_extractor
    name = cfg.tracking.model_name
    checkpoint = _checkpoint_of(uri, name, version, dst)
    theirs = checkpoint_config(load_checkpoint(checkpoint), checkpoint)
    for key in ("resolution", "channels"):
        if getattr(theirs.data, key) != getattr(cfg.data, key):
            raise GateError(
                f"champion {name} version {version.version} was trained on data.{key} = "
                f"{getattr(theirs.data, key)}, this run on {getattr(cfg.data, key)}: their FIDs cannot "
                f"be compared; register under another tracking.model_name, or roll back")
    extractor = load_extractor(cfg)
    if extractor.sha256 != parts["extractor_sha256"]:
        raise GateError(f"{cfg.extractor.path}: extractor sha256 {extractor.sha256[:12]} is not the "
                        f"yardstick's {parts['extractor_sha256'][:12]}; re-run the extractor and evaluate stages")
    ev = dataclasses.replace(
        cfg.evaluate, sampler=parts["sampler"], steps=parts["steps"], spacing=parts["spacing"],
        eta=parts["eta"], guidance_scale=parts["guidance_scale"], clip_denoised=parts["clip_denoised"],
        fid_samples=parts["samples_per_seed"], fid_seeds=parts["seeds"], seed=parts["seed"],
        precision=parts["precision"], metrics_path=str(dst / "champion.json"),
        grid_path=str(dst / "champion.png"))
    try:
        metrics = evaluate(checkpoint, dataclasses.replace(cfg, evaluate=ev), extractor,
                           progress=False, device=device, on_setup=lambda setup: None)
    except Exception as exc:   # noqa: BLE001 - any failure to sample it is the same answer
        raise GateError(f"champion {name} version {version.version} cannot be re-scored under this "
                        f"run's yardstick: {type(exc).__name__}: {exc}") from None
    if metrics["yardstick"] != yardstick(parts):
        differ = sorted(k for k in YARDSTICK_PARTS if metrics["yardstick_parts"].get(k) != parts.get(k))
        raise GateError(f"champion {name} version {version.version} re-scored under another "
                        f"yardstick (differs in {', '.join(differ)})")
    return load_features(features_path(ev.metrics_path))["features"]


def _champion_features(uri: str, cfg: Config, champion, mine: dict, parts: dict, dst: Path,
                       device: str) -> tuple[np.ndarray, bool]:
    """The champion's features under the challenger's yardstick: its own when it was measured
    under the same one (the artifact on its run), else re-scored. Returns (features, rescored)."""
    dst.mkdir(parents=True, exist_ok=True)
    if champion.tags.get("gate.yardstick") == mine["yardstick"] and champion.run_id:
        try:
            theirs = load_features(_download(uri, run_id=champion.run_id, artifact_path=FEATURES_ARTIFACT,
                                             dst_path=str(dst)))
            if theirs["yardstick"] == mine["yardstick"] and theirs["features"].shape == mine["features"].shape:
                return theirs["features"], False
        except (MlflowException, OSError, ValueError):
            pass                              # gone or unreadable: measure it again
    return rescore(uri, cfg, champion, parts, dst, device), True


def decide(champion: np.ndarray | None, challenger: np.ndarray, mu: np.ndarray, sigma: np.ndarray,
           margin: float, confidence: float) -> tuple[bool, str, Comparison | None]:
    """(promote, reason, comparison) for features (seeds, samples, d); no champion: promote."""
    if not np.isfinite(challenger).all():
        return False, "the challenger's features are not finite", None
    if champion is None:
        fid, std = per_seed_fid(challenger, mu, sigma)
        return True, f"no champion yet; FID {fid:.4f} ± {std:.4f}", None
    if not np.isfinite(champion).all():
        return True, "the champion's samples are not finite under this yardstick; replaced", None
    d = challenger.shape[-1]
    c = compare(champion.reshape(-1, d), challenger.reshape(-1, d), mu, sigma, margin=margin,
                confidence=confidence)
    return c.promote, c.reason, c


def describe(fid: float, fid_std: float, lineage: dict[str, str], evaluation: dict,
             alias: str, reason: str) -> str:
    """The model version's description and the run's note: what a user decides on, in one place."""
    floor = evaluation.get("floor_fid")
    lines = [f"**{alias}**: {reason}", "",
             f"- FID {fid:.3f} ± {fid_std:.3f}" + (f" (real-vs-real floor {floor:.3f})" if floor else ""),
             f"- sampled with {evaluation.get('sampler', '?')}, {evaluation.get('steps', '?')} steps, "
             f"guidance {evaluation.get('guidance_scale', '?')}"]
    if "confident_share" in evaluation:
        lines.append(f"- recognised {evaluation['confident_share']:.1%}, class entropy "
                     f"{evaluation.get('class_entropy_ratio', float('nan')):.3f} of max")
    lines += [f"- trained {lineage.get('checkpoint_step', '?')} steps on dataset "
              f"`{lineage.get('dataset_version', '?')}` (DVC)",
              f"- git {lineage.get('git_commit', '?')}, MLflow run {lineage.get('mlflow_run_id', '?')}"]
    return "\n".join(lines)


def register(uri: str, cfg: Config, *, model_uri: str | Callable[[], str], run_id: str,
             evaluation: dict, features_file: str | Path, lineage: dict[str, str],
             weights_sha256: str, device: str = "cpu",
             on_decided: Callable[[str], None] | None = None) -> Registration:
    """A new version of ``tracking.model_name`` with lineage tags, then the champion gate, all
    under :func:`registry_lock`. ``model_uri``: the logged model, or a function that logs it
    (called only when the weights are not registered yet). ``evaluation``: the evaluate stage's
    metrics (with ``yardstick_parts``); ``features_file``: its features (logged on the run for
    later gates). The version gets a description and the training run a note with the numbers
    that decide and the decision. ``on_decided`` is called with the alias just before it moves."""
    client = client_for(uri)
    name = cfg.tracking.model_name
    mine = load_features(features_file)
    parts = evaluation.get("yardstick_parts")
    if not isinstance(parts, dict):
        raise GateError("evaluation metrics: key 'yardstick_parts' missing; re-run the evaluate stage")
    try:
        stick = yardstick(parts)
    except KeyError as exc:
        raise GateError(f"evaluation metrics: {exc.args[0]}; re-run the evaluate stage") from None
    if stick != mine["yardstick"]:
        raise GateError(f"{features_file}: features of yardstick {mine['yardstick']}, but the metrics "
                        f"say {stick}; re-run the evaluate stage")
    try:
        client.create_registered_model(name, description="DDPM generators; champion = best FID")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    with registry_lock(uri, name), tempfile.TemporaryDirectory(prefix="ddpm-gate-") as tmp:
        held = registered_version(client, name, weights_sha256)
        if held is not None:
            aliases = ", ".join(held.aliases) or "no alias"
            return Registration(name, str(held.version), ",".join(held.aliases) or "none", None,
                                f"these weights are already registered as version {held.version} "
                                f"({aliases}); nothing registered", held.source, run_id,
                                duplicate_of=str(held.version))
        champion = _current_champion(client, name)
        theirs, rescored = (None, False)
        if champion is not None and "weights_sha256" not in champion.tags:   # from before digests
            if _backfill_digest(client, uri, name, champion, Path(tmp) / "champion") == weights_sha256:
                return Registration(name, str(champion.version), CHAMPION, None,
                                    f"these weights are already registered as version "
                                    f"{champion.version} (champion); nothing registered",
                                    champion.source, run_id, duplicate_of=str(champion.version))
        if champion is not None:
            theirs, rescored = _champion_features(uri, cfg, champion, mine, parts, Path(tmp) / "champion",
                                                  device)
        logged = Path(tmp) / "log" / Path(FEATURES_ARTIFACT).name    # for the next gates to pair with
        logged.parent.mkdir()
        logged.write_bytes(Path(features_file).read_bytes())
        client.log_artifact(run_id, str(logged), artifact_path=Path(FEATURES_ARTIFACT).parent.as_posix())
        t = cfg.tracking
        promote, reason, comparison = decide(theirs, mine["features"], mine["mu"], mine["sigma"],
                                             t.champion_margin, t.gate_confidence)
        alias = CHAMPION if promote else CHALLENGER
        previous = str(champion.version) if champion else None
        decided = {"gate.decision": alias, "gate.previous_champion": previous or "none",
                   "gate.reason": reason, "gate.margin": repr(t.champion_margin),
                   "gate.confidence": repr(t.gate_confidence)}
        if champion is not None:
            finite = np.isfinite(theirs).all()
            c_fid, c_std = per_seed_fid(theirs, mine["mu"], mine["sigma"]) if finite else (math.nan, math.nan)
            decided.update({"gate.champion_fid": repr(c_fid), "gate.champion_fid_std": repr(c_std),
                            "gate.champion_yardstick": champion.tags.get("gate.yardstick", "none"),
                            "gate.champion_rescored": str(rescored).lower()})
            if comparison is not None:
                decided.update({"gate.gain": repr(comparison.gain), "gate.lower_bound": repr(comparison.lower),
                                "gate.stderr": repr(comparison.stderr)})
        model_uri = model_uri() if callable(model_uri) else model_uri
        fid, fid_std = float(evaluation["fid"]), float(evaluation["fid_std"])
        tags = {**{k: str(v) for k, v in lineage.items()}, "fid": repr(fid), "fid_std": repr(fid_std),
                "weights_sha256": weights_sha256, "gate.yardstick": stick,
                **{f"gate.yardstick.{k}": str(parts[k]) for k in YARDSTICK_PARTS}, "gate.status": "pending"}
        # MLflow 3 logged models are "models:/<model id>"; the registry wants the id with them
        model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") else None
        with using_tracking_uri(uri):        # the store resolves models:/ through the global URI
            mv = client.create_model_version(name, source=model_uri, run_id=run_id, tags=tags,
                                             model_id=model_id)
        for key, value in decided.items():
            client.set_model_version_tag(name, mv.version, key, value)
        text = describe(fid, fid_std, lineage, evaluation, alias, reason)
        client.update_model_version(name, mv.version, description=text)
        client.set_tag(run_id, "mlflow.note.content", f"Registered as {name} version {mv.version}. {text}")
        if on_decided is not None:
            on_decided(alias)
        client.set_registered_model_alias(name, alias, mv.version)    # the commit point
        client.set_model_version_tag(name, mv.version, "gate.status", "done")
    return Registration(name, str(mv.version), alias, previous, reason, model_uri, run_id,
                        champion_rescored=rescored)


# ---- rollback --------------------------------------------------------------------------------

def _version_number(to: str, name: str) -> str:
    """``3``, ``v3`` or ``models:/<name>/3``; another model's URI is refused."""
    value = to.strip()
    if value.startswith("models:/"):
        model, _, number = value.removeprefix("models:/").rpartition("/")
        if model != name:
            raise GateError(f"--to {to}: version of model {model!r}, not of {name!r}")
        value = number
    value = value.removeprefix("v")
    if not value.isdigit():
        raise GateError(f"--to {to}: expected a version number of {name!r} (e.g. 3 or models:/{name}/3)")
    return value


def rollback(uri: str, name: str, to: str, reason: str, who: str | None = None) -> dict:
    """Move ``champion`` of ``name`` to version ``to``, recording who, why and when on the
    version that gets it (``rollback.*``) and on the one that loses it (``rolled_back.*``)."""
    if not reason.strip():
        raise GateError("--reason: say why the champion moves back (it is recorded on both versions)")
    client = client_for(uri)
    number = _version_number(to, name)
    who = who or getpass.getuser()
    when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    with registry_lock(uri, name):
        try:
            target = client.get_model_version(name, number)
        except MlflowException:
            raise GateError(f"--to {to}: model {name!r} has no version {number}") from None
        current = _current_champion(client, name)
        if current is not None and str(current.version) == str(target.version):
            return {"name": name, "champion": number, "previous_champion": number, "changed": False}
        for key, value in {"rollback.from": str(current.version) if current else "none",
                           "rollback.reason": reason, "rollback.by": who, "rollback.at": when}.items():
            client.set_model_version_tag(name, number, key, value)
        if current is not None:
            for key, value in {"rolled_back.to": number, "rolled_back.reason": reason,
                               "rolled_back.by": who, "rolled_back.at": when}.items():
                client.set_model_version_tag(name, current.version, key, value)
        client.set_registered_model_alias(name, CHAMPION, number)
    return {"name": name, "champion": number, "previous_champion": str(current.version) if current else None,
            "changed": True, "by": who, "at": when, "reason": reason}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.registry",
                                     description="Registry operations on tracking.model_name.")
    sub = parser.add_subparsers(dest="command", required=True)
    back = sub.add_parser("rollback", help="move the champion alias back to an earlier version")
    back.add_argument("--to", required=True, metavar="VERSION", help="3, v3 or models:/<name>/3")
    back.add_argument("--reason", required=True, help="why (recorded on both versions)")
    back.add_argument("--params", default="params.yaml")
    back.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.params, args.overrides)
        done = rollback(tracking_uri(cfg), cfg.tracking.model_name, args.to, args.reason)
    except (GateError, ConfigError) as exc:
        print(f"error: rollback: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(done, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
