"""Sample quality seen by the domain classifier: how many generated images it recognises with
confidence, how evenly they spread over the classes, and (for a conditional model) how often the
class asked for is the class seen.

These complement FID: FID on a small feature extractor mixes fidelity and diversity into one
number whose scale depends on the extractor; "share recognised with confidence >= 0.9" and
"class-histogram entropy / log(classes)" read directly.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def class_entropy_ratio(predicted: np.ndarray, num_classes: int) -> float:
    """Entropy of the predicted-class histogram over its maximum log(num_classes): 1 = every class
    equally often, 0 = all one class. 0 log 0 = 0."""
    if num_classes < 2:
        raise ValueError(f"num_classes = {num_classes}: entropy needs at least 2 classes")
    counts = np.bincount(np.asarray(predicted, dtype=np.int64), minlength=num_classes)
    if counts.size > num_classes:
        raise ValueError(f"predicted classes reach {counts.size - 1}, beyond num_classes = {num_classes}")
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum() / math.log(num_classes)) + 0.0     # no -0.0


def classifier_quality(probabilities: np.ndarray | torch.Tensor, requested: np.ndarray | None = None,
                       threshold: float = 0.9) -> dict[str, float]:
    """``probabilities`` (N, K) rows summing to 1; ``requested`` (N,) the class each image was
    generated for (-1 or None = unconditional). Returns the share with max probability >=
    ``threshold``, the class-histogram entropy ratio of the argmax classes, and, when classes
    were requested, the share whose argmax class is the requested one."""
    p = np.asarray(probabilities.detach().cpu() if isinstance(probabilities, torch.Tensor)
                   else probabilities, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] == 0:
        raise ValueError(f"probabilities must be a non-empty (N, classes) array, got shape {p.shape}")
    if not np.allclose(p.sum(1), 1.0, atol=1e-4):
        raise ValueError("probabilities: rows must sum to 1 (pass softmax outputs, not logits)")
    predicted = p.argmax(1)
    out = {"confident_share": float((p.max(1) >= threshold).mean()),
           "class_entropy_ratio": class_entropy_ratio(predicted, p.shape[1]),
           "confidence_threshold": threshold, "quality_samples": int(p.shape[0])}
    if requested is not None:
        requested = np.asarray(requested)
        if requested.shape != predicted.shape:
            raise ValueError(f"requested classes: shape {requested.shape}, expected {predicted.shape}")
        asked = requested >= 0
        if asked.any():
            out["label_agreement"] = float((predicted[asked] == requested[asked]).mean())
    return out
