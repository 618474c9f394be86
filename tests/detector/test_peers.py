"""Peer scorers on the digits CNN: closed-form values, real separation of noise and errors, state round trips.

The scorers are fitted on the training digits and evaluated on held-out digits (calib + test), which the
classifier never saw. Gaussian noise: sigma = 0.3, clipped to [0, 1], seed 0.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from sklearn.neighbors import NearestNeighbors

from detector import Capture, InvalidInput, NotReady, OnnxClassifier
from detector.capture import softmax
from detector.scorers import ScorerContext
from detector.scorers.peers import (KNNScorer, MahalanobisScorer, MaxSoftmaxScorer, NonzeroPixelsScorer,
                                    layer_features)

FIRST_RELU = "/1/Relu_output_0"  # digits CNN: conv1 -> relu, (16, 8, 8)


def _auroc(clean: np.ndarray, suspicious: np.ndarray) -> float:
    return roc_auc_score(np.r_[np.zeros(len(clean)), np.ones(len(suspicious))], np.r_[clean, suspicious])


@pytest.fixture(scope="module")
def cnn(demo_models, digits_split_arrays):
    d = digits_split_arrays
    clf = OnnxClassifier(demo_models / "digits_cnn.onnx")
    noisy = np.clip(d["x_test"] + np.random.default_rng(0).normal(0, 0.3, d["x_test"].shape), 0, 1).astype(np.float32)
    train, calib, test = (clf.run(d[f"x_{k}"]) for k in ("train", "calib", "test"))
    held = Capture.concatenate([calib, test])
    return {"clf": clf, "train": train, "test": test, "noisy": clf.run(noisy), "held": held,
            "y_train": d["y_train"], "y_held": np.r_[d["y_calib"], d["y_test"]]}


@pytest.fixture(scope="module")
def fitted(cnn):
    scorers = [MaxSoftmaxScorer(), MahalanobisScorer(), MahalanobisScorer(distance="min"),
               MahalanobisScorer(layer=FIRST_RELU), KNNScorer(), NonzeroPixelsScorer()]
    return [s.fit(cnn["train"], cnn["y_train"]) for s in scorers]


# -- closed-form values -------------------------------------------------------------------------------

def test_max_softmax_is_one_minus_the_top_probability(cnn):
    scorer = MaxSoftmaxScorer().fit(cnn["train"], cnn["y_train"])
    test = cnn["test"]
    np.testing.assert_allclose(scorer.score(test), 1.0 - test.probabilities.max(axis=1), atol=1e-12)
    # uniform logits: 1 - 1/K; one dominant logit margin m over 9 equal ones: 9 e^-m / (1 + 9 e^-m), not 0
    logits = np.zeros((2, 10), np.float32)
    logits[1, 3] = 60.0
    s = scorer.score(Capture(np.zeros((2, 1, 8, 8), np.float32), logits))
    np.testing.assert_allclose(s, [0.9, 9 * np.exp(-60.0) / (1 + 9 * np.exp(-60.0))], rtol=1e-12)
    assert 1.0 - softmax(logits)[1].max() == 0.0 < s[1]  # the naive form would tie it with certainty


def test_layer_features_reduce_conv_tensors_to_channel_means(cnn):
    act = cnn["test"].activations[FIRST_RELU]
    f = layer_features(cnn["test"], FIRST_RELU)
    assert act.ndim == 4 and f.shape == (len(act), act.shape[1])
    np.testing.assert_allclose(f, act.astype(np.float64).mean(axis=(2, 3)), rtol=1e-12)
    with pytest.raises(InvalidInput, match="not captured"):
        layer_features(cnn["test"], "no_such_tensor")


def test_default_layer_is_the_last_captured_and_is_required(cnn, fitted):
    last = list(cnn["train"].activations)[-1]
    maha, knn = fitted[1], fitted[4]
    assert last == cnn["clf"].default_capture()[-1]
    assert maha.layer is None and maha.layer_ == last and maha.required_tensors() == [last]
    assert knn.layer_ == last and knn.required_tensors() == [last]
    assert MahalanobisScorer(layer=FIRST_RELU).required_tensors() == [FIRST_RELU]


def test_mahalanobis_predicted_distance_bounds_the_minimum(cnn, fitted):
    """d(predicted class) >= min_c d(c), equal wherever the nearest class mean is the predicted class."""
    held = cnn["held"]
    pred, low = fitted[1].score(held), fitted[2].score(held)
    g = fitted[1].gaussian_
    f = layer_features(held, fitted[1].layer_)
    every = np.stack([g.score(f, np.full(len(f), c)) for c in range(10)], axis=1)
    np.testing.assert_allclose(low, every.min(axis=1), rtol=1e-12)
    np.testing.assert_allclose(pred, every[np.arange(len(f)), held.predicted], rtol=1e-12)
    assert (pred >= low - 1e-9).all()
    nearest = every.argmin(axis=1) == held.predicted
    assert nearest.mean() > 0.9
    np.testing.assert_allclose(pred[nearest], low[nearest], rtol=1e-12)


def test_knn_matches_brute_force_neighbours(cnn, fitted):
    knn = fitted[4]
    ref = layer_features(cnn["train"], knn.layer_)
    ref = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    q = layer_features(cnn["held"], knn.layer_)
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    dist, _ = NearestNeighbors(n_neighbors=10).fit(ref.astype(np.float32).astype(np.float64)).kneighbors(q)
    np.testing.assert_allclose(knn.score(cnn["held"]), dist[:, 9], atol=1e-6)
    small_chunks = KNNScorer(chunk_size=37).fit(cnn["train"], cnn["y_train"])
    np.testing.assert_allclose(small_chunks.score(cnn["held"]), knn.score(cnn["held"]), atol=1e-12)
    # every reference is its own nearest neighbour
    nearest = KNNScorer(k=1).fit(cnn["train"], cnn["y_train"]).score(cnn["train"])
    assert np.abs(nearest).max() < 1e-3


def test_nonzero_pixels_is_the_distance_to_the_median_count():
    x = np.zeros((5, 1, 8, 8), np.float32)
    for i, n in enumerate([10, 20, 30, 40, 50]):
        x[i].flat[:n] = 0.5
    x[0].flat[60] = 1e-4  # below the 1e-3 threshold: not lit
    cap = Capture(x, np.zeros((5, 10), np.float32))
    scorer = NonzeroPixelsScorer().fit(cap, np.zeros(5, np.int64))
    assert scorer.median_ == 30.0
    np.testing.assert_array_equal(scorer.score(cap), [20, 10, 0, 10, 20])


# -- real separation ----------------------------------------------------------------------------------

def test_gaussian_noise_ranks_above_clean_test_inputs(cnn, fitted):
    names = ["max_softmax", "mahalanobis", "mahalanobis_min", "mahalanobis_first_relu", "knn", "nonzero_pixels"]
    auroc = {n: _auroc(s.score(cnn["test"]), s.score(cnn["noisy"])) for n, s in zip(names, fitted)}
    print("noise AUROC", {n: round(a, 3) for n, a in auroc.items()})
    softmax_auroc, maha, maha_min, maha_first, knn, pixels = auroc.values()
    assert softmax_auroc > 0.70, auroc  # measured 0.754
    assert maha > 0.62 and maha_min > 0.62, auroc  # measured 0.689 / 0.683 on the last hidden layer
    assert maha_first > 0.95, auroc  # measured 0.989: the first ReLU sees the noise directly
    assert knn > 0.65, auroc  # measured 0.738
    assert pixels > 0.95, auroc  # measured 0.991: the trivial row catches noise, which is its point


def test_max_softmax_ranks_misclassified_held_out_inputs_above_correct_ones(cnn, fitted):
    held = cnn["held"]
    wrong = held.predicted != cnn["y_held"]
    s = fitted[0].score(held)
    auroc = _auroc(s[~wrong], s[wrong])
    print(f"misclassified AUROC {auroc:.3f} with {wrong.sum()} misclassified of {len(held)}")
    assert wrong.sum() >= 5  # measured 17 (CNN test accuracy ~98 %)
    assert auroc > 0.85, auroc  # measured 0.936
    maha = fitted[1].score(held)
    assert _auroc(maha[~wrong], maha[wrong]) > 0.7  # measured 0.837


# -- contract ------------------------------------------------------------------------------------------

def test_scores_are_finite_float64_one_per_input(cnn, fitted):
    for scorer in fitted:
        s = scorer.scores(cnn["test"])
        assert list(s) == list(scorer.score_names) == [scorer.kind]
        v = s[scorer.kind]
        assert v.shape == (len(cnn["test"]),) and v.dtype == np.float64 and np.isfinite(v).all() and (v >= 0).all()


def test_state_round_trip_without_pickle(cnn, fitted, tmp_path):
    context = ScorerContext(cnn["clf"])
    for i, scorer in enumerate(fitted):
        params, arrays = scorer.get_state()
        params = json.loads(json.dumps(params))
        np.savez(tmp_path / f"{i}.npz", **arrays)
        with np.load(tmp_path / f"{i}.npz", allow_pickle=False) as npz:
            loaded = {k: npz[k] for k in npz.files}
        restored = type(scorer).from_state(params, loaded, context)
        np.testing.assert_array_equal(restored.score(cnn["noisy"]), scorer.score(cnn["noisy"]))
        assert restored.required_tensors() == scorer.required_tensors()


def test_scoring_before_fit_is_refused(cnn):
    for scorer in (MaxSoftmaxScorer(), MahalanobisScorer(), KNNScorer(), NonzeroPixelsScorer()):
        with pytest.raises(NotReady, match="not fitted"):
            scorer.score(cnn["test"])


def test_bad_fit_arguments_are_refused(cnn):
    train, y = cnn["train"], cnn["y_train"]
    with pytest.raises(InvalidInput, match="labels of shape"):
        MaxSoftmaxScorer().fit(train, y[:-1])
    with pytest.raises(InvalidInput, match=r"labels must lie in \[0, 9\]"):
        KNNScorer().fit(train, y + 1)
    with pytest.raises(InvalidInput, match="distance must be"):
        MahalanobisScorer(distance="max").fit(train, y)
    with pytest.raises(InvalidInput, match="k must be a positive integer"):
        KNNScorer(k=0).fit(train, y)
    with pytest.raises(InvalidInput, match="is not captured"):
        MahalanobisScorer(layer="nope").fit(train, y)
    bare = Capture(train.inputs, train.logits, {})
    with pytest.raises(InvalidInput, match="no hidden layer is captured"):
        KNNScorer().fit(bare, y)
    fitted = KNNScorer().fit(train, y)
    with pytest.raises(InvalidInput, match="is not captured"):
        fitted.score(bare)
    with pytest.raises(InvalidInput, match="logits of shape"):
        MaxSoftmaxScorer().fit(train, y).score(Capture(train.inputs, train.logits[:, :5]))
