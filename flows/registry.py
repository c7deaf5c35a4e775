"""The generator as an MLflow model, and the registry gate that guards the ``champion`` alias.

Every evaluated model becomes a new version of ``tracking.model_name``, tagged with its lineage
(dataset version, git commit, params hash, FID and spread, extractor hash, Prefect flow-run id,
Ray run name). The gate: with the current champion at FID ``c ± s_c`` and the new version at
``f ± s_f`` (mean ± standard deviation over the evaluation seeds), the champion moves only when

    c - f > tracking.champion_margin + sqrt(s_c^2 + s_f^2)

i.e. the new model wins by the margin *beyond* the seed noise; otherwise it gets ``challenger``.
The decision, the previous champion and the reason are written on the version before the alias
moves; moving the alias is one registry call and the last step, so a crash at any point leaves
the old champion in place (the version then shows ``gate.status = pending``).
"""

from __future__ import annotations

import importlib.metadata
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

import diffusion
from diffusion.checkpoint import checkpoint_config, load_checkpoint
from diffusion.config import Config
from flows import generator_model
from flows.tracking import client_for, using_tracking_uri

CHAMPION, CHALLENGER = "champion", "challenger"
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
    with using_tracking_uri(uri), mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="generator", python_model=generator_model.__file__,
            artifacts={"checkpoint": str(checkpoint)},
            code_paths=[str(Path(diffusion.__file__).parent)],
            signature=generator_signature(cfg), input_example=example,
            pip_requirements=pip_requirements())
    return info.model_uri


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reason: str


def decide(new_fid: float, new_std: float, champion_fid: float | None,
           champion_std: float | None, margin: float) -> GateDecision:
    if not math.isfinite(new_fid):
        return GateDecision(False, f"FID {new_fid} is not finite")
    if champion_fid is None:
        return GateDecision(True, f"no champion yet; FID {new_fid:.4f} ± {new_std:.4f}")
    spread = math.sqrt(new_std ** 2 + (champion_std or 0.0) ** 2)
    gain = champion_fid - new_fid
    needed = margin + spread
    verdict = "beats" if gain > needed else "does not beat"
    return GateDecision(gain > needed,
                        f"FID {new_fid:.4f} ± {new_std:.4f} {verdict} champion {champion_fid:.4f} ± "
                        f"{champion_std or 0.0:.4f}: gain {gain:.4f} vs needed {needed:.4f} "
                        f"(margin {margin} + spread {spread:.4f})")


@dataclass(frozen=True)
class Registration:
    name: str
    version: str
    alias: str
    previous_champion: str | None
    reason: str
    model_uri: str
    run_id: str

    def to_dict(self) -> dict:
        return asdict(self)


def _current_champion(client: MlflowClient, name: str):
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


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


def register(uri: str, cfg: Config, *, model_uri: str, run_id: str, fid: float, fid_std: float,
             lineage: dict[str, str], evaluation: dict | None = None) -> Registration:
    """A new version of ``tracking.model_name`` with lineage tags, then the champion gate. The
    version gets a description and the training run a note (MLflow's ``mlflow.note.content``)
    with the numbers that decide and the gate's decision."""
    client = client_for(uri)
    name = cfg.tracking.model_name
    try:
        client.create_registered_model(name, description="DDPM generators; champion = best FID")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    tags = {**{k: str(v) for k, v in lineage.items()}, "fid": repr(float(fid)),
            "fid_std": repr(float(fid_std)), "gate.status": "pending"}
    # MLflow 3 logged models are "models:/<model id>"; the registry wants the id with them
    model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") else None
    with using_tracking_uri(uri):            # the store resolves models:/ through the global URI
        mv = client.create_model_version(name, source=model_uri, run_id=run_id, tags=tags,
                                         model_id=model_id)
    champion = _current_champion(client, name)
    decision = decide(fid, fid_std,
                      float(champion.tags["fid"]) if champion and "fid" in champion.tags else None,
                      float(champion.tags.get("fid_std", 0.0)) if champion else None,
                      cfg.tracking.champion_margin)
    alias = CHAMPION if decision.promote else CHALLENGER
    previous = champion.version if champion else None
    for key, value in {"gate.decision": alias, "gate.previous_champion": previous or "none",
                       "gate.reason": decision.reason,
                       "gate.margin": repr(cfg.tracking.champion_margin)}.items():
        client.set_model_version_tag(name, mv.version, key, value)
    text = describe(fid, fid_std, lineage, evaluation or {}, alias, decision.reason)
    client.update_model_version(name, mv.version, description=text)
    client.set_tag(run_id, "mlflow.note.content", f"Registered as {name} version {mv.version}. {text}")
    client.set_registered_model_alias(name, alias, mv.version)    # the commit point
    client.set_model_version_tag(name, mv.version, "gate.status", "done")
    return Registration(name, str(mv.version), alias, previous, decision.reason, model_uri, run_id)
