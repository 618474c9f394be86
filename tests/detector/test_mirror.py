"""The differentiable mirror reproduces the served detector and its gradients are the surrogate's true gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from detector.manifest import FlagRule

torch.set_num_threads(1)

#: Mirror fidelity: relative error of every raw score and fused statistic against ONNX Runtime + numpy
#: (measured: <= 3e-6 on the digits CNN and LeNet-5; the rest is float32 rounding of torch vs ONNX Runtime).
SCORE_RTOL = 1e-4


@pytest.fixture(scope="module")
def clean_and_attacked(cnn_mirror, digits_split_arrays) -> np.ndarray:
    """30 clean test digits and the same digits after one signed-gradient step (eps 0.3) on the mirror's logits."""
    x = digits_split_arrays["x_test"][:30].astype(np.float32)
    y = torch.from_numpy(digits_split_arrays["y_test"][:30].astype(np.int64))
    xt = torch.from_numpy(x).requires_grad_(True)
    logits, _ = cnn_mirror.classify(xt)
    torch.nn.functional.cross_entropy(logits, y).backward()
    attacked = np.clip(x + 0.3 * np.sign(xt.grad.numpy()), 0.0, 1.0).astype(np.float32)
    return np.concatenate([x, attacked])


def _close(a: np.ndarray, b: np.ndarray, rtol: float) -> bool:
    return bool(np.all(np.abs(a - b) <= rtol * np.maximum(np.abs(b), 1e-3)))


def test_mirror_reproduces_every_score_p_value_and_statistic(cnn_detector, cnn_mirror, clean_and_attacked):
    x = clean_and_attacked
    real = cnn_detector.detect(x).detections
    with torch.no_grad():
        out = cnn_mirror(torch.from_numpy(x))
    assert np.array_equal(out.predicted, [d.predicted_class for d in real])
    assert (out.predicted[:30] != out.predicted[30:]).sum() >= 5  # the attacked half really moved
    for name in cnn_detector.score_names:
        assert _close(out.scores[name].numpy(), np.array([d.scores[name] for d in real]), SCORE_RTOL), name
        # a p-value is a rank: equal unless a score sits within the rounding of a reference (none here)
        assert np.allclose(out.p_values[name].numpy(), [d.p_values[name] for d in real], rtol=1e-4, atol=0), name
    for rule in cnn_detector.manifest.flags:
        assert _close(out.statistics[rule.name].numpy(), np.array([d.statistics[rule.name] for d in real]), SCORE_RTOL)
    threshold = cnn_mirror.threshold("adversarial", 0.05)
    assert np.array_equal(out.statistics["adversarial"].numpy() > threshold, ["adversarial" in d.flags for d in
                                                                              cnn_detector.detect(x, fpr=0.05).detections])


def _members(detector, rule_name: str) -> list[str]:
    return list(next(r for r in detector.manifest.flags if r.name == rule_name).members)


def test_a_subset_of_scores_gives_only_their_rules(cnn_detector, cnn_mirror, clean_and_attacked):
    members = _members(cnn_detector, "likely_misclassified")
    assert set(members) != set(_members(cnn_detector, "adversarial"))
    with torch.no_grad():
        out = cnn_mirror(torch.from_numpy(clean_and_attacked[:4]), scores=members)
    assert set(out.scores) == set(members)
    assert set(out.statistics) == {r.name for r in cnn_detector.manifest.flags if set(r.members) <= set(members)}
    assert "likely_misclassified" in out.statistics
    with pytest.raises(Exception, match="unknown scores"):
        cnn_mirror(torch.from_numpy(clean_and_attacked[:1]), scores=["no_such_score"])


def test_fusion_matches_the_serving_fusion():
    from detector.offline.mirror import fuse

    p = np.random.default_rng(0).uniform(1e-4, 1.0, size=(20, 3))
    p[:3, :2] = [[1e-200, 1e-250], [1e-300, 1e-300], [1.0, 1.0]]  # past the Gamma tail's underflow, and T = 0
    log_p = {name: torch.from_numpy(np.log(p[:, j])) for j, name in enumerate("abc")}
    for method, weights in (("fisher", None), ("fisher", [2.0, 0.5]), ("min", None), ("harmonic", None)):
        for screen in (None, "c"):
            rule = FlagRule(name="f", scores=["a", "b"] if screen else ["a", "b", "c"], fusion=method, weights=weights,
                            thresholds=[], default_fpr=0.01, screen=screen, screen_share=0.2 if screen else None)
            if weights and not screen:
                continue
            served = rule.fusion_op().combine(p)
            assert np.isfinite(served).all()
            assert np.allclose(fuse(rule, log_p).numpy(), served, rtol=1e-10), (method, weights, screen)


def _noisy_rows(clean_and_attacked: np.ndarray, rows: tuple[int, ...], seed: int = 0):
    """Inputs with ties between edge weights broken (digits' pixels are multiples of 1/16) and a direction each."""
    rng = np.random.default_rng(seed)
    for row in rows:
        x = clean_and_attacked[row:row + 1]
        yield (np.clip(x + rng.uniform(0.0, 0.02, x.shape), 0.0, 1.0).astype(np.float32),
               rng.standard_normal(x.shape).astype(np.float32))


def _directional(f, x: np.ndarray, v: np.ndarray, eps: float = 1e-4) -> tuple[float, float]:
    """(autograd, central difference) derivative of the scalar ``f`` at ``x`` along ``v``."""
    xt = torch.from_numpy(x).requires_grad_(True)
    f(xt).backward()
    with torch.no_grad():
        numeric = (float(f(torch.from_numpy(x + eps * v))) - float(f(torch.from_numpy(x - eps * v)))) / (2 * eps)
    return float((xt.grad.numpy() * v).sum()), numeric


def test_topology_gradients_match_finite_differences_for_a_fixed_forest(cnn_detector, cnn_mirror, clean_and_attacked,
                                                                        monkeypatch):
    """The BPDA step: with the forest of x held, the deaths' gradients are exact (to float32, a few per cent).

    Checked on the smooth summaries (total persistence and entropy, whole graph and per pair); the quantiles
    and the Betti cut are order statistics of thousands of nearly equal weights, whose derivative is that of
    whichever edge holds the rank (what autograd gives) and which finite differences average over.
    """
    from detector.offline.mirror_topology import TopologyMirror

    features = cnn_detector.scorers[0].features
    topology = TopologyMirror(features, straight_through=False)
    columns = [j for j, n in enumerate(features.persistence_names) if "total_persistence" in n or "entropy" in n]

    def smooth_summaries(x: torch.Tensor) -> torch.Tensor:
        logits, activations = cnn_mirror.classify(x)
        return topology.transform(x, logits, activations)["persistence"][0, columns].sum()

    compute = features.forest.compute
    for x, v in _noisy_rows(clean_and_attacked, (0, 3, 31, 34)):
        held = compute(cnn_detector.classify(x), 0)
        monkeypatch.setattr(features.forest, "compute", lambda capture, i: held)
        analytic, numeric = _directional(smooth_summaries, x, v)
        monkeypatch.setattr(features.forest, "compute", compute)
        assert abs(analytic - numeric) <= 0.05 * abs(numeric) + 1e-3, (analytic, numeric)


def test_score_and_p_value_gradients_match_finite_differences(cnn_detector, clean_and_attacked):
    """With the surrogates used both ways, the other scores, their smoothed p-values and the fused statistic."""
    from detector.offline.mirror import DetectorMirror, MirrorSettings, fuse

    smooth = DetectorMirror(cnn_detector, MirrorSettings(straight_through=False))
    # feature squeezing is left out: its bit-depth rounding passes gradients straight through, so finite
    # differences see steps where the mirror sees the identity
    names = ["introspection_reconstruction", "introspection_error", "max_softmax", "mahalanobis", "knn", "energy",
             "layerwise_mahalanobis", "layerwise_knn", "trust_score", "patch_pca"]
    screened = FlagRule(name="f", scores=["max_softmax", "introspection_error"], fusion="fisher", weights=[2.0, 0.5],
                        thresholds=[], default_fpr=0.01, screen="patch_pca", screen_share=0.2)
    agree = 0
    for x, v in _noisy_rows(clean_and_attacked, (0, 3, 31, 34)):
        with torch.no_grad():
            scale = {n: abs(float(s)) + 1e-3 for n, s in smooth(torch.from_numpy(x), scores=names).scores.items()}

        def total(xt: torch.Tensor) -> torch.Tensor:
            out = smooth(xt, scores=names)
            return (sum(out.scores[n].sum() / scale[n] for n in names) - out.log_p_values["knn"].sum()
                    + fuse(screened, out.log_p_values).sum())

        analytic, numeric = _directional(total, x, v)
        agree += abs(analytic - numeric) <= 0.05 * abs(numeric) + 1e-3
    assert agree >= 3  # a ReLU of the last hidden layer may switch inside the step of one of them


def test_an_unmirrored_scorer_kind_is_refused(cnn_detector):
    from detector.offline.mirror import SCORE_MIRRORS, DetectorMirror

    saved = SCORE_MIRRORS.pop("knn")
    try:
        with pytest.raises(NotImplementedError, match="knn"):
            DetectorMirror(cnn_detector)
    finally:
        SCORE_MIRRORS["knn"] = saved
