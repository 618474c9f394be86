"""Conformal p-values for suspicion scores, their fusion, and thresholds at a target false-positive rate.

Every scorer speaks its own units (a distance, a probability, a pixel count). Calibration turns each score
into a conformal p-value against clean held-out data, fuses the p-values of all scorers into one statistic,
and calibrates that statistic too, so that a threshold means a false-positive rate on clean traffic. No
attack data is needed anywhere.

Recommended use of the clean held-out set (after the scorers were fitted on a separate fit split)::

    cal = {name: ConformalCalibrator().fit(s, predicted, n_classes) for name, s in held_out.items()}
    p_oof = cross_fitted_p_values(held_out, predicted, n_classes, lambda name: ConformalCalibrator())
    fusion = Fusion("fisher")
    threshold = fusion.fit_threshold(fusion.combine(np.column_stack([p_oof[n] for n in names])), fpr=0.01)
    # serving: flag = fusion.combine(p_live) > threshold, p_live from cal

A threshold must be set on p-values computed against references that exclude the input: a p-value of a
reference point against its own reference set is not uniform (it is ranked among a set that contains itself),
so a threshold set on those p-values would be miscalibrated. :func:`cross_fitted_p_values` gives every
held-out input such a p-value (K stratified folds, each ranked against calibrators fitted on the other
folds), so that all of them serve both as references and as threshold inputs. The simpler split (half the
inputs as references, the other half for the threshold, :func:`split_held_out`) has a finite-sample
guarantee, but its 1 % quantile rests on the top ~7 of ~730 statistics: on LeNet-5 (issue 17) one split put
the 1 % threshold of the ``adversarial`` flag at 9.8 while the 99th percentile of 1,932 clean test digits was
4.9 (the split's inputs held 9 statistics above 9, at the test digits' rate about 3), and the flag then
caught 6 % of 8-bit foreground PGD instead of ~60 %. Cross-fitting doubles the references and lets any
held-out input set the threshold; see :func:`cross_fitted_p_values` for what it costs in guarantee.

References
----------
Vovk, Gammerman & Shafer, *Algorithmic Learning in a Random World* (2005): conformal p-values.
Bates, Candes, Lei, Romano & Sesia, "Testing for outliers with conformal p-values", Ann. Statist. (2023).
Fisher, *Statistical Methods for Research Workers* (1925): combining independent p-values.
Vovk, "Cross-conformal predictors", Ann. Math. Artif. Intell. (2015); Barber, Candes, Ramdas & Tibshirani,
"Predictive inference with the jackknife+", Ann. Statist. (2021): cross-fitted conformal inference.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import numba
import numpy as np
from scipy.special import gammaincc, gammaln

from detector.errors import InvalidInput, NotReady

__all__ = ["CalibratorStack", "ConformalCalibrator", "Fusion", "cross_fitted_p_values", "split_held_out",
           "stratified_folds", "FUSION_METHODS"]

#: Fusion rules understood by :class:`Fusion`.
FUSION_METHODS = ("fisher", "min", "harmonic")
#: Smallest group p-value :meth:`Fusion.log_group_p_value` takes from the Gamma tail before its asymptote.
TINY = 1e-300


def _as_classes(classes: np.ndarray, n: int, n_classes: int) -> np.ndarray:
    classes = np.asarray(classes)
    if classes.shape != (n,):
        raise InvalidInput(f"expected classes of shape ({n},) matching the scores, got shape {classes.shape}")
    if classes.dtype.kind not in "iu":
        raise InvalidInput(f"classes must be integers, got dtype {classes.dtype}")
    if n and (classes.min() < 0 or classes.max() >= n_classes):
        raise InvalidInput(f"classes must lie in [0, {n_classes - 1}], got values in [{classes.min()}, {classes.max()}]")
    return classes.astype(np.int64)


def _as_scores(scores: np.ndarray, allow_inf: bool) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1:
        raise InvalidInput(f"expected scores of shape (n_samples,), got shape {s.shape}")
    bad = np.isnan(s) if allow_inf else ~np.isfinite(s)
    if bad.any():
        raise InvalidInput(f"scores must be {'not NaN' if allow_inf else 'finite'}: {int(bad.sum())} of {len(s)} are not")
    return s


@numba.njit(cache=True, nogil=True)
def _p_values(s, c, global_ref, class_values, class_offsets, conditional, tail_max, tail_beta, tail):  # pragma: no cover
    """Conformal p-values (the math is in :class:`ConformalCalibrator`); one compiled loop over the inputs."""
    p = np.empty(s.shape[0])
    for i in range(s.shape[0]):
        k = c[i]
        ref = class_values[class_offsets[k]:class_offsets[k + 1]] if conditional[k] else global_ref
        at_least = ref.shape[0] - np.searchsorted(ref, s[i], side="left")
        p[i] = (1.0 + at_least) / (ref.shape[0] + 1.0)
        if tail and at_least == 0:
            excess = max(s[i] - tail_max[k], 0.0) / tail_beta[k]
            p[i] *= np.exp(-(excess if excess < 700.0 or np.isnan(excess) else 700.0))  # stays > 0 in float64
    return p


class ConformalCalibrator:
    """Conformal p-values of one score against clean held-out references, class-conditional where possible.

    Parameters
    ----------
    min_class_count : int, default 50
        A class with at least this many references is calibrated against its own references (Mondrian /
        class-conditional conformal prediction); smaller classes use the global references. With n
        references the smallest conformal p-value is 1/(n+1), so 50 per class allows p down to ~0.02.
    tail : bool, default True
        Extrapolate beyond the largest reference with an exponential tail (below).
    by_class : bool, default True
        False: every class uses the global references, for a score that already compares an input with its
        predicted class (the trust score). Only :meth:`fit` reads it; a fitted calibrator's ``conditional_``
        says which classes have references of their own.

    Notes
    -----
    For a score s of an input whose (predicted) class is c, with R the sorted references of c (or the
    global ones),

        p(s) = (1 + #{r in R : r >= s}) / (|R| + 1),         p in [1/(|R|+1), 1].

    Higher scores give smaller p-values (p is non-increasing in s). If the reference scores and the new
    clean input's score are exchangeable (same distribution, independent of the fit data), then for every
    a in [0, 1], P(p <= a) <= floor(a (|R|+1)) / (|R|+1) <= a; ties only make p larger. Class-conditional
    references give this guarantee within each class (Vovk 2005, "Mondrian" conformal predictors), which
    keeps a class whose clean scores run high from eating the whole false-positive budget.

    The class used should be the one available at serving time: the **predicted** class.

    Tail extrapolation: a plain conformal p-value cannot go below 1/(|R|+1), so an input far beyond every
    clean reference gets the same p as one just past the largest: with ~135 references, fusing several
    scorers then barely tells a wildly abnormal input from an unlucky clean one. Above the largest
    reference r_max we therefore continue with an exponential tail fitted to the top k = max(5, 10 %) of
    the references (peaks over threshold: u the (k+1)-th largest, beta the mean excess over u),

        p(s) = exp(-(s - r_max) / beta) / (|R| + 1),   s > r_max,

    continuous at r_max and decreasing. The guarantee P(p <= a) <= a is exact for a >= 1/(|R|+1) and
    holds to the accuracy of the tail model below it (tested on clean digits for a = 1/(2(|R|+1))).
    """

    def __init__(self, min_class_count: int = 50, tail: bool = True, by_class: bool = True):
        self.min_class_count = min_class_count
        self.tail = tail
        self.by_class = by_class

    def fit(self, scores: np.ndarray, classes: np.ndarray, n_classes: int) -> "ConformalCalibrator":
        """Store the sorted clean held-out ``scores`` (n,) globally and per class of ``classes`` (n,). Returns self."""
        if not isinstance(self.min_class_count, (int, np.integer)) or self.min_class_count < 1:
            raise InvalidInput(f"min_class_count must be a positive integer, got {self.min_class_count!r}")
        if not isinstance(n_classes, (int, np.integer)) or n_classes < 1:
            raise InvalidInput(f"n_classes must be a positive integer, got {n_classes!r}")
        s = _as_scores(scores, allow_inf=False)
        if len(s) == 0:
            raise InvalidInput("cannot calibrate on zero reference scores")
        c = _as_classes(classes, len(s), n_classes)
        self.global_ = np.sort(s)
        counts = np.bincount(c, minlength=n_classes)
        self.conditional_ = (counts >= self.min_class_count) & bool(self.by_class)
        keep = self.conditional_[c]
        order = np.lexsort((s[keep], c[keep]))  # by class, then by score
        self.class_values_ = s[keep][order]
        self.class_offsets_ = np.concatenate([[0], np.cumsum(np.where(self.conditional_, counts, 0))]).astype(np.int64)
        self._fit_tails()
        return self

    @staticmethod
    def _tail(sorted_ref: np.ndarray) -> tuple[float, float]:
        """(r_max, beta) of the exponential tail of sorted references (see the class notes)."""
        n = len(sorted_ref)
        k = min(max(5, math.ceil(0.1 * n)), n - 1)
        if k < 1:
            return float(sorted_ref[-1]), math.inf
        u = sorted_ref[n - k - 1]
        beta = float(np.mean(sorted_ref[n - k :] - u))
        return float(sorted_ref[-1]), beta if beta > 1e-12 * (abs(u) + 1.0) else math.inf

    def _fit_tails(self) -> None:
        """Tail parameters per class (global ones where the class is not conditional); derived, not stored."""
        r_max, beta = self._tail(self.global_)
        self.tail_max_ = np.full(self.n_classes_, r_max)
        self.tail_beta_ = np.full(self.n_classes_, beta)
        for k in np.flatnonzero(self.conditional_):
            ref = self.class_values_[self.class_offsets_[k]:self.class_offsets_[k + 1]]
            self.tail_max_[k], self.tail_beta_[k] = self._tail(ref)

    @property
    def n_classes_(self) -> int:
        """Number of classes the calibrator was fitted for."""
        return len(self.conditional_)

    def reference_size(self, classes: np.ndarray) -> np.ndarray:
        """Number of references each input is ranked against, ndarray (n,) (the p-value's resolution is 1/(size+1))."""
        self._check_fitted()
        c = np.asarray(classes)
        c = _as_classes(c, c.size, self.n_classes_)
        sizes = np.diff(self.class_offsets_)
        return np.where(self.conditional_[c], sizes[c], len(self.global_))

    def p_values(self, scores: np.ndarray, classes: np.ndarray) -> np.ndarray:
        """Conformal p-value of each score given each input's class, ndarray (n,) in (0, 1]; small = suspicious."""
        self._check_fitted()
        s = _as_scores(scores, allow_inf=True)
        c = _as_classes(classes, len(s), self.n_classes_)
        return _p_values(s, c, self.global_, self.class_values_, self.class_offsets_, self.conditional_,
                         self.tail_max_, self.tail_beta_, bool(self.tail))

    def _check_fitted(self) -> None:
        if not hasattr(self, "global_"):
            raise NotReady("ConformalCalibrator is not fitted: call fit() or load it from a baseline first")

    def get_state(self, prefix: str) -> dict[str, np.ndarray]:
        """Fitted arrays under ``prefix``; the ragged per-class references are flattened with offsets.

        ``class_values[class_offsets[c]:class_offsets[c+1]]`` are the sorted references of class c (empty
        for a class calibrated globally).
        """
        self._check_fitted()
        return {f"{prefix}min_class_count": np.asarray(self.min_class_count, dtype=np.int64),
                f"{prefix}tail": np.asarray(self.tail, dtype=np.bool_),
                f"{prefix}global": self.global_, f"{prefix}conditional": self.conditional_.astype(np.bool_),
                f"{prefix}class_values": self.class_values_, f"{prefix}class_offsets": self.class_offsets_}

    @classmethod
    def from_state(cls, arrays: dict[str, np.ndarray], prefix: str) -> "ConformalCalibrator":
        """Rebuild from :meth:`get_state`'s arrays, checking that they are consistent."""
        cal = cls(int(arrays[f"{prefix}min_class_count"]), bool(arrays.get(f"{prefix}tail", True)))
        cal.global_ = np.asarray(arrays[f"{prefix}global"], dtype=np.float64)
        cal.conditional_ = np.asarray(arrays[f"{prefix}conditional"], dtype=np.bool_)
        cal.class_values_ = np.asarray(arrays[f"{prefix}class_values"], dtype=np.float64)
        cal.class_offsets_ = np.asarray(arrays[f"{prefix}class_offsets"], dtype=np.int64)
        sizes = np.diff(cal.class_offsets_)
        if (cal.global_.ndim != 1 or len(cal.global_) == 0 or len(cal.class_offsets_) != len(cal.conditional_) + 1
                or cal.class_offsets_[0] != 0 or cal.class_offsets_[-1] != len(cal.class_values_) or (sizes < 0).any()
                or (sizes[~cal.conditional_] != 0).any() or (sizes[cal.conditional_] == 0).any()
                or (np.diff(cal.global_) < 0).any()):
            raise InvalidInput(f"inconsistent conformal calibrator arrays under {prefix!r}")
        cal._fit_tails()
        return cal


class CalibratorStack:
    """Fitted calibrators of several scores side by side: the p-values of all of them in one compiled call.

    For the serving path, which would otherwise make one call per score (a numba dispatch and a
    validation each). The calibrators must share their number of classes.

    Parameters
    ----------
    calibrators : sequence of ConformalCalibrator
        Fitted; row j of :meth:`p_values` uses ``calibrators[j]``.
    """

    def __init__(self, calibrators: "list[ConformalCalibrator]"):
        if not calibrators:
            raise InvalidInput("a calibrator stack needs at least one calibrator")
        for cal in calibrators:
            cal._check_fitted()
        n_classes = sorted({cal.n_classes_ for cal in calibrators})
        if len(n_classes) > 1:
            raise InvalidInput(f"calibrators of {n_classes} classes cannot be stacked")
        self.n_classes = n_classes[0]

        def ptr(parts: list[np.ndarray]) -> np.ndarray:
            return np.concatenate([[0], np.cumsum([len(a) for a in parts])]).astype(np.int64)

        globals_, values = [cal.global_ for cal in calibrators], [cal.class_values_ for cal in calibrators]
        self._arrays = (
            np.concatenate(globals_), ptr(globals_), np.concatenate(values), ptr(values),
            np.stack([cal.class_offsets_ for cal in calibrators]), np.stack([cal.conditional_ for cal in calibrators]),
            np.stack([cal.tail_max_ for cal in calibrators]), np.stack([cal.tail_beta_ for cal in calibrators]),
            np.array([bool(cal.tail) for cal in calibrators], dtype=np.bool_),
        )

    def p_values(self, scores: np.ndarray, classes: np.ndarray) -> np.ndarray:
        """p-values (n_calibrators, n) of float64 ``scores`` (n_calibrators, n) without NaN, for int64 ``classes``
        (n,) in [0, n_classes): unchecked (the caller checks), each row as its calibrator's :meth:`~ConformalCalibrator.p_values`."""
        return _stacked_p_values(scores, classes, *self._arrays)


@numba.njit(cache=True, nogil=True)
def _stacked_p_values(scores, c, globals_, global_ptr, values, value_ptr, offsets, conditional, tail_max, tail_beta,
                      tail):  # pragma: no cover (compiled)
    out = np.empty_like(scores)
    for j in range(scores.shape[0]):
        out[j] = _p_values(scores[j], c, globals_[global_ptr[j]:global_ptr[j + 1]],
                           values[value_ptr[j]:value_ptr[j + 1]], offsets[j], conditional[j], tail_max[j],
                           tail_beta[j], tail[j])
    return out


class Fusion:
    """Combine the p-values of several scorers into one statistic; higher = more suspicious.

    Parameters
    ----------
    method : {"fisher", "min", "harmonic"}, default "fisher"
        With p_1..p_k an input's p-values:

        - ``"fisher"``: T = -2 sum_j log p_j (Fisher 1925). Powerful when several scorers move moderately.
        - ``"min"``: T = -log min_j p_j (Tippett / Bonferroni). Powerful when one scorer moves a lot and the
          others not at all.
        - ``"harmonic"``: T = (1/k) sum_j 1/p_j, the reciprocal of the harmonic mean p-value (Wilson, PNAS
          2019): between the two, dominated by the smallest p-values, and robust to dependence.

        (The mean of -log p is Fisher divided by 2k: the same ranking, so it is not offered.)
    weights : sequence of float, optional
        Weighted Fisher, ``T = -2 sum_j w_j log p_j`` (``method="fisher"`` only): the weights
        :func:`detector.fusion_choice.choose_fusion` may choose on calibration data. Default: all 1.
    screen_share : float in (0, 1), optional
        The last column is a *screen*, a score OR-ed with the fused group by weighted Bonferroni (Tippett) instead
        of joining it. With s the share, P(T) the group's combined p-value and p_s the screen's p-value, the
        statistic is ``-log min(P(T) / (1 - s), p_s / s)``: the screen spends about a share s of the false-positive
        rate, the group the rest, and neither dilutes the other. P(T) is the group's p-value under independence:
        Fisher, the upper tail of a Gamma(a, 1) at T / 2 with a = sum_j w_j (the chi-square(2k) tail when
        unweighted; the weighted sum has the same mean); min, Bonferroni's min(1, k e^-T); harmonic, the harmonic
        mean p-value min(1, 1 / T). The members are correlated, so P(T) is not a calibrated p-value; it only puts
        the group on the screen's scale. The threshold on the statistic is calibrated empirically, as always.

    Notes
    -----
    Default rule and why: Fisher, thresholded at a false-positive rate calibrated on clean held-out data.
    Fisher is the default because an adversarial input is expected to move several scorers a little (the
    topology, the introspection error and the softmax confidence read the same activations) rather than one
    scorer a lot; "min" is the choice when a single scorer is known to carry the signal. Measured on the
    digits CNN (peers fitted on the training digits, p-values against the calibration digits, noise sigma =
    0.3 vs clean test digits, AUROC fisher / min / harmonic): max-softmax + Mahalanobis + k-NN, which all
    move moderately, 0.767 / 0.745 / 0.757; adding a Mahalanobis scorer on the first ReLU, which alone
    carries the noise (0.989), 0.923 / 0.968 / 0.956. Revisit the default with the full scorer set and
    real attacks.

    Under independence and uniform p-values, Fisher's T follows chi2(2k). Our scorers read the same
    activations and are correlated, which makes the chi-square tail far too light (a correlated pair of
    small p-values counts twice): thresholds taken from chi2 would give far more false positives than
    asked for (the three digits peers, -log p correlated 0.38-0.64: 5.3 % of clean test digits above the
    chi2(6) 99 % quantile, 10.3 % above its 95 % quantile). The threshold is therefore calibrated empirically (:meth:`fit_threshold`) on clean held-out
    inputs whose p-values were computed against *other* clean references (:func:`cross_fitted_p_values`); this
    holds whatever the dependence between scorers, because it only needs exchangeability of clean
    inputs. No attack data is needed.
    """

    def __init__(self, method: str = "fisher", weights: Sequence[float] | None = None,
                 screen_share: float | None = None):
        self.method = method
        self.weights = None if weights is None else np.asarray(weights, dtype=np.float64)
        if self.weights is not None and (method != "fisher" or self.weights.ndim != 1 or (self.weights < 0).any()):
            raise InvalidInput(f"weights need method 'fisher' and non-negative values, got {method!r} and {weights!r}")
        if screen_share is not None and not 0 < screen_share < 1:
            raise InvalidInput(f"screen_share must lie in (0, 1), got {screen_share!r}")
        self.screen_share = screen_share

    def combine(self, p_values: np.ndarray) -> np.ndarray:
        """Fused statistic of p-values (n_samples, n_scorers) in (0, 1], ndarray (n_samples,); higher = more suspicious."""
        if self.method not in FUSION_METHODS:
            raise InvalidInput(f"fusion method must be one of {FUSION_METHODS}, got {self.method!r}")
        p = np.asarray(p_values, dtype=np.float64)
        if p.ndim == 1:
            p = p[:, None]
        if p.ndim != 2 or p.shape[1] == 0:
            raise InvalidInput(f"expected p-values of shape (n_samples, n_scorers) with n_scorers >= 1, got {p.shape}")
        if not ((p > 0) & (p <= 1)).all():
            raise InvalidInput("p-values must lie in (0, 1] (conformal p-values never reach 0)")
        group = p.shape[1] - (self.screen_share is not None)
        if group == 0:
            raise InvalidInput("a screened fusion needs at least one p-value besides the screen's (the last column)")
        if self.weights is not None and len(self.weights) != group:
            raise InvalidInput(f"{len(self.weights)} weights for {group} p-values")
        return self._combine(p)

    def _combine(self, p: np.ndarray) -> np.ndarray:
        """:meth:`combine` of a float64 array (n_samples, n_scorers) of valid p-values, unchecked."""
        if self.screen_share is None:
            return self._group(p)
        s = self.screen_share
        log_group_p = self.log_group_p_value(self._group(p[:, :-1]), p.shape[1] - 1)
        return np.maximum(math.log1p(-s) - log_group_p, math.log(s) - np.log(p[:, -1]))

    def log_group_p_value(self, statistic: np.ndarray, k: int) -> np.ndarray:
        """log P(T) of ``screen_share``: the p-value of a group statistic T of k members under independence.

        Fisher's Gamma tail Q(a, x), x = T / 2, underflows for x > ~700 (conformal p-values extrapolated past
        the largest reference score get that small); there its leading term x^(a-1) e^-x / Gamma(a) is used
        (relative error about (a - 1) / x, under 1 %)."""
        if self.method == "fisher":
            a = k if self.weights is None else float(self.weights.sum())
            x = statistic / 2.0
            q = gammaincc(a, x)  # the asymptote's branch is taken only where x > 700: the clip is never read
            return np.where(q > TINY, np.log(np.maximum(q, TINY)), (a - 1.0) * np.log(np.maximum(x, 1.0)) - x - gammaln(a))
        if self.method == "min":
            return np.minimum(0.0, math.log(k) - statistic)
        return np.minimum(0.0, -np.log(statistic))

    def _group(self, p: np.ndarray) -> np.ndarray:
        if self.method == "fisher":
            logs = np.log(p) if self.weights is None else np.log(p) * self.weights
            return -2.0 * logs.sum(axis=1)
        if self.method == "min":
            return -np.log(p.min(axis=1))
        return (1.0 / p).mean(axis=1)

    @staticmethod
    def fit_threshold(fused_clean: np.ndarray, fpr: float) -> float:
        """Threshold t on a fused statistic such that flagging ``fused > t`` has false-positive rate <= ``fpr``.

        Parameters
        ----------
        fused_clean : ndarray of shape (n,)
            Fused statistic of clean held-out inputs not used as p-value references.
        fpr : float in (0, 1)
            Target false-positive rate a.

        Returns
        -------
        float
            The k-th smallest of the n clean values, k = ceil((n+1)(1-a)) (the conformal quantile). For a new
            exchangeable clean input, P(fused > t) <= (n+1-k)/(n+1) <= a; on ``fused_clean`` itself at most
            n-k < n a values exceed t, so the empirical FPR is < a as well. Ties only lower the rate.

        Raises
        ------
        InvalidInput
            ``fpr`` outside (0, 1), or too few clean values: k <= n needs n >= (1-a)/a (99 for 1 %).
        """
        fused = _as_scores(fused_clean, allow_inf=False)
        if not 0.0 < fpr < 1.0:
            raise InvalidInput(f"fpr must lie in (0, 1), got {fpr!r}")
        n = len(fused)
        k = math.ceil((n + 1) * (1.0 - fpr) - 1e-9)  # the tolerance keeps an exact product from rounding up
        if k > n:
            raise InvalidInput(f"a threshold at false-positive rate {fpr} needs at least {math.ceil((1 - fpr) / fpr - 1e-9)} "
                               f"clean held-out values, got {n}")
        return float(np.partition(fused, k - 1)[k - 1])


def split_held_out(classes: np.ndarray, fraction: float = 0.5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split clean held-out inputs into p-value references and threshold-setting inputs, stratified by class.

    Parameters
    ----------
    classes : ndarray of shape (n,), int
        The **predicted** class of each held-out input (what the calibrator conditions on).
    fraction : float in (0, 1), default 0.5
        Share of each class that goes to the references (rounded; each part keeps >= 1 input of a class with
        >= 2 inputs).
    seed : int, default 0
        Seed of ``numpy.random.default_rng``: the same classes and seed give the same split on every machine.

    Returns
    -------
    reference, threshold : ndarray of int64
        Sorted, disjoint row indices that together cover 0..n-1.
    """
    c = np.asarray(classes)
    if c.ndim != 1 or c.dtype.kind not in "iu":
        raise InvalidInput(f"classes must be a 1-D integer array, got shape {c.shape} and dtype {c.dtype}")
    if not 0.0 < fraction < 1.0:
        raise InvalidInput(f"fraction must lie in (0, 1), got {fraction!r}")
    rng = np.random.default_rng(seed)
    reference, threshold = [], []
    for k in np.unique(c):
        idx = rng.permutation(np.flatnonzero(c == k))
        n_ref = int(round(len(idx) * fraction))
        if len(idx) >= 2:
            n_ref = min(max(n_ref, 1), len(idx) - 1)
        reference.append(idx[:n_ref])
        threshold.append(idx[n_ref:])
    return (np.sort(np.concatenate(reference)).astype(np.int64) if reference else np.zeros(0, np.int64),
            np.sort(np.concatenate(threshold)).astype(np.int64) if threshold else np.zeros(0, np.int64))


def stratified_folds(classes: np.ndarray, folds: int, seed: int = 0) -> np.ndarray:
    """Fold index in [0, ``folds``) of each input, ndarray (n,) int64: each class's inputs, in a seeded random
    order, are dealt to the folds in turn, so every fold holds about 1/``folds`` of every class."""
    c = np.asarray(classes)
    if c.ndim != 1 or c.dtype.kind not in "iu":
        raise InvalidInput(f"classes must be a 1-D integer array, got shape {c.shape} and dtype {c.dtype}")
    if not isinstance(folds, (int, np.integer)) or folds < 2:
        raise InvalidInput(f"folds must be an integer >= 2, got {folds!r}")
    rng = np.random.default_rng(seed)
    fold = np.empty(len(c), dtype=np.int64)
    for k in np.unique(c):
        idx = rng.permutation(np.flatnonzero(c == k))
        fold[idx] = np.arange(len(idx)) % folds
    return fold


def cross_fitted_p_values(scores: Mapping[str, np.ndarray], classes: np.ndarray, n_classes: int,
                          calibrator: Callable[[str], ConformalCalibrator], folds: int = 10,
                          seed: int = 0) -> dict[str, np.ndarray]:
    """Out-of-fold conformal p-values of clean held-out inputs, per score.

    Parameters
    ----------
    scores : dict of str to ndarray (n,)
        Each score of the n held-out inputs.
    classes : ndarray (n,) of int
        Their predicted classes.
    n_classes : int
    calibrator : callable
        ``calibrator(name)`` gives an unfitted :class:`ConformalCalibrator` for score ``name``.
    folds : int, default 10
        K: the inputs are dealt to K stratified folds (:func:`stratified_folds`); the p-value of an input in
        fold k is its rank among the inputs of the other K - 1 folds, by a calibrator fitted on them.
    seed : int, default 0

    Returns
    -------
    dict of str to ndarray (n,)
        The p-values, in the order of the inputs.

    Notes
    -----
    The thresholds set on these p-values serve calibrators fitted on all n inputs: a new input is ranked
    among n references where a held-out one was ranked among (K - 1) n / K. This is cross-conformal
    inference (Vovk 2015) with the final calibrator refitted on everything, as in K-fold cross-validation:
    each out-of-fold statistic is exchangeable with a new clean input's statistic under the calibrators of
    its fold, not exactly under the refitted ones, so the split-conformal guarantee P(flag) <= a becomes an
    approximation whose error shrinks with K (the references differ by n / K inputs). What it buys is
    resolution: all n inputs are references (p-values down to 1/(n_c + 1) per class instead of
    1/(n_c / 2 + 1)) and any of them may set the threshold (``calibrate`` uses three quarters, 1.5 times the
    split's threshold inputs), lowering the variance of a 1 % quantile that rests on the largest 1 % of the
    statistics. Measured on clean evaluation digits the model gets right
    (``bench/quality.py``, "served flag ... (clean)"; ``calibrate``'s threshold inputs are three quarters of
    its held-out inputs): LeNet-5 (1,125 threshold inputs) 0.6 % at a target of 1 % and 4.1 % at 5 %; the
    digits CNN (199) 0.3 % and 3.4 %.
    """
    c = np.asarray(classes)
    fold = stratified_folds(c, folds, seed)
    out = {name: np.empty(len(s)) for name, s in scores.items()}
    for k in range(folds):
        test = fold == k
        if not test.any():
            continue
        for name, s in scores.items():
            cal = calibrator(name).fit(s[~test], c[~test], n_classes)
            out[name][test] = cal.p_values(s[test], c[test])
    return out
