"""Topological scorers on the digits CNN: real separation of noise, state round trip, fit/score contract."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from detector import NotReady, OnnxClassifier
from detector.topology.graph_features import InducedGraphFeatures
from detector.topology.induced_graph import InducedGraph
from detector.scorers import ScorerContext
from detector.scorers.topology import BettiDensityScorer, InducedPersistenceScorer


@pytest.fixture(scope="module")
def cnn_captures(demo_models, digits_split_arrays):
    clf = OnnxClassifier(demo_models / "digits_cnn.onnx")
    graph = InducedGraph.from_classifier(clf)
    clf.set_capture(clf.default_capture() + graph.required_tensors)
    x_test = digits_split_arrays["x_test"]
    noisy = np.clip(x_test + np.random.default_rng(0).normal(0, 0.3, x_test.shape), 0, 1).astype(np.float32)
    return clf, graph, clf.run(digits_split_arrays["x_calib"]), clf.run(x_test), clf.run(noisy)


@pytest.fixture(scope="module")
def fitted(cnn_captures, digits_split_arrays):
    clf, graph, calib, _, _ = cnn_captures
    features = InducedGraphFeatures(graph)
    y = digits_split_arrays["y_calib"]
    return features, InducedPersistenceScorer(features).fit(calib, y), BettiDensityScorer(features).fit(calib, y)


def _auroc(clean: np.ndarray, suspicious: np.ndarray) -> float:
    return roc_auc_score(np.r_[np.zeros(len(clean)), np.ones(len(suspicious))], np.r_[clean, suspicious])


def test_gaussian_noise_ranks_above_clean_inputs(cnn_captures, fitted):
    _, _, _, test, noisy = cnn_captures
    _, persistence, betti = fitted
    auroc = {s.kind: _auroc(s.score(test), s.score(noisy)) for s in (persistence, betti)}
    assert auroc["induced_persistence"] > 0.9, auroc
    assert auroc["betti_density"] > 0.9, auroc


def test_scores_are_finite_and_one_per_input(cnn_captures, fitted):
    _, _, _, test, _ = cnn_captures
    for scorer in fitted[1:]:
        s = scorer.scores(test)
        assert list(s) == list(scorer.score_names)
        assert s[scorer.score_names[0]].shape == (len(test),) and np.isfinite(s[scorer.score_names[0]]).all()


def test_state_round_trip_without_pickle(cnn_captures, fitted):
    clf, _, _, test, _ = cnn_captures
    context = ScorerContext(clf)
    for scorer in fitted[1:]:
        params, arrays = scorer.get_state()
        json.dumps(params)  # JSON-able parameters
        assert all(a.dtype != object for a in arrays.values())
        restored = type(scorer).from_state(json.loads(json.dumps(params)), dict(arrays), context)
        np.testing.assert_allclose(restored.score(test), scorer.score(test), rtol=1e-10)
    # both scorers loaded from one context share one feature extractor
    a = InducedPersistenceScorer.from_state(*fitted[1].get_state(), context)
    b = BettiDensityScorer.from_state(*fitted[2].get_state(), context)
    assert a.features is b.features


def test_scoring_before_fit_is_refused(cnn_captures):
    clf, graph, _, test, _ = cnn_captures
    with pytest.raises(NotReady, match="not fitted"):
        InducedPersistenceScorer(InducedGraphFeatures(graph)).score(test)


def test_required_tensors_are_the_sources_of_every_layer_pair(cnn_captures):
    clf, graph, *_ = cnn_captures
    scorer = InducedPersistenceScorer(InducedGraphFeatures(graph))
    # conv1 reads the input; pool1, conv2, pool2, dense1 (after flatten), dense2 read captured tensors
    assert scorer.required_tensors() == graph.required_tensors and len(graph.required_tensors) == 5


def test_top_q_sparsification_keeps_detection(cnn_captures, digits_split_arrays):
    _, graph, calib, test, noisy = cnn_captures
    y = digits_split_arrays["y_calib"]
    exact = InducedPersistenceScorer(InducedGraphFeatures(graph, top_q=1.0)).fit(calib, y)
    sparse = InducedPersistenceScorer(InducedGraphFeatures(graph, top_q=0.5)).fit(calib, y)
    assert abs(_auroc(exact.score(test), exact.score(noisy)) - _auroc(sparse.score(test), sparse.score(noisy))) <= 0.05
