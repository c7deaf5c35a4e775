"""The servable generator: an ``mlflow.pyfunc`` model around a training checkpoint (EMA weights
and the config it was trained with), logged as *model from code* - MLflow stores this file with
the model and the ``diffusion`` package as its code path, so nothing is unpickled at load.

``predict`` takes a DataFrame, one row per group of images, and sampling settings as MLflow
``params`` (defaults in brackets):

===================  ======  ==========================================================
input column         type
===================  ======  ==========================================================
num_images           long    images in this row's group (required, 1 .. 1024 in all)
class_label          long    class of every image in the group; -1 cycles through the
                             classes (required: a column some rows leave out turns to
                             floats, which MLflow's schema check rejects)
===================  ======  ==========================================================

===================  ======  ==========================================================
param                type
===================  ======  ==========================================================
steps                long    sampling steps (50)
sampler              string  ``ddim`` or ``ddpm`` (``ddim``)
seed                 long    image j of the request uses seed + j: same request, same
                             images (0)
guidance_scale       double  classifier-free guidance; 1 = plain conditional (1.0)
eta                  double  DDIM stochasticity, 0 = deterministic (0.0)
===================  ======  ==========================================================

It returns uint8 images ``(N, H, W, C)``, the rows' groups in order. Over HTTP (``mlflow models
serve``): ``{"dataframe_records": [{"num_images": 4, "class_label": 3}], "params": {"seed": 1}}``.
"""

from __future__ import annotations

import math

import mlflow
import numpy as np
import pandas as pd
import torch

# optional integer columns are declared double: rows that leave a column out make it NaN for the
# whole batch, which a long column rejects; predict checks that they hold whole numbers
INPUTS = {"num_images": ("long", True), "class_label": ("long", True)}
PARAMS = {"steps": ("long", 8), "sampler": ("string", "unipc"), "seed": ("long", 0),   # bench/RESULTS.md
          "guidance_scale": ("double", 1.0), "eta": ("double", 0.0), "spacing": ("string", "linspace")}
MAX_IMAGES = 1024


class DiffusionGenerator(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from diffusion.sampling import load_generator
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model, self.schedule, self.cfg, _ = load_generator(
            context.artifacts["checkpoint"], device)
        self.device = device

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> np.ndarray:
        from diffusion.data import to_uint8
        from diffusion.sampling import SAMPLERS, sample
        from diffusion.solvers import SPACINGS
        cfg = self.cfg
        p = {k: default for k, (_, default) in PARAMS.items()} | dict(params or {})
        if not isinstance(model_input, pd.DataFrame):
            model_input = pd.DataFrame(model_input)
        if "num_images" not in model_input.columns:
            raise ValueError("input: column 'num_images' is required (one row per group of images)")
        steps, sampler = int(p["steps"]), str(p["sampler"])
        if not 1 <= steps <= cfg.diffusion.timesteps:
            raise ValueError(f"params: steps = {steps}: expected 1 .. {cfg.diffusion.timesteps}")
        if sampler not in SAMPLERS:
            raise ValueError(f"params: sampler = {sampler!r}: expected one of {', '.join(SAMPLERS)}")
        if p["spacing"] not in SPACINGS:
            raise ValueError(f"params: spacing = {p['spacing']!r}: expected one of {', '.join(SPACINGS)}")
        classes = cfg.model.num_classes
        counts, labels = [], []
        for r, row in enumerate(model_input.to_dict("records")):
            n = int(row["num_images"])
            label = row.get("class_label", -1)
            label = -1 if label is None or (isinstance(label, float) and math.isnan(label)) else int(label)
            if n < 1:
                raise ValueError(f"input row {r}: num_images = {n}: expected at least 1")
            if label != -1 and not (classes and 0 <= label < classes):
                raise ValueError(f"input row {r}: class_label = {label}: expected -1"
                                 + (f" or 0 .. {classes - 1}" if classes else " (unconditional model)"))
            counts.append(n)
            if classes:
                labels.append(torch.full((n,), label) if label >= 0 else torch.arange(n) % classes)
        total = sum(counts)
        if total > MAX_IMAGES:
            raise ValueError(f"input: {total} images requested; at most {MAX_IMAGES} per request")
        images = sample(self.model, self.schedule, total, channels=cfg.data.channels,
                        resolution=cfg.data.resolution, sampler=sampler, steps=steps,
                        eta=float(p["eta"]), target=cfg.diffusion.target, seed=int(p["seed"]),
                        labels=torch.cat(labels) if labels else None,
                        guidance_scale=float(p["guidance_scale"]), device=self.device,
                        progress=False, spacing=str(p["spacing"]))
        return to_uint8(images).permute(0, 2, 3, 1).numpy()


mlflow.models.set_model(DiffusionGenerator())
