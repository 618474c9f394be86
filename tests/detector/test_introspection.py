"""Self-introspection scorer (Pardo et al. 2019) on the digits demo CNN: detection, export, state, map.

The scorer is fitted on the demo CNN's captures of the train + calibration splits and evaluated on the
test split. Small networks and few epochs keep the file fast; the paper's 3 x 200 layers are the
default, not what is trained here.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from detector import BaselineError, Capture, InvalidInput, NotReady, OnnxClassifier
from detector.activation_map import plot_activation_map
from detector.introspection import (
    IntrospectionRunner,
    IntrospectionScorer,
    activation_vectors,
    classifier_error,
)

REPO = Path(__file__).resolve().parents[2]

#: Small, fast settings used for the detection tests (the defaults are the paper's 3 x 200).
FAST = dict(hidden=(64, 64), estimator_hidden=(64, 64), learning_rate=3e-3, max_epochs=150, patience=10)
#: Tiny settings for the tests of mechanics (export, determinism), a few epochs only.
TINY = dict(hidden=(16,), estimator_hidden=(16,), max_epochs=4, patience=4)


@pytest.fixture(scope="module")
def captures(demo_models: Path, digits_split_arrays: dict[str, np.ndarray]) -> dict[str, Capture]:
    """Demo-CNN captures: fit (train + calib), test, and test with Gaussian noise sigma = 0.3, clipped to [0, 1]."""
    clf = OnnxClassifier(demo_models / "digits_cnn.onnx", intra_op_threads=1)
    a = digits_split_arrays
    rng = np.random.default_rng(0)
    noisy = np.clip(a["x_test"] + rng.normal(0.0, 0.3, a["x_test"].shape), 0.0, 1.0).astype(np.float32)
    return {
        "fit": clf.run(np.concatenate([a["x_train"], a["x_calib"]])),
        "test": clf.run(a["x_test"]),
        "noise": clf.run(noisy),
    }


@pytest.fixture(scope="module")
def fit_labels(digits_split_arrays: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([digits_split_arrays["y_train"], digits_split_arrays["y_calib"]])


@pytest.fixture(scope="module")
def scorer8(captures, fit_labels) -> IntrospectionScorer:
    return IntrospectionScorer(latent_dim=8, seed=0, **FAST).fit(captures["fit"], fit_labels)


@pytest.fixture(scope="module")
def scorer2(captures, fit_labels) -> IntrospectionScorer:
    return IntrospectionScorer(latent_dim=2, seed=0, **FAST).fit(captures["fit"], fit_labels)


def _noise_auroc(scorer: IntrospectionScorer, captures: dict[str, Capture], name: str) -> float:
    clean, noisy = scorer.scores(captures["test"])[name], scorer.scores(captures["noise"])[name]
    return roc_auc_score(np.r_[np.zeros(len(clean)), np.ones(len(noisy))], np.r_[clean, noisy])


# ---------------------------------------------------------------------------- detection on real data


def test_reconstruction_error_ranks_gaussian_noise_above_clean(scorer8, captures):
    auroc = _noise_auroc(scorer8, captures, "introspection_reconstruction")
    print(f"latent 8: reconstruction AUROC noisy (sigma 0.3) vs clean test = {auroc:.3f}")
    assert auroc > 0.9


def test_estimated_error_ranks_misclassified_above_correct(scorer8, captures, digits_split_arrays):
    test = captures["test"]
    wrong = test.predicted != digits_split_arrays["y_test"]
    assert 3 <= wrong.sum() < len(wrong) // 4, f"the demo CNN should err a little on test, it erred {wrong.sum()} times"
    auroc = roc_auc_score(wrong, scorer8.scores(test)["introspection_error"])
    print(f"latent 8: estimated-error AUROC misclassified ({wrong.sum()}) vs correct ({(~wrong).sum()}) = {auroc:.3f}")
    assert auroc > 0.8


def test_latent_8_beats_latent_2(scorer8, scorer2, captures, digits_split_arrays):
    """Measured: latent 8 reconstructs and estimates better than the 2-D map's latent space."""
    test, y = captures["test"], digits_split_arrays["y_test"]
    true_log10_error = np.log10(np.maximum(classifier_error(test.logits, y), 1e-8))
    wrong = test.predicted != y
    figures = {}
    for k, scorer in (("8", scorer8), ("2", scorer2)):
        estimated = scorer.scores(test)["introspection_error"]
        figures[k] = (
            _noise_auroc(scorer, captures, "introspection_reconstruction"),
            roc_auc_score(wrong, estimated),
            spearmanr(estimated, true_log10_error)[0],
        )
        print(f"latent {k}: noise AUROC {figures[k][0]:.3f}, misclassified AUROC {figures[k][1]:.3f}, "
              f"Spearman(log10 e-hat, log10 e) {figures[k][2]:.3f}")
    assert figures["8"][0] > figures["2"][0]
    assert figures["8"][2] > figures["2"][2] > 0.0  # the 2-D estimator still carries signal


def test_scores_and_codes_have_documented_shapes(scorer2, captures):
    test = captures["test"]
    scores = scorer2.scores(test)
    assert tuple(scores) == IntrospectionScorer.score_names
    for value in scores.values():
        assert value.shape == (len(test),) and value.dtype == np.float64 and np.all(np.isfinite(value))
    assert np.all(scores["introspection_reconstruction"] >= 0)
    np.testing.assert_array_equal(scorer2.score(test), scores["introspection_reconstruction"])
    assert scorer2.transform(test).shape == (len(test), 2)
    # log10 e-hat lies near the range of the targets, [log10(1e-8), 0]
    assert -10 < scores["introspection_error"].min() and scores["introspection_error"].max() < 1
    # the estimator cut out of the graph equals the graph's own output on the same codes
    np.testing.assert_allclose(
        scorer2.estimate_log10_error(scorer2.transform(test)), scores["introspection_error"], rtol=0, atol=1e-5
    )


def test_the_graph_from_activations_agrees_with_the_numpy_feature_map(scorer2, captures, fit_labels):
    """run() standardises inside the ONNX graph (float32); standardise() is the float64 numpy reference."""
    for capture in (captures["test"], captures["noise"].subset(slice(0, 1))):
        reference = scorer2.runner_.run(scorer2.standardise(capture))
        served = scorer2.run(capture)
        for name in IntrospectionRunner.output_names:
            np.testing.assert_allclose(served[name], reference[name], rtol=1e-5, atol=1e-6, err_msg=name)
    flat = IntrospectionScorer(reduction="flatten", **TINY).fit(captures["fit"], fit_labels)
    reference = flat.runner_.run(flat.standardise(captures["test"]))
    np.testing.assert_allclose(flat.run(captures["test"])["reconstruction_error"], reference["reconstruction_error"],
                               rtol=1e-5, atol=1e-6)
    test = captures["test"]
    first, last = scorer2.layers_[0], scorer2.layers_[-1]
    nan = Capture(test.inputs, test.logits, {**test.activations, last: np.where(
        np.arange(len(test))[:, None] == 3, np.nan, test.activations[last])})
    with pytest.raises(InvalidInput, match="NaN or Inf"):
        scorer2.scores(nan)
    narrow = Capture(test.inputs, test.logits, {**test.activations, first: test.activations[first][:, :-1]})
    with pytest.raises(InvalidInput, match="activation sizes .* differ from the fitted"):
        scorer2.scores(narrow)


def test_training_stops_early_on_the_validation_split(scorer2):
    h = scorer2.history_
    assert 0 <= h.vae_best_epoch < len(h.vae_validation) <= FAST["max_epochs"]
    assert h.vae_validation[h.vae_best_epoch] == min(h.vae_validation)
    assert h.vae_validation[h.vae_best_epoch] < h.vae_validation[0]  # it learned something
    assert h.estimator_validation[h.estimator_best_epoch] < h.estimator_validation[0]


# ---------------------------------------------------------------------------- features


def test_activation_vectors_mean_and_flatten(captures):
    acts = captures["test"].activations
    names = list(acts)
    shapes = [acts[n].shape for n in names]
    assert any(len(s) == 4 for s in shapes)  # the CNN has conv maps
    mean = activation_vectors(acts, names, "mean")
    flat = activation_vectors(acts, names, "flatten")
    assert mean.shape[1] == sum(s[1] for s in shapes)
    assert flat.shape[1] == sum(int(np.prod(s[1:])) for s in shapes)
    conv = next(n for n in names if acts[n].ndim == 4)
    np.testing.assert_allclose(activation_vectors(acts, [conv], "mean"), acts[conv].mean(axis=(2, 3)), rtol=1e-6)
    with pytest.raises(InvalidInput, match="reduction"):
        activation_vectors(acts, names, "max")
    with pytest.raises(InvalidInput, match="lacks the activations"):
        activation_vectors(acts, ["nope"], "mean")


def test_standardisation_uses_fit_mean_and_std(scorer2, captures):
    h = scorer2.standardise(captures["fit"])
    np.testing.assert_allclose(h.mean(axis=0), 0.0, atol=1e-4)
    live = scorer2.scale_ > scorer2.std_floor
    np.testing.assert_allclose(h[:, live].std(axis=0), 1.0, rtol=1e-3)


def test_classifier_error_closed_form():
    # softmax([0, 0]) = (1/2, 1/2): e = 1/2 ((1 - 1/2)^2 + (1/2)^2) = 1/4; a confident right answer gives ~0
    logits = np.array([[0.0, 0.0], [50.0, 0.0], [0.0, 50.0]])
    np.testing.assert_allclose(classifier_error(logits, np.array([0, 0, 0])), [0.25, 0.0, 1.0], atol=1e-12)


# ---------------------------------------------------------------------------- export, determinism, state


def test_onnx_runtime_matches_torch(captures, fit_labels):
    import torch

    from detector.offline.introspection_vae import IntrospectionConfig, export_onnx, fit_introspection

    fit = captures["fit"].subset(slice(0, 300))
    names = list(fit.activations)
    raw = activation_vectors(fit.activations, names)
    mean, std = raw.mean(axis=0), np.maximum(raw.std(axis=0), 1e-6)
    h_fit = ((raw - mean) / std).astype(np.float32)
    h = ((activation_vectors(captures["noise"].activations, names) - mean) / std).astype(np.float32)
    target = np.log10(np.maximum(classifier_error(fit.logits, fit_labels[:300]), 1e-8))
    config = IntrospectionConfig(latent_dim=3, hidden=(32, 16), estimator_hidden=(8,), max_epochs=3)
    seen: list[tuple[str, int]] = []
    net, history = fit_introspection(h_fit, target, config, progress=lambda stage, epoch, *_: seen.append((stage, epoch)))
    assert seen == [("vae", e) for e in range(len(history.vae_train))] + [
        ("estimator", e) for e in range(len(history.estimator_train))
    ]
    runner = IntrospectionRunner(export_onnx(net, h.shape[1]))
    ort_out = runner.run(h)
    with torch.no_grad():
        torch_out = [t.numpy() for t in net(torch.from_numpy(h))]
    for name, expected in zip(IntrospectionRunner.output_names, torch_out):
        np.testing.assert_allclose(ort_out[name], expected, rtol=1e-4, atol=1e-4, err_msg=name)
    # and on a batch of one (dynamic batch axis)
    one = runner.run(h[:1])
    np.testing.assert_allclose(one["z"], torch_out[0][:1], rtol=1e-4, atol=1e-4)


def test_same_seed_gives_identical_codes(captures, fit_labels):
    fit, labels = captures["fit"].subset(slice(0, 300)), fit_labels[:300]
    a = IntrospectionScorer(seed=3, **TINY).fit(fit, labels).transform(captures["test"])
    b = IntrospectionScorer(seed=3, **TINY).fit(fit, labels).transform(captures["test"])
    c = IntrospectionScorer(seed=4, **TINY).fit(fit, labels).transform(captures["test"])
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_state_round_trip_through_npz_gives_identical_scores(scorer2, captures, tmp_path):
    params, arrays = scorer2.get_state()
    assert arrays["onnx_model"].dtype == np.uint8 and arrays["onnx_model"].ndim == 1
    assert all(v.dtype != object for v in arrays.values())
    np.savez(tmp_path / "state.npz", **arrays)
    with np.load(tmp_path / "state.npz", allow_pickle=False) as npz:
        loaded = {k: npz[k] for k in npz.files}
    rebuilt = IntrospectionScorer.from_state(params, loaded)
    for name, value in scorer2.scores(captures["noise"]).items():
        np.testing.assert_array_equal(rebuilt.scores(captures["noise"])[name], value)
    np.testing.assert_array_equal(rebuilt.transform(captures["test"]), scorer2.transform(captures["test"]))
    assert rebuilt.get_params() == scorer2.get_params()


def test_import_does_not_load_torch():
    code = "import detector.introspection, detector.activation_map, sys; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


# ---------------------------------------------------------------------------- user errors


def test_user_errors_are_reported(scorer2, captures, fit_labels):
    with pytest.raises(NotReady, match="not fitted"):
        IntrospectionScorer().scores(captures["test"])
    with pytest.raises(InvalidInput, match="labels must be integers of shape"):
        IntrospectionScorer(**TINY).fit(captures["fit"], fit_labels[:-1])
    with pytest.raises(InvalidInput, match=r"labels must lie in \[0, 10\)"):
        IntrospectionScorer(**TINY).fit(captures["fit"], fit_labels + 5)
    with pytest.raises(InvalidInput, match="reduction"):
        IntrospectionScorer(reduction="median", **TINY).fit(captures["fit"], fit_labels)
    with pytest.raises(InvalidInput, match="latent_dim"):
        IntrospectionScorer(latent_dim=0).fit(captures["fit"], fit_labels)
    test = captures["test"]
    first = next(iter(test.activations))
    missing = Capture(test.inputs, test.logits, {k: v for k, v in test.activations.items() if k != first})
    with pytest.raises(InvalidInput, match="lacks the activations"):
        scorer2.scores(missing)
    params, arrays = scorer2.get_state()
    with pytest.raises(BaselineError, match="lacks the arrays"):
        IntrospectionScorer.from_state(params, {k: v for k, v in arrays.items() if k != "onnx_model"})
    with pytest.raises(BaselineError, match="cannot be loaded"):
        IntrospectionScorer.from_state(params, dict(arrays, onnx_model=np.frombuffer(b"not onnx", np.uint8)))
    with pytest.raises(BaselineError, match="disagree"):
        IntrospectionScorer.from_state(params, dict(arrays, mean=arrays["mean"][:-1]))


# ---------------------------------------------------------------------------- activation map


def test_activation_map_writes_a_png(scorer2, captures, digits_split_arrays, tmp_path):
    from matplotlib.image import imread

    test = captures["test"]
    out = plot_activation_map(
        scorer2.transform(test),
        digits_split_arrays["y_test"],
        test.predicted,
        scorer2,
        tmp_path / "map.png",
        adversarial_codes=scorer2.transform(captures["noise"])[:40],
        grid_size=60,
    )
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = imread(out)
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 300
    assert image[..., :3].std() > 0.05  # not a blank canvas
    with pytest.raises(InvalidInput, match=r"shape \(n, 2\)"):
        plot_activation_map(scorer2.transform(test)[:, :1], digits_split_arrays["y_test"], test.predicted,
                            scorer2, tmp_path / "bad.png")
