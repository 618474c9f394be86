"""Conformal p-values, fusion and fused thresholds: closed-form values, and validity on real clean digits.

Scorers (peers) are fitted on the training digits; p-value references and fused thresholds come from the
calibration digits; the test digits are the fresh clean split. None of them was seen by the classifier.

Tolerances. For a fresh clean split of m inputs, each ranked against a reference group of n_g clean
scores, the rate of p <= a has mean E = sum_g (m_g/m) q_g with q_g = floor(a (n_g+1)) / (n_g+1) (exact for
continuous scores), and variance = binomial part E(1-E)/m + calibration part sum_g (m_g/m)^2 Var(C_g), where
the coverage C_g of one reference draw is Beta(l_g, n_g+1-l_g), l_g = floor(a (n_g+1)). We accept
|rate - E| <= 3 sd. The permutation tests average R random splits of a fixed pool, whose expectation is
exactly E (rank of a point among n+1 exchangeable ones is uniform); there we accept 4 Monte-Carlo standard
errors, measured from the R splits.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import gammaincc
from scipy.stats import chi2

from detector import InvalidInput, NotReady, OnnxClassifier
from detector.conformal import (FUSION_METHODS, CalibratorStack, ConformalCalibrator, Fusion, cross_fitted_p_values,
                                split_held_out, stratified_folds)
from detector.scorers.peers import KNNScorer, MahalanobisScorer, MaxSoftmaxScorer

N_CLASSES = 10


@pytest.fixture(scope="module")
def scored(demo_models, digits_split_arrays):
    """Clean held-out scores (calib, test) of three peers fitted on the training digits, and predicted classes."""
    d = digits_split_arrays
    clf = OnnxClassifier(demo_models / "digits_cnn.onnx")
    train, calib, test = (clf.run(d[f"x_{k}"]) for k in ("train", "calib", "test"))
    scorers = [s.fit(train, d["y_train"]) for s in (MaxSoftmaxScorer(), MahalanobisScorer(), KNNScorer())]
    return {"calib": np.column_stack([s.score(calib) for s in scorers]), "calib_class": calib.predicted,
            "test": np.column_stack([s.score(test) for s in scorers]), "test_class": test.predicted,
            "names": [s.kind for s in scorers]}


def _brute_p(scores: np.ndarray, ref: np.ndarray) -> np.ndarray:
    return (1.0 + (ref[None, :] >= scores[:, None]).sum(axis=1)) / (len(ref) + 1.0)


def _expected_rate(cal: ConformalCalibrator, classes: np.ndarray, a: float) -> tuple[float, float]:
    """Mean and standard deviation of the rate of p <= a on a fresh clean split (see the module docstring)."""
    groups = np.where(cal.conditional_[classes], classes, -1)  # -1: the global reference group
    m = len(classes)
    mean, var_cal = 0.0, 0.0
    for g in np.unique(groups):
        n = int(cal.reference_size(classes[groups == g])[0])
        share = (groups == g).mean()
        l = math.floor(a * (n + 1))
        mean += share * l / (n + 1)
        var_cal += share ** 2 * l * (n + 1 - l) / ((n + 1) ** 2 * (n + 2))
    return mean, math.sqrt(mean * (1 - mean) / m + var_cal)


# -- p-values: closed form -------------------------------------------------------------------------------

def test_p_values_on_a_hand_made_reference():
    cal = ConformalCalibrator(min_class_count=1, tail=False).fit(np.array([3.0, 1.0, 4.0, 2.0]), np.zeros(4, np.int64), 1)
    p = cal.p_values(np.array([0.0, 2.0, 2.5, 4.0, 10.0, np.inf]), np.zeros(6, np.int64))
    # (1 + #{ref >= s}) / 5: ties count as "at least as extreme"
    np.testing.assert_allclose(p, [1.0, 0.8, 0.6, 0.4, 0.2, 0.2])


def test_p_values_lie_in_0_1_and_fall_as_the_score_rises(scored):
    ref, cls = scored["calib"][:, 2], scored["calib_class"]
    cal = ConformalCalibrator(tail=False).fit(ref, cls, N_CLASSES)
    grid = np.linspace(ref.min() - 1, ref.max() + 1, 2001)
    for c in range(N_CLASSES):
        p = cal.p_values(grid, np.full(len(grid), c))
        n = cal.reference_size(np.array([c]))[0]
        assert (p > 0).all() and (p <= 1).all()
        assert (np.diff(p) <= 0).all()  # non-increasing in the score
        assert p[0] == 1.0 and p[-1] == pytest.approx(1 / (n + 1))


def test_class_conditional_and_global_paths_match_brute_force(scored):
    ref, cls = scored["calib"][:, 0], scored["calib_class"]
    counts = np.bincount(cls, minlength=N_CLASSES)
    # a cut between the class counts: the larger classes get their own references, the others the global ones
    cut = int(np.median(counts)) + 1
    cal = ConformalCalibrator(min_class_count=cut, tail=False).fit(ref, cls, N_CLASSES)
    np.testing.assert_array_equal(cal.conditional_, counts >= cut)
    assert cal.conditional_.any() and not cal.conditional_.all(), counts
    s, c = scored["test"][:, 0], scored["test_class"]
    p = cal.p_values(s, c)
    for k in range(N_CLASSES):
        rows = c == k
        own = ref[cls == k] if cal.conditional_[k] else ref
        np.testing.assert_allclose(p[rows], _brute_p(s[rows], own), rtol=1e-15)
    for everyone in (ConformalCalibrator(min_class_count=len(ref) + 1, tail=False).fit(ref, cls, N_CLASSES),
                     ConformalCalibrator(min_class_count=1, tail=False, by_class=False).fit(ref, cls, N_CLASSES)):
        assert not everyone.conditional_.any()
        np.testing.assert_allclose(everyone.p_values(s, c), _brute_p(s, ref), rtol=1e-15)


# -- p-values: validity on real clean data ---------------------------------------------------------------

@pytest.mark.parametrize("min_class_count", [50, 10_000], ids=["class-conditional", "global"])
def test_rate_of_small_p_values_on_the_fresh_clean_split(scored, min_class_count):
    for j, name in enumerate(scored["names"]):
        cal = ConformalCalibrator(min_class_count).fit(scored["calib"][:, j], scored["calib_class"], N_CLASSES)
        assert cal.conditional_.any() == (min_class_count == 50)
        p = cal.p_values(scored["test"][:, j], scored["test_class"])
        for a in (0.05, 0.1):
            mean, sd = _expected_rate(cal, scored["test_class"], a)
            rate = (p <= a).mean()
            assert abs(rate - mean) <= 3 * sd, (name, a, rate, mean, sd)


@pytest.mark.parametrize("stratified", [True, False], ids=["class-conditional", "global"])
def test_p_values_are_exactly_uniform_over_random_splits(scored, stratified):
    """Averaged over random splits of one pool, P(p <= a) = floor(a (n+1)) / (n+1) exactly, for every a.

    Small reference sets (about 5 per class; 19 globally) make the p-value grid coarse, so that an
    off-by-one in the formula moves the rate by ~1/(n+1), many standard errors.
    """
    pool = np.r_[scored["calib"][:, 2], scored["test"][:, 2]]  # k-NN distances: continuous
    cls = np.r_[scored["calib_class"], scored["test_class"]]
    assert len(np.unique(pool)) == len(pool)  # no ties, so the expectation is exact, not just a bound
    grid, repeats = np.linspace(0.01, 0.99, 99), 1000
    rates, expected, first_sizes = np.empty((repeats, len(grid))), None, None
    rng = np.random.default_rng(1)
    for r in range(repeats):
        if stratified:
            ref, new = split_held_out(cls, 0.06, seed=r)
            cal = ConformalCalibrator(min_class_count=1, tail=False).fit(pool[ref], cls[ref], N_CLASSES)
        else:
            perm = rng.permutation(len(pool))
            ref, new = perm[:19], perm[19:]
            cal = ConformalCalibrator(min_class_count=len(pool), tail=False).fit(pool[ref], cls[ref], N_CLASSES)
        p = cal.p_values(pool[new], cls[new])
        rates[r] = (p[:, None] <= grid).mean(axis=0)
        sizes = np.sort(cal.reference_size(cls[new]))
        if expected is None:
            first_sizes, expected = sizes, np.array([_expected_rate(cal, cls[new], a)[0] for a in grid])
        np.testing.assert_array_equal(sizes, first_sizes)  # the reference sizes do not depend on the draw
    standard_error = rates.std(axis=0, ddof=1) / math.sqrt(repeats)
    deviation = np.abs(rates.mean(axis=0) - expected)
    assert (deviation <= 4 * standard_error + 1e-12).all(), (grid[deviation > 4 * standard_error], deviation.max())


# -- fusion ----------------------------------------------------------------------------------------------

def test_fusion_rules_on_hand_made_p_values():
    p = np.array([[0.5, 0.5], [0.1, 1.0], [1.0, 1.0]])
    np.testing.assert_allclose(Fusion("fisher").combine(p), [4 * math.log(2), 2 * math.log(10), 0.0])
    np.testing.assert_allclose(Fusion("min").combine(p), [math.log(2), math.log(10), 0.0])
    np.testing.assert_allclose(Fusion("harmonic").combine(p), [2.0, 5.5, 1.0])
    for bad in (np.array([[0.0, 0.5]]), np.array([[1.5, 0.5]]), np.array([[np.nan, 0.5]])):
        with pytest.raises(InvalidInput, match=r"\(0, 1\]"):
            Fusion().combine(bad)
    with pytest.raises(InvalidInput, match="fusion method"):
        Fusion("mean").combine(p)


def test_a_screen_is_or_ed_with_the_group_by_weighted_bonferroni():
    p = np.array([[0.5, 0.5, 1.0], [0.5, 0.5, 0.002], [0.01, 0.02, 0.9]])
    screened = Fusion("fisher", screen_share=0.2).combine(p)
    group_p = chi2.sf(Fusion("fisher").combine(p[:, :2]), 4)  # Fisher's chi-square(2k) p-value of the group
    np.testing.assert_allclose(screened, -np.log(np.minimum(group_p / 0.8, p[:, 2] / 0.2)))
    assert screened[1] == pytest.approx(-math.log(0.002 / 0.2))  # the screen alone fires, undiluted
    assert screened[2] == pytest.approx(-math.log(group_p[2] / 0.8))  # the group fires, the screen's 0.9 ignored
    weighted = Fusion("fisher", [2.0, 1.0], screen_share=0.5).combine(p)
    assert weighted[0] == pytest.approx(-math.log(gammaincc(3.0, -(2 * math.log(0.5) + math.log(0.5))) / 0.5))
    np.testing.assert_allclose(Fusion("min", screen_share=0.5).combine(p),
                               -np.log(np.minimum(np.minimum(1, 2 * p[:, :2].min(axis=1)), p[:, 2]) / 0.5))
    # p-values extrapolated past the largest reference score: the Gamma tail underflows, its asymptote takes over
    tiny = np.array([[1e-200, 1e-200, 0.5], [1e-300, 1e-300, 0.5], [1.0, 1.0, 1.0]])
    far = Fusion("fisher", screen_share=0.05).combine(tiny)
    assert np.isfinite(far).all() and far[0] < far[1]
    x = -np.log(1e-200) * 2  # T / 2 for the first row
    assert far[0] == pytest.approx(-(np.log(x) - x - math.log(1.0)) + math.log(0.95), rel=1e-3)  # a = 2: Gamma(2)
    assert far[2] == pytest.approx(math.log(0.95))  # P(T = 0) = 1 and p_s / s = 20: the group's branch
    with pytest.raises(InvalidInput, match="screen_share must lie in"):
        Fusion("fisher", screen_share=1.0)
    with pytest.raises(InvalidInput, match="besides the screen's"):
        Fusion("fisher", screen_share=0.2).combine(p[:, :1])
    with pytest.raises(InvalidInput, match="2 weights for 1 p-values"):
        Fusion("fisher", [1.0, 1.0], screen_share=0.2).combine(p[:, 1:])


def test_conformal_quantile_threshold_closed_form():
    values = np.arange(1.0, 100.0)  # n = 99
    t = Fusion.fit_threshold(values, 0.05)  # k = ceil(100 * 0.95) = 95
    assert t == 95.0 and (values > t).sum() == 4
    assert Fusion.fit_threshold(np.arange(19.0), 0.05) == 18.0  # n = 19: k = 19 = n, the maximum
    with pytest.raises(InvalidInput, match="needs at least 19 clean held-out values, got 18"):
        Fusion.fit_threshold(np.arange(18.0), 0.05)
    with pytest.raises(InvalidInput, match="fpr must lie in"):
        Fusion.fit_threshold(values, 0.0)


def test_threshold_keeps_the_empirical_rate_below_target_even_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(20, 400))
        a = float(rng.uniform(0.05, 0.5))
        values = rng.integers(0, int(rng.integers(2, 50)), n).astype(float)  # many ties
        t = Fusion.fit_threshold(values, a)
        assert (values > t).mean() <= a
        assert t in values


def test_fused_threshold_false_positive_rate_on_the_fresh_clean_split(scored):
    ref, thr = split_held_out(scored["calib_class"], 0.5, seed=0)
    cals = [ConformalCalibrator().fit(scored["calib"][ref, j], scored["calib_class"][ref], N_CLASSES)
            for j in range(len(scored["names"]))]

    def p_values(scores, classes):
        return np.column_stack([c.p_values(scores[:, j], classes) for j, c in enumerate(cals)])

    p_thr = p_values(scored["calib"][thr], scored["calib_class"][thr])
    p_test = p_values(scored["test"], scored["test_class"])
    m, n = len(p_test), len(thr)
    for method in FUSION_METHODS:
        fusion = Fusion(method)
        for a in (0.05, 0.1):
            t = fusion.fit_threshold(fusion.combine(p_thr), a)
            assert (fusion.combine(p_thr) > t).mean() <= a
            rate = (fusion.combine(p_test) > t).mean()
            sd = math.sqrt(a * (1 - a) / m + a * (1 - a) / (n + 2))
            assert rate <= a + 3 * sd, (method, a, rate, sd)


def test_stratified_folds_deal_every_class_evenly_and_repeat_with_the_seed():
    classes = np.repeat(np.arange(4), [40, 33, 7, 1])
    fold = stratified_folds(classes, 10, seed=3)
    for k in range(4):  # each class's inputs are dealt in turn: fold sizes within a class differ by at most 1
        sizes = np.bincount(fold[classes == k], minlength=10)
        assert sizes.max() - sizes.min() <= 1 and sizes.sum() == (classes == k).sum()
    np.testing.assert_array_equal(fold, stratified_folds(classes, 10, seed=3))
    assert not np.array_equal(fold, stratified_folds(classes, 10, seed=4))
    with pytest.raises(InvalidInput, match="folds must be an integer >= 2"):
        stratified_folds(classes, 1)


def test_cross_fitted_p_values_rank_each_input_among_the_other_folds(scored):
    scores = {n: scored["calib"][:, j] for j, n in enumerate(scored["names"])}
    c = scored["calib_class"]
    p = cross_fitted_p_values(scores, c, N_CLASSES, lambda name: ConformalCalibrator(), folds=5, seed=1)
    fold = stratified_folds(c, 5, seed=1)
    for k in (0, 4):
        test = fold == k
        for name, s in scores.items():
            own = ConformalCalibrator().fit(s[~test], c[~test], N_CLASSES).p_values(s[test], c[test])
            np.testing.assert_array_equal(p[name][test], own)


def test_cross_fitted_thresholds_keep_the_false_positive_rate_on_the_fresh_clean_split(scored):
    """Calibrators on every calibration digit, thresholds on their out-of-fold statistics: the rate on the test
    digits stays within the split-conformal tolerance (the refitted calibrators rank a new input among
    n references, the out-of-fold ones among 0.9 n)."""
    names, c = scored["names"], scored["calib_class"]
    scores = {n: scored["calib"][:, j] for j, n in enumerate(names)}
    oof = cross_fitted_p_values(scores, c, N_CLASSES, lambda name: ConformalCalibrator())
    cals = {n: ConformalCalibrator().fit(s, c, N_CLASSES) for n, s in scores.items()}
    p_oof = np.column_stack([oof[n] for n in names])
    p_test = np.column_stack([cals[n].p_values(scored["test"][:, j], scored["test_class"]) for j, n in enumerate(names)])
    m, n = len(p_test), len(c)
    for method in FUSION_METHODS:
        fusion = Fusion(method)
        for a in (0.05, 0.1):
            t = fusion.fit_threshold(fusion.combine(p_oof), a)
            rate = (fusion.combine(p_test) > t).mean()
            sd = math.sqrt(a * (1 - a) / m + a * (1 - a) / (n + 2))
            assert rate <= a + 3 * sd, (method, a, rate, sd)


def test_chi_square_reference_over_flags_correlated_scorers(scored):
    """Why thresholds are calibrated empirically: the peers' p-values are correlated, Fisher's chi2(2k) tail is too light."""
    ref, thr = split_held_out(scored["calib_class"], 0.5, seed=0)
    cals = [ConformalCalibrator().fit(scored["calib"][ref, j], scored["calib_class"][ref], N_CLASSES) for j in range(3)]
    p_test = np.column_stack([c.p_values(scored["test"][:, j], scored["test_class"]) for j, c in enumerate(cals)])
    log_p = -np.log(p_test)
    assert np.corrcoef(log_p.T)[np.triu_indices(3, 1)].min() > 0.2  # measured 0.38-0.64
    a = 0.01
    rate = (Fusion("fisher").combine(p_test) > chi2.ppf(1 - a, 2 * 3)).mean()
    assert rate > a + 3 * math.sqrt(a * (1 - a) / len(p_test)), rate  # measured 0.053 at a target of 0.01


# -- split, state, errors --------------------------------------------------------------------------------

def test_split_is_deterministic_disjoint_and_stratified(scored):
    cls = scored["calib_class"]
    ref, thr = split_held_out(cls, 0.5, seed=3)
    ref2, thr2 = split_held_out(cls, 0.5, seed=3)
    np.testing.assert_array_equal(ref, ref2)
    np.testing.assert_array_equal(thr, thr2)
    assert not np.array_equal(ref, split_held_out(cls, 0.5, seed=4)[0])
    assert len(np.intersect1d(ref, thr)) == 0
    np.testing.assert_array_equal(np.sort(np.r_[ref, thr]), np.arange(len(cls)))
    counts = np.bincount(cls, minlength=N_CLASSES)
    np.testing.assert_array_equal(np.bincount(cls[ref], minlength=N_CLASSES), np.round(counts * 0.5).astype(int))
    small_ref, small_thr = split_held_out(np.array([0, 0, 1, 1, 1]), 0.1)
    assert len(small_ref) == 2 and len(small_thr) == 3  # each class keeps one input on each side


def test_calibrator_state_round_trip(scored, tmp_path):
    cal = ConformalCalibrator(min_class_count=54).fit(scored["calib"][:, 1], scored["calib_class"], N_CLASSES)
    np.savez(tmp_path / "cal.npz", **cal.get_state("conformal/mahalanobis/"))
    with np.load(tmp_path / "cal.npz", allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    restored = ConformalCalibrator.from_state(arrays, "conformal/mahalanobis/")
    assert restored.min_class_count == 54
    np.testing.assert_array_equal(restored.conditional_, cal.conditional_)
    s, c = scored["test"][:, 1], scored["test_class"]
    np.testing.assert_array_equal(restored.p_values(s, c), cal.p_values(s, c))
    arrays["conformal/mahalanobis/class_offsets"] = arrays["conformal/mahalanobis/class_offsets"][:-1]
    with pytest.raises(InvalidInput, match="inconsistent"):
        ConformalCalibrator.from_state(arrays, "conformal/mahalanobis/")


def test_calibrator_refuses_bad_input(scored):
    s, c = scored["calib"][:, 0], scored["calib_class"]
    with pytest.raises(NotReady, match="not fitted"):
        ConformalCalibrator().p_values(s, c)
    with pytest.raises(InvalidInput, match="finite"):
        ConformalCalibrator().fit(np.r_[s[:-1], np.inf], c, N_CLASSES)
    with pytest.raises(InvalidInput, match="classes of shape"):
        ConformalCalibrator().fit(s, c[:-1], N_CLASSES)
    cal = ConformalCalibrator().fit(s, c, N_CLASSES)
    with pytest.raises(InvalidInput, match="not NaN"):
        cal.p_values(np.array([np.nan]), np.array([0]))
    with pytest.raises(InvalidInput, match=r"classes must lie in \[0, 9\]"):
        cal.p_values(np.array([1.0]), np.array([10]))
    with pytest.raises(InvalidInput, match="min_class_count"):
        ConformalCalibrator(min_class_count=0).fit(s, c, N_CLASSES)


def test_exponential_tail_extends_p_values_beyond_the_references(scored):
    ref, cls = scored["calib"][:, 1], scored["calib_class"]
    exact = ConformalCalibrator(min_class_count=10**6, tail=False).fit(ref, cls, N_CLASSES)  # global references
    tailed = ConformalCalibrator(min_class_count=10**6, tail=True).fit(ref, cls, N_CLASSES)
    inside = np.linspace(ref.min(), ref.max(), 50)
    c0 = np.zeros(50, np.int64)
    np.testing.assert_array_equal(tailed.p_values(inside, c0), exact.p_values(inside, c0))  # unchanged inside
    top = ref.max()
    beyond = top + (np.linspace(0, 10, 50) + 1e-9) * np.std(ref)
    p = tailed.p_values(beyond, c0)
    floor = 1.0 / (len(ref) + 1)
    assert abs(p[0] - floor) < 1e-6 * floor  # continuous at the largest reference
    assert (np.diff(p) < 0).all() and (p > 0).all()  # strictly decreasing, never 0
    assert (exact.p_values(beyond, c0) == floor).all()  # where plain conformal p-values saturate
    # approximate validity below 1/(n+1): on a fresh clean split, p <= a happens about a of the time
    fresh = ConformalCalibrator(min_class_count=10**6).fit(ref[::2], cls[::2], N_CLASSES).p_values(ref[1::2], cls[1::2])
    n_ref = len(ref[::2])
    for a in (0.5 / (n_ref + 1), 1.0 / (n_ref + 1)):
        assert np.mean(fresh <= a) <= a + 3 * np.sqrt(a * (1 - a) / len(fresh)) + 1.0 / len(fresh)
    state = tailed.get_state("c/")
    np.testing.assert_array_equal(ConformalCalibrator.from_state(state, "c/").p_values(beyond, c0), p)


def test_a_stack_of_calibrators_gives_each_ones_p_values(scored):
    """The serving path's one compiled call equals each calibrator's own p_values, tails and classes included."""
    cals = [ConformalCalibrator(min_class_count=m, tail=t).fit(scored["calib"][:, j], scored["calib_class"], N_CLASSES)
            for j, (m, t) in enumerate([(54, True), (10_000, True), (54, False)])]  # class-wise, global only, no tail
    s = scored["test"][:, :3].T.copy()
    s[0, :5] = s[0].max() * 3  # beyond every reference: the tail
    c = scored["test_class"].astype(np.int64)
    stacked = CalibratorStack(cals).p_values(s, c)
    for j, cal in enumerate(cals):
        np.testing.assert_array_equal(stacked[j], cal.p_values(s[j], c))
    assert np.all(stacked[0, :5] < 1 / (cals[0].reference_size(c[:5]) + 1))  # extrapolated below the plain minimum
    with pytest.raises(InvalidInput, match="cannot be stacked"):
        CalibratorStack([cals[0], ConformalCalibrator().fit(scored["calib"][:, 0], scored["calib_class"] % 3, 3)])
