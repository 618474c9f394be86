"""The patch PCA peer (Hendrycks & Gimpel 2017, on patches): closed form, streaming and state on real digits,
and a seeded AUROC floor on MNIST with Gaussian noise."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from detector import Capture, InvalidInput, load_dataset
from detector.scorers import PatchPCAScorer


def _capture(x: np.ndarray) -> Capture:
    return Capture(inputs=x, logits=np.zeros((len(x), 10), np.float32))


@pytest.fixture(scope="module")
def digits(digits_split_arrays):
    d = digits_split_arrays
    scorer = PatchPCAScorer().fit(_capture(d["x_train"]), d["y_train"])
    return scorer, d


def test_scores_are_the_tail_energy_of_every_patch(digits):
    scorer, d = digits
    x = d["x_test"][:50].astype(np.float64)  # 8x8 digits: four 4x4 patches each
    patches = x.reshape(50, 1, 2, 4, 2, 4).transpose(0, 2, 4, 1, 3, 5).reshape(50, 4, 16) - scorer.mean_
    values, vectors = np.linalg.eigh(np.cov(d["x_train"].reshape(-1, 2, 4, 2, 4).transpose(0, 1, 3, 2, 4)
                                            .reshape(-1, 16).T, bias=True))
    k = int(np.searchsorted(np.cumsum(values[::-1]) / values.sum(), 0.99)) + 1
    tail = vectors[:, ::-1][:, k:]  # the axes beyond the first k, as the scorer's projector
    np.testing.assert_allclose(scorer.projector_, tail @ tail.T, atol=1e-9)
    brute = ((patches @ tail) ** 2).sum(axis=(1, 2))
    np.testing.assert_allclose(scorer.score(_capture(d["x_test"][:50])), brute, rtol=1e-9, atol=1e-12)


def test_reduced_captures_and_the_saved_state_give_the_same_scores(digits):
    scorer, d = digits
    full = _capture(d["x_test"])
    reduced = full.reduced([], scorer.reduce(full))
    assert reduced.inputs is None and reduced.features["patch_pca"].shape == (len(d["x_test"]), 16 * 16 + 16 + 1)
    direct = scorer.score(full)
    np.testing.assert_array_equal(scorer.score(reduced), direct)
    params, arrays = scorer.get_state()
    assert params == {"patch_size": 4, "variance": 0.99}
    np.testing.assert_array_equal(PatchPCAScorer.from_state(params, arrays).score(full), direct)
    # fitting on the reduced capture learns the same axes
    again = PatchPCAScorer().fit(_capture(d["x_train"]).reduced([], scorer.reduce(_capture(d["x_train"]))), d["y_train"])
    np.testing.assert_allclose(again.projector_, scorer.projector_, atol=1e-12)


def test_gaussian_noise_on_mnist_is_far_outside_the_clean_patches():
    mnist = load_dataset("mnist")
    clean, test = mnist.x[:2000], mnist.x[8000:9000]
    scorer = PatchPCAScorer().fit(_capture(clean), mnist.y[:2000])
    noisy = np.clip(test + np.random.default_rng(0).normal(0, 0.1, test.shape), 0, 1).astype(np.float32)
    s0, s1 = scorer.score(_capture(test)), scorer.score(_capture(noisy))
    auroc = roc_auc_score(np.r_[np.zeros(len(s0)), np.ones(len(s1))], np.r_[s0, s1])
    assert auroc > 0.95, auroc  # measured 0.979 (sigma 0.1); the 8-bit CW kappa=10 rows are in bench/quality.py


def test_non_images_and_bad_settings_are_refused(digits):
    scorer, d = digits
    with pytest.raises(InvalidInput, match="reads images"):
        scorer.score(_capture(d["x_test"].reshape(len(d["x_test"]), -1)))
    with pytest.raises(InvalidInput, match="variance must lie in"):
        PatchPCAScorer(variance=1.0).fit(_capture(d["x_train"]), d["y_train"])
