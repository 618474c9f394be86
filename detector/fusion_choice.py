"""Choosing a flag's fused statistic on calibration data: members, method and weights, and why.

Fisher fusion of every p-value dilutes a strong member with weak ones (issue 17: four members, two weak,
scored below the best of them). :func:`choose_fusion` instead tries, on clean held-out p-values and on the
p-values of positives that calibration makes itself (attacks on its own split, or the model's own errors):

- ``fisher`` and ``min`` (Tippett/Bonferroni) over every subset of up to ``max_members`` candidate scores;
- ``weighted_fisher`` over all candidates, ``T = -2 sum_j w_j log p_j`` with w the non-negative coefficients
  of a logistic regression of positive vs clean on ``-log p`` (scored by 2-fold cross-validation, so that it
  is not favoured by fitting and judging on the same inputs);

and keeps the one with the best AUROC over the positive sets by ``criterion``: ``"worst"`` (default) keeps
the candidates whose lowest AUROC over the sets is within :data:`WORST_TOLERANCE` of the best lowest and takes
the highest mean among them; ``"mean"`` takes the highest mean (ties: the lowest AUROC, then higher mean TPR
at 5 % FPR, then fewer members). Positive sets of different attack families (a high-confidence one
such as FGSM, a minimum-perturbation one such as DeepFool) see different members at their best: the mean lets
an easy set's 0.99 buy a hard set's loss, the worst case does not, so a statistic chosen by it holds on every
family it was tuned on. With member ``costs`` (the squeezed copies of the input a score needs, each a
full model pass), a cheaper candidate whose mean AUROC is within one standard error of the chosen one's
replaces it (the one-standard-error rule of Breiman et al. 1984): on the random-weight ViT-tiny of
``bench/scale.py``, Fisher over induced persistence and feature squeezing (0.972) against induced
persistence alone (0.971), 125 positives a set, standard error 0.008; the squeezed copies nearly tripled
the served cost. The result says what was chosen, the tuning AUROCs, and the runner-up families, for
the manifest.

References: Hanley & McNeil, "The meaning and use of the area under a ROC curve", Radiology (1982): the
AUROC's standard error. Breiman, Friedman, Olshen & Stone, *Classification and Regression Trees* (1984):
the one-standard-error rule.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Literal, Mapping, Sequence

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score, roc_curve
from sklearn.model_selection import StratifiedKFold

from detector.conformal import Fusion
from detector.errors import InvalidInput

__all__ = ["CRITERIA", "FusionChoice", "WORST_TOLERANCE", "auroc_standard_error", "choose_fusion", "logistic_weights"]

#: How the tuning AUROCs of several positive sets rank a candidate: their minimum or their mean.
CRITERIA = ("worst", "mean")
#: With ``criterion="worst"``, candidates whose lowest AUROC is within this of the best lowest are ranked by
#: their mean: a gain on the hardest set smaller than the AUROC's noise (a few hundred positives) must not
#: buy a loss on the others.
WORST_TOLERANCE = 0.01


@dataclass(frozen=True)
class FusionChoice:
    """A chosen fused statistic.

    Attributes
    ----------
    scores : list of str
        Member scores.
    method : {"fisher", "min"}
        The fusion (:class:`~detector.conformal.Fusion`); ``weights`` make Fisher weighted.
    weights : list of float or None
        Per-member weights (> 0) of a weighted Fisher fusion (None: unweighted).
    auroc : dict of str to float
        Tuning AUROC per positive set.
    tpr_at_5 : dict of str to float
        Tuning TPR at 5 % FPR per positive set.
    alternatives : dict of str to float
        Best tuning AUROC of each family tried (``fisher``, ``min``, ``weighted_fisher``, ``default``): its
        highest lowest AUROC over the sets (``criterion="worst"``) or its highest mean.
    criterion : {"worst", "mean"}
        How the positive sets' AUROCs were ranked (:data:`CRITERIA`).
    cheaper_than : str or None
        The better but costlier candidate this one replaced by the one-standard-error rule, described.
    """

    scores: list[str]
    method: str
    weights: list[float] | None
    auroc: dict[str, float]
    tpr_at_5: dict[str, float]
    alternatives: dict[str, float] = field(default_factory=dict)
    criterion: str = "worst"
    cheaper_than: str | None = None

    def reason(self) -> str:
        """One sentence for the manifest: what was chosen, on what, and against what."""
        tuned = ", ".join(f"{k} {v:.3f}" for k, v in self.auroc.items())
        others = ", ".join(f"{k} {v:.3f}" for k, v in self.alternatives.items())
        rank = (f"highest mean AUROC, lowest within {WORST_TOLERANCE} of the best lowest,"
                if self.criterion == "worst" and len(self.auroc) > 1 else "highest mean AUROC")
        cheaper = f"; {self.cheaper_than}" if self.cheaper_than else ""
        return f"{rank} on calibration-split positives ({tuned}){cheaper}; best of each family: {others}"


def _tpr_at(neg: np.ndarray, pos: np.ndarray, fpr: float) -> float:
    f, t, _ = roc_curve(np.r_[np.zeros(len(neg)), np.ones(len(pos))], np.r_[neg, pos])
    return float(t[f <= fpr + 1e-12].max())


def _judge(clean: np.ndarray, positives: Mapping[str, np.ndarray]) -> tuple[dict[str, float], dict[str, float]]:
    auroc, tpr = {}, {}
    for name, pos in positives.items():
        auroc[name] = float(roc_auc_score(np.r_[np.zeros(len(clean)), np.ones(len(pos))], np.r_[clean, pos]))
        tpr[name] = _tpr_at(clean, pos, 0.05)
    return auroc, tpr


def auroc_standard_error(auroc: float, n_negative: int, n_positive: int) -> float:
    """Standard error of an AUROC A from n0 negatives and n1 positives (Hanley & McNeil 1982):

        SE^2 = (A (1 - A) + (n1 - 1)(Q1 - A^2) + (n0 - 1)(Q2 - A^2)) / (n0 n1),  Q1 = A / (2 - A),  Q2 = 2 A^2 / (1 + A).
    """
    a = auroc
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    var = (a * (1 - a) + (n_positive - 1) * (q1 - a * a) + (n_negative - 1) * (q2 - a * a)) / (n_negative * n_positive)
    return float(np.sqrt(max(var, 0.0)))


def logistic_weights(clean: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """Non-negative weights of ``-log p`` columns from a balanced logistic regression, scaled to sum to 1.

    ``clean`` (n0, k) and ``positive`` (n1, k) hold p-values. Returns ndarray (k,); all-zero coefficients
    give equal weights (plain Fisher).
    """
    x = -np.log(np.r_[clean, positive])
    y = np.r_[np.zeros(len(clean)), np.ones(len(positive))]
    coef = LogisticRegression(class_weight="balanced", max_iter=1000).fit(x, y).coef_[0]
    w = np.clip(coef, 0.0, None)
    return w / w.sum() if w.sum() > 0 else np.full(len(w), 1.0 / len(w))


def _cross_validated_weighted_fisher(clean: np.ndarray, positives: Mapping[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """Out-of-fold weighted-Fisher statistics of clean and of each positive set (2 folds, weights per fold)."""
    pos_all = np.concatenate(list(positives.values()))
    owner = np.concatenate([np.full(len(v), i) for i, v in enumerate(positives.values())])
    x = np.r_[clean, pos_all]
    y = np.r_[np.zeros(len(clean)), np.ones(len(pos_all))]
    out = np.empty(len(x))
    for train, test in StratifiedKFold(2, shuffle=True, random_state=seed).split(x, y):
        w = logistic_weights(x[train][y[train] == 0], x[train][y[train] == 1])
        out[test] = -2.0 * (np.log(x[test]) * w).sum(axis=1)
    stats = {"clean": out[: len(clean)]}
    for i, name in enumerate(positives):
        stats[name] = out[len(clean):][owner == i]
    return stats


def choose_fusion(clean: Mapping[str, np.ndarray], positives: Mapping[str, Mapping[str, np.ndarray]],
                  candidates: Sequence[str], default: Sequence[str], max_members: int = 3,
                  seed: int = 0, criterion: Literal["worst", "mean"] = "worst",
                  costs: Mapping[str, float] | None = None, max_cost: float | None = None) -> FusionChoice:
    """Choose the fused statistic with the best AUROC of ``positives`` against ``clean`` (by ``criterion``).

    Parameters
    ----------
    clean : dict of str to ndarray (n0,)
        Conformal p-values of clean held-out inputs, per score.
    positives : dict of str to (dict of str to ndarray)
        Per positive set (e.g. an attack calibration made), p-values per score; sets may differ in size.
    candidates : sequence of str
        Scores that may be members.
    default : sequence of str
        The default member set (plain Fisher), reported among the alternatives.
    max_members : int, default 3
        Largest subset tried for ``fisher`` and ``min``.
    seed : int, default 0
        Seed of the cross-validation folds.
    criterion : {"worst", "mean"}, default "worst"
        ``"worst"``: among the candidates whose lowest AUROC over the positive sets is within
        :data:`WORST_TOLERANCE` of the best lowest, the highest mean; ``"mean"``: the highest mean. The same
        with a single set.
    costs : dict of str to float, optional
        Serving cost of each score (missing: 0); a candidate costs the sum over its members. When given,
        the cheapest candidate among those eligible whose mean AUROC is within one standard error of the
        chosen one's is taken instead (the best mean among equally cheap ones); the standard error of a mean
        over S sets is sqrt(sum_s SE_s^2) / S with SE_s from :func:`auroc_standard_error`.
    max_cost : float, optional
        A hard budget: candidates costing more (by ``costs``) are not considered at all, whatever they buy.
        Default: none.
    """
    if criterion not in CRITERIA:
        raise InvalidInput(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    if not positives or any(len(next(iter(p.values()))) == 0 for p in positives.values()):
        raise InvalidInput("choose_fusion needs at least one non-empty set of positives")
    names = list(dict.fromkeys(candidates))

    def table(p: Mapping[str, np.ndarray], members: Sequence[str]) -> np.ndarray:
        return np.stack([p[m] for m in members], axis=1)

    tried: list[tuple[str, float, float, float, int, FusionChoice]] = []  # family, worst, mean, tpr, -members

    def consider(family: str, members: list[str], method: str, weights: list[float] | None,
                 neg: np.ndarray, pos: dict[str, np.ndarray]) -> None:
        auroc, tpr = _judge(neg, pos)
        tried.append((family, min(auroc.values()), float(np.mean(list(auroc.values()))),
                      float(np.mean(list(tpr.values()))), -len(members),
                      FusionChoice(members, method, weights, auroc, tpr, criterion=criterion)))

    for size in range(1, max_members + 1):
        for members in itertools.combinations(names, size):
            for method in ("fisher", "min"):
                fusion = Fusion(method)
                consider(method, list(members), method, None, fusion._combine(table(clean, members)),
                         {k: fusion._combine(table(v, members)) for k, v in positives.items()})
    consider("default", list(default), "fisher", None, Fusion("fisher")._combine(table(clean, default)),
             {k: Fusion("fisher")._combine(table(v, default)) for k, v in positives.items()})
    cv = _cross_validated_weighted_fisher(table(clean, names), {k: table(v, names) for k, v in positives.items()}, seed)
    weights = logistic_weights(table(clean, names), np.concatenate([table(v, names) for v in positives.values()]))
    kept = weights > 0  # members the regression gave no weight are dropped
    consider("weighted_fisher", [n for n, k in zip(names, kept) if k], "fisher", [float(w) for w in weights[kept]],
             cv["clean"], {k: cv[k] for k in positives})
    cost = lambda c: sum((costs or {}).get(m, 0.0) for m in c.scores)  # noqa: E731
    if max_cost is not None:
        tried = [t for t in tried if cost(t[5]) <= max_cost]
        if not tried:
            raise InvalidInput(f"no candidate costs at most {max_cost:g}; raise the budget or add cheaper candidates")
    primary = 1 if criterion == "worst" else 2
    if criterion == "worst":  # the best mean among those whose lowest AUROC is near the best lowest
        floor = max(t[1] for t in tried) - WORST_TOLERANCE
        eligible = [t for t in tried if t[1] >= floor]
    else:
        eligible = tried
    rank = lambda t: (t[2], t[1], t[3], t[4])  # noqa: E731
    chosen = max(eligible, key=rank)[5]
    cheaper_than = None
    if costs:
        sizes = {k: len(next(iter(v.values()))) for k, v in positives.items()}
        n0 = len(next(iter(clean.values())))
        se = float(np.sqrt(sum(auroc_standard_error(a, n0, sizes[k]) ** 2 for k, a in chosen.auroc.items()))) / len(sizes)
        best_mean = float(np.mean(list(chosen.auroc.values())))
        near = [t for t in eligible if t[2] >= best_mean - se]
        cheapest = min(cost(t[5]) for t in near)
        if cheapest < cost(chosen):
            costly = chosen
            chosen = max((t for t in near if cost(t[5]) == cheapest), key=rank)[5]
            cheaper_than = (f"cheaper (cost {cheapest:g}) than {costly.method} over {', '.join(costly.scores)} "
                            f"(mean {best_mean:.3f}, cost {cost(costly):g}), within one standard error ({se:.3f})")
    alternatives = {f: round(max(t[primary] for t in tried if t[0] == f), 4) for f in dict.fromkeys(t[0] for t in tried)}
    return FusionChoice(chosen.scores, chosen.method, chosen.weights, chosen.auroc, chosen.tpr_at_5, alternatives,
                        criterion, cheaper_than)
