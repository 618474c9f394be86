"""Choosing the fused statistic: a strong member is not diluted by weak ones; weighted Fisher in closed form."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from detector.conformal import Fusion
from detector.errors import InvalidInput
from detector.fusion_choice import auroc_standard_error, choose_fusion, logistic_weights


def _p_values(seed: int) -> tuple[dict, dict]:
    """Clean p-values uniform; positives: 'strong' tiny, 'medium' somewhat small, 'weak_*' uniform."""
    rng = np.random.default_rng(seed)
    clean = {k: rng.uniform(0.001, 1, 400) for k in ("strong", "medium", "weak_a", "weak_b")}
    positive = {"strong": rng.uniform(0.001, 0.05, 200), "medium": rng.uniform(0.001, 0.6, 200),
                "weak_a": rng.uniform(0.001, 1, 200), "weak_b": rng.uniform(0.001, 1, 200)}
    return clean, {"attack": positive}


def test_a_strong_member_is_not_diluted_by_weak_ones():
    clean, positives = _p_values(0)
    names = list(clean)
    choice = choose_fusion(clean, positives, names, default=names)
    assert "strong" in choice.scores and not {"weak_a", "weak_b"} <= set(choice.scores)  # zero weights dropped
    assert choice.auroc["attack"] > choice.alternatives["default"]  # Fisher over all four is diluted
    assert "highest mean AUROC" in choice.reason() and "default" in choice.reason()


def test_the_worst_case_prefers_the_member_that_holds_on_every_family():
    """'sharp' catches the high-confidence attack and half misses the boundary one; 'even' sees both fairly
    well. Among single members the mean prefers 'sharp' (its easy 1.0 buys the loss), the lowest AUROC
    prefers 'even'; the weighted Fisher over both beats each on either criterion."""
    rng = np.random.default_rng(2)
    clean = {k: rng.uniform(0.001, 1, 400) for k in ("sharp", "even")}
    positives = {"fgsm": {"sharp": rng.uniform(0.0001, 0.002, 200), "even": rng.uniform(0.001, 0.4, 200)},
                 "deepfool": {"sharp": rng.uniform(0.001, 0.6, 200), "even": rng.uniform(0.001, 0.4, 200)}}

    def auroc(member: str, attack: str) -> float:  # of one member's -log p: larger for positives
        return roc_auc_score(np.r_[np.zeros(400), np.ones(200)], -np.log(np.r_[clean[member], positives[attack][member]]))

    sharp, even = ([auroc(m, a) for a in positives] for m in ("sharp", "even"))
    assert np.mean(sharp) > np.mean(even) and min(even) > min(sharp)
    mean = choose_fusion(clean, positives, ["sharp", "even"], ["sharp"], max_members=1, criterion="mean")
    worst = choose_fusion(clean, positives, ["sharp", "even"], ["sharp"], max_members=1)
    assert mean.alternatives["min"] == pytest.approx(np.mean(sharp), abs=1e-4)  # the best single member
    assert worst.alternatives["min"] == pytest.approx(min(even), abs=1e-4)
    assert worst.alternatives["default"] == pytest.approx(min(sharp), abs=1e-4)
    assert min(worst.auroc.values()) > min(even) and worst.weights is not None
    assert "lowest within 0.01 of the best lowest" in worst.reason() and "lowest within" not in mean.reason()
    with pytest.raises(InvalidInput, match="criterion must be one of"):
        choose_fusion(clean, positives, ["sharp"], ["sharp"], criterion="median")


def test_auroc_standard_error_matches_the_mann_whitney_null_variance():
    # at A = 1/2, Hanley & McNeil's variance is the Mann-Whitney statistic's under the null: (n0 + n1 + 1) / (12 n0 n1)
    for n0, n1 in ((100, 100), (400, 37)):
        assert auroc_standard_error(0.5, n0, n1) == pytest.approx(np.sqrt((n0 + n1 + 1) / (12 * n0 * n1)))
    assert auroc_standard_error(1.0, 50, 50) == 0.0
    assert auroc_standard_error(0.9, 400, 400) < auroc_standard_error(0.9, 100, 100)


def test_a_costly_member_must_buy_more_than_one_standard_error():
    """'squeezed' (cost 2: two squeezed copies of the input) adds a little to 'cheap'; with costs, the cheaper
    candidate within one standard error wins; a costly member that adds a lot is kept."""
    rng = np.random.default_rng(6)
    clean = {k: rng.uniform(0.001, 1, 300) for k in ("cheap", "squeezed")}
    slight = {"attack": {"cheap": rng.uniform(0.001, 0.3, 150), "squeezed": rng.uniform(0.001, 0.7, 150)}}
    free = choose_fusion(clean, slight, ["cheap", "squeezed"], ["cheap"])
    assert "squeezed" in free.scores and free.cheaper_than is None
    costed = choose_fusion(clean, slight, ["cheap", "squeezed"], ["cheap"], costs={"squeezed": 2.0})
    assert costed.scores == ["cheap"]
    assert free.auroc["attack"] - 0.03 < costed.auroc["attack"] < free.auroc["attack"]
    assert "cheaper (cost 0) than" in costed.reason() and "within one standard error" in costed.reason()
    strong = {"attack": {"cheap": rng.uniform(0.001, 0.3, 150), "squeezed": rng.uniform(0.001, 0.05, 150)}}
    kept = choose_fusion(clean, strong, ["cheap", "squeezed"], ["cheap"], costs={"squeezed": 2.0})
    assert "squeezed" in kept.scores and kept.cheaper_than is None
    budget = choose_fusion(clean, strong, ["cheap", "squeezed"], ["cheap"], costs={"squeezed": 2.0}, max_cost=0)
    assert budget.scores == ["cheap"]  # a hard budget excludes it whatever it buys
    with pytest.raises(InvalidInput, match="no candidate costs at most 1"):
        choose_fusion(clean, strong, ["squeezed"], ["squeezed"], costs={"squeezed": 2.0}, max_cost=1)


def test_logistic_weights_favour_the_informative_member():
    clean, positives = _p_values(1)
    names = list(clean)
    w = logistic_weights(np.stack([clean[n] for n in names], 1), np.stack([positives["attack"][n] for n in names], 1))
    assert w.sum() == pytest.approx(1.0) and (w >= 0).all() and w.argmax() == 0


def test_weighted_fisher_closed_form_and_checks():
    p = np.array([[0.5, 0.01], [1.0, 1.0]])
    np.testing.assert_allclose(Fusion("fisher", [2.0, 0.5]).combine(p), [-2 * (2 * np.log(0.5) + 0.5 * np.log(0.01)), 0])
    np.testing.assert_allclose(Fusion("fisher", [1.0, 1.0]).combine(p), Fusion("fisher").combine(p))
    with pytest.raises(InvalidInput, match="weights need method 'fisher'"):
        Fusion("min", [1.0, 1.0])
    with pytest.raises(InvalidInput, match="2 weights for 3 p-values"):
        Fusion("fisher", [1.0, 1.0]).combine(np.full((1, 3), 0.5))
    with pytest.raises(InvalidInput, match="non-empty set of positives"):
        choose_fusion({"a": np.ones(3)}, {"x": {"a": np.ones(0)}}, ["a"], ["a"])


def test_calibration_records_the_chosen_rules(cnn_baseline):
    _, manifest = cnn_baseline
    rules = {r.name: r for r in manifest.flags}
    assert rules["adversarial"].selection.startswith("tuning attacks fgsm, fgsm_foreground")
    assert "nonzero_pixels" not in rules["adversarial"].scores
    # the digits calibration set has fewer than 5 errors in its reference split: the default pair
    assert rules["likely_misclassified"].scores == ["max_softmax", "trust_score"]
    assert "fewer than 5 misclassifications" in rules["likely_misclassified"].selection
