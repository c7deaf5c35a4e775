"""The points of a hyper-parameter search (``sweep.space``) and the configuration of each trial.

Pure and seeded: the same space, trial count and seed give the same points, in the same order, on
every machine. Choices are stratified (each choice of a list appears ``trials / len(choices)``
times, rounded, in a seeded order) and ranges are drawn as a Latin hypercube (one draw per
``1 / trials`` slice of ``[low, high]``, on a log scale with ``log: true``), so a small sweep still
covers its space instead of repeating one corner.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from diffusion.config import Config, config_from_dict
from diffusion.presets import MODEL_PRESETS

# the model keys a preset sets; a trial that changes model.preset drops the base's values of them
_PRESET_KEYS = frozenset(k for preset in MODEL_PRESETS.values() for k in preset)


def draw_points(space: dict[str, Any], trials: int, seed: int) -> list[dict[str, Any]]:
    """``trials`` points ``{section.key: value}`` from ``space`` (see the module's text)."""
    rng = np.random.default_rng(seed)
    columns: dict[str, list[Any]] = {}
    for key in sorted(space):                       # sorted: the order of the YAML does not matter
        dim = space[key]
        if isinstance(dim, list):
            repeated = dim * math.ceil(trials / len(dim))
            columns[key] = [repeated[i] for i in rng.permutation(len(repeated))[:trials]]
        else:
            u = (rng.permutation(trials) + rng.random(trials)) / trials     # (trials,) in [0, 1)
            low, high = dim["low"], dim["high"]
            if dim.get("log"):
                values = np.exp(np.log(low) + u * (np.log(high) - np.log(low)))
            else:
                values = low + u * (high - low)
            integer = isinstance(low, int) and isinstance(high, int)
            columns[key] = [int(round(v)) if integer else float(f"{v:.6g}") for v in values]
    return [{key: columns[key][i] for key in columns} for i in range(trials)]


def trial_config(base: Config, point: dict[str, Any], source: str = "sweep trial") -> Config:
    """``base`` with the point's values set (checked like any configuration). A new
    ``model.preset`` brings that preset's architecture; the base's other model keys stay."""
    raw = base.to_dict()
    for key, value in point.items():
        section, name = key.split(".", 1)
        if key == "model.preset":
            raw["model"] = {k: v for k, v in raw["model"].items() if k not in _PRESET_KEYS}
        raw[section][name] = value
    for key, value in point.items():              # explicit architecture keys beat the preset
        if key.startswith("model.") and key != "model.preset":
            raw["model"][key.split(".", 1)[1]] = value
    return config_from_dict(raw, source)


def point_label(point: dict[str, Any]) -> str:
    """``train.lr=0.002 model.preset=tiny``: how consoles and run names show a point."""
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in point.items())
