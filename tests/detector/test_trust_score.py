"""The trust score (Jiang et al. 2018): a closed form on hand-made features, and the digits CNN's own errors."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from detector import Capture, InvalidInput, OnnxClassifier
from detector.scorers import TrustScoreScorer


def _capture(features: np.ndarray, predicted: np.ndarray, n_classes: int = 3) -> Capture:
    logits = np.zeros((len(features), n_classes), np.float32)
    logits[np.arange(len(features)), predicted] = 5.0
    return Capture(np.zeros((len(features), 1), np.float32), logits, {"h": features.astype(np.float32)})


def test_closed_form_on_unit_vectors():
    angles = np.array([0.0, 0.1, 2.0, 2.2, 4.0])  # references on the unit circle: classes 0, 0, 1, 1, 2
    refs = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    labels = np.array([0, 0, 1, 1, 2])
    scorer = TrustScoreScorer(layer="h").fit(_capture(refs, labels), labels)
    query = np.array([[np.cos(0.5), np.sin(0.5)], [3.0 * np.cos(1.9), 3.0 * np.sin(1.9)]])  # norms do not matter
    sq = lambda a, b: 2.0 - 2.0 * np.cos(a - b)  # squared chord between unit vectors at angles a and b
    # first query predicted 0: nearest own 0.1 (0.4 away), nearest other 2.0 (1.5 away)
    # second predicted 0 too: own 0.1 (1.8 away), other class 1 at 2.0 (0.1 away): another class is nearer
    expected = [0.5 * np.log(sq(0.5, 0.1) / sq(0.5, 2.0)), 0.5 * np.log(sq(1.9, 0.1) / sq(1.9, 2.0))]
    got = scorer.score(_capture(query, np.array([0, 0])))
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert got[0] < 0 < got[1]
    k2 = TrustScoreScorer(k=2, layer="h").fit(_capture(refs, labels), labels)  # class 2 has one: its farthest
    assert k2.class_sq_distances(_capture(query[:1], np.array([0])))[0, 2] == pytest.approx(sq(0.5, 4.0), rel=1e-6)
    with pytest.raises(InvalidInput, match="at least two classes"):
        TrustScoreScorer(layer="h").fit(_capture(refs[:2], labels[:2]), labels[:2])
    with pytest.raises(InvalidInput, match="k must be a positive integer"):
        TrustScoreScorer(k=0, layer="h").fit(_capture(refs, labels), labels)


def test_ranks_the_digits_cnn_errors_on_noisy_digits_and_round_trips(demo_models, digits_split_arrays):
    """Fitted on the training digits; the test digits with Gaussian noise (sigma 0.3, seed 0) give real errors."""
    d = digits_split_arrays
    clf = OnnxClassifier(demo_models / "digits_cnn.onnx")
    noisy = np.clip(d["x_test"] + np.random.default_rng(0).normal(0, 0.3, d["x_test"].shape), 0, 1).astype(np.float32)
    train, test = clf.run_batches(d["x_train"]), clf.run_batches(noisy)
    scorer = TrustScoreScorer().fit(train, d["y_train"])
    assert scorer.layer_ == list(train.activations)[-1]
    wrong = test.predicted != d["y_test"]
    assert 20 <= wrong.sum() <= len(wrong) - 20
    s = scorer.score(test)
    assert roc_auc_score(wrong, s) > 0.75  # measured 0.83 (max-softmax 0.82)
    params, arrays = scorer.get_state()
    assert all(a.dtype != object for a in arrays.values())
    np.testing.assert_array_equal(TrustScoreScorer.from_state(params, arrays).score(test), s)
