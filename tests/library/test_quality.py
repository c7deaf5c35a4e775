"""Recognisability metrics: closed forms on hand-made probabilities and bad inputs. (Known data:
real and noise digits through a trained classifier are in test_fid.py.)"""

import math

import numpy as np
import pytest

from diffusion.quality import class_entropy_ratio, classifier_quality


def test_entropy_ratio_closed_forms():
    assert class_entropy_ratio(np.arange(100) % 10, 10) == pytest.approx(1.0)    # uniform
    assert class_entropy_ratio(np.zeros(50, dtype=int), 10) == 0.0              # one class
    assert class_entropy_ratio(np.array([3, 7] * 20), 10) == pytest.approx(math.log(2) / math.log(10))
    # p = (1/2, 1/4, 1/4, 0): H = 1.5 bits of log2(4) = 2 bits
    assert class_entropy_ratio(np.array([0, 0, 1, 2]), 4) == pytest.approx(0.75)


def test_classifier_quality_on_hand_made_probabilities():
    p = np.array([[0.95, 0.05], [0.6, 0.4], [0.1, 0.9], [0.02, 0.98]])
    q = classifier_quality(p, requested=np.array([0, 0, 0, 1]))
    assert q["confident_share"] == 0.75              # 0.95, 0.9 (>= threshold) and 0.98
    assert q["class_entropy_ratio"] == pytest.approx(1.0)   # argmax 0, 0, 1, 1
    assert q["label_agreement"] == 0.75
    assert q["quality_samples"] == 4
    assert classifier_quality(p, threshold=0.97)["confident_share"] == 0.25
    assert "label_agreement" not in classifier_quality(p, requested=np.full(4, -1))   # unconditional


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="rows must sum to 1"):
        classifier_quality(np.array([[2.0, -0.5], [3.0, 1.0]]))                # logits
    with pytest.raises(ValueError, match=r"non-empty \(N, classes\) array, got shape \(3,\)"):
        classifier_quality(np.array([0.2, 0.3, 0.5]))
    with pytest.raises(ValueError, match=r"requested classes: shape \(3,\), expected \(2,\)"):
        classifier_quality(np.array([[0.5, 0.5], [1.0, 0.0]]), requested=np.zeros(3))
    with pytest.raises(ValueError, match="at least 2 classes"):
        class_entropy_ratio(np.zeros(3, dtype=int), 1)
    with pytest.raises(ValueError, match="beyond num_classes = 3"):
        class_entropy_ratio(np.array([0, 5]), 3)
