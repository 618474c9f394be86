"""Energy, feature squeezing and the layer-wise (JTLA-style) peers on the digits CNN.

Closed forms where there are some (energy, the squeezers, squeezing in one ONNX Runtime run), seeded AUROC
floors on real data otherwise: the scorers are fitted on the training digits and scored on the test digits
and on the same digits with Gaussian noise (sigma 0.3, seed 0), which the classifier never saw.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import logsumexp
from sklearn.metrics import roc_auc_score

from detector import Capture, InvalidInput, OnnxClassifier
from detector.capture import softmax
from detector.scorers import EnergyScorer, FeatureSqueezingScorer, LayerwiseKNNScorer, LayerwiseMahalanobisScorer
from detector.scorers.peers import layer_features
from detector.squeeze import bit_depth, default_squeezers, median_2x2, run_batches_with_squeezers, run_with_squeezers

SQUEEZERS = ["bit_depth_2", "median_2x2"]


def _auroc(clean: np.ndarray, suspicious: np.ndarray) -> float:
    return roc_auc_score(np.r_[np.zeros(len(clean)), np.ones(len(suspicious))], np.r_[clean, suspicious])


@pytest.fixture(scope="module")
def cnn(demo_models, digits_split_arrays):
    d = digits_split_arrays
    clf = OnnxClassifier(demo_models / "digits_cnn.onnx")
    noisy = np.clip(d["x_test"] + np.random.default_rng(0).normal(0, 0.3, d["x_test"].shape), 0, 1).astype(np.float32)
    run = {k: run_batches_with_squeezers(clf, x, SQUEEZERS) for k, x in
           (("train", d["x_train"]), ("test", d["x_test"]), ("noisy", noisy))}
    return {"clf": clf, **run, "y_train": d["y_train"], "x_train": d["x_train"], "x_test": d["x_test"]}


def test_squeezers_closed_form():
    x = np.array([[[[0.0, 0.2], [0.4, 0.9]]]], dtype=np.float32)
    np.testing.assert_allclose(bit_depth(x, 1), [[[[0, 0], [0, 1]]]])
    np.testing.assert_allclose(bit_depth(x, 2), [[[[0, 1 / 3], [1 / 3, 1]]]], atol=1e-6)
    # 2x2 window over the pixel and its upper/left neighbours (edges reflected); of (0, .2, .4, .9) the upper middle
    assert median_2x2(x)[0, 0, 1, 1] == pytest.approx(0.4)
    with pytest.raises(InvalidInput, match="median_2x2 needs images"):
        median_2x2(np.zeros((2, 64), np.float32))


def test_squeezed_copies_run_in_the_same_pass_and_match_separate_runs(cnn):
    clf, x = cnn["clf"], cnn["x_test"][:20]
    capture = run_with_squeezers(clf, x, SQUEEZERS)
    np.testing.assert_allclose(capture.logits, clf.run(x).logits, atol=1e-5)
    np.testing.assert_allclose(capture.squeezed_logits["median_2x2"], clf.run(median_2x2(x)).logits, atol=1e-5)
    assert capture.subset(slice(0, 5)).squeezed_logits["bit_depth_2"].shape == (5, 10)


def test_default_squeezers_keep_accuracy(cnn):
    chosen = default_squeezers(cnn["clf"], cnn["x_train"], cnn["y_train"])
    assert chosen[-1] == "median_2x2" and chosen[0].startswith("bit_depth_")
    bits = int(chosen[0].rsplit("_", 1)[1])
    accuracy = np.mean(cnn["clf"].run(bit_depth(cnn["x_train"], bits)).predicted == cnn["y_train"])
    assert accuracy >= np.mean(cnn["train"].predicted == cnn["y_train"]) - 0.01


def test_energy_is_minus_logsumexp(cnn):
    scorer = EnergyScorer().fit(cnn["train"], cnn["y_train"])
    np.testing.assert_allclose(scorer.score(cnn["test"]), -logsumexp(cnn["test"].logits.astype(np.float64), axis=1))
    params, arrays = scorer.get_state()
    np.testing.assert_array_equal(EnergyScorer.from_state(params, arrays).score(cnn["test"]), scorer.score(cnn["test"]))


def test_feature_squeezing_is_the_largest_l1_distance(cnn):
    scorer = FeatureSqueezingScorer(SQUEEZERS).fit(cnn["train"], cnn["y_train"])
    test = cnn["test"]
    expected = np.max([np.abs(test.probabilities - softmax(test.squeezed_logits[s])).sum(axis=1) for s in SQUEEZERS], axis=0)
    np.testing.assert_allclose(scorer.score(test), expected)
    assert 0 <= scorer.score(test).min() and scorer.score(test).max() <= 2
    with pytest.raises(InvalidInput, match="no logits of the squeezed copies"):
        scorer.score(Capture(test.inputs, test.logits))
    with pytest.raises(InvalidInput, match="squeezers must be"):
        FeatureSqueezingScorer(["blur"]).fit(cnn["train"], cnn["y_train"])


def test_layerwise_knn_statistic_is_the_kth_distance_within_the_predicted_class(cnn):
    """Per-class, chunked computation against a brute-force k-th nearest distance over the whole reference set."""
    scorer = LayerwiseKNNScorer(chunk_size=7).fit(cnn["train"], cnn["y_train"])
    model, layer = scorer.models_[-1], scorer.layers_[-1]
    features = layer_features(cnn["test"], layer)
    classes = cnn["test"].predicted
    classes = np.where(np.arange(len(classes)) % 10 == 0, 99, classes)  # a class without references
    u = features / np.linalg.norm(features, axis=1, keepdims=True)
    r = model.reference.astype(np.float64)
    d = np.sqrt(np.maximum(((u[:, None, :] - r[None]) ** 2).sum(axis=2), 0))
    want = np.array([np.sort(row[model.labels == c])[min(5, (model.labels == c).sum()) - 1]
                     if (model.labels == c).any() else 2.0 for row, c in zip(d, classes)])
    np.testing.assert_allclose(scorer._statistic(model, features, classes), want, atol=1e-9)
    assert (want[classes == 99] == 2.0).all() and (want[classes != 99] < 2.0).all()


# measured: k-NN 0.857, Mahalanobis above 0.9
@pytest.mark.parametrize("cls, floor", [(LayerwiseKNNScorer, 0.8), (LayerwiseMahalanobisScorer, 0.9)])
def test_layerwise_scorers_see_noise_and_round_trip(cnn, cls, floor):
    scorer = cls().fit(cnn["train"], cnn["y_train"])
    assert scorer.layers_ == list(cnn["train"].activations)
    p = scorer.layer_p_values(cnn["test"])
    assert p.shape == (len(cnn["test"]), len(scorer.layers_)) and (p > 0).all() and (p <= 1).all()
    np.testing.assert_allclose(scorer.score(cnn["test"]), -2 * np.log(p).sum(axis=1))
    assert _auroc(scorer.score(cnn["test"]), scorer.score(cnn["noisy"])) > floor
    params, arrays = scorer.get_state()
    assert all(a.dtype != object for a in arrays.values())
    again = cls.from_state(params, arrays)
    np.testing.assert_allclose(again.score(cnn["test"]), scorer.score(cnn["test"]))
