"""Fusion ablation (issue 17): which fused statistic, on the p-values of the last ``bench/quality.py`` run.

Reads ``build/bench/quality-<model>/p_values.npz`` (every score's conformal p-value for the clean negatives
and the successful 8-bit adversarial examples of each attack) and the baseline's manifest, and writes
``bench/results/fusion-ablation-<model>.md``: AUROC and TPR at 5 % FPR per attack for

- ``chosen``: the rule calibration chose on its own split (manifest), the one the service uses; then the same
  rule without its screen, or, for a baseline made before screens, with the default one (``CalibrationConfig``'s
  ``adversarial_screen`` and ``screen_share``: a deterministic function of the same p-values, so what
  calibrating again would give; the screen is fixed beforehand, not chosen); then the chosen fusion OR the
  screen at the larger shares :data:`SHARES` (what a larger share buys without an attacker; the adaptive
  attacks measure what it costs);
- ``fisher_default``: Fisher over the four default members (induced persistence, Betti density,
  introspection reconstruction, max-softmax), no attack data;
- ``fisher_all`` / ``min_all``: Fisher / minimum p (Tippett) over every candidate score;
- ``fisher_persistence_squeezing``: Fisher over induced persistence and feature squeezing, the pair the
  design notes found complementary (fixed beforehand, not tuned);
- ``weighted_fisher_lr``: Fisher weighted by a logistic regression fitted on this run's rows of the tuning
  attack types (:attr:`~detector.calibration.CalibrationConfig.tuning_attacks`; those rows are then in-sample);
- the best single score of the row, and the best Fisher fusion of up to three candidates, for reference (both
  chosen on the row itself: oracles, not detectors; the second bounds what any choice of members could reach).

Run: ``.venv/bin/python bench/fusion_ablation.py [MODEL ...]`` (default: digits_cnn lenet5) after
``bench/quality.py MODEL``.
"""

from __future__ import annotations

import itertools
import sys

import numpy as np

from common import RESULTS, ROOT, write_result  # noqa: E402  (puts ROOT on sys.path)

from detector.baseline import read_baseline  # noqa: E402
from detector.calibration import ADVERSARIAL_CANDIDATES, ADVERSARIAL_SCORES, CalibrationConfig  # noqa: E402
from detector.conformal import Fusion  # noqa: E402
from detector.fusion_choice import logistic_weights  # noqa: E402
from detector.offline.evaluate import tpr_at_fpr  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

WORK = ROOT / "build" / "bench"
TUNING = CalibrationConfig().tuning_attacks
#: Screen shares shown beside the default one.
SHARES = (0.2, 0.5, 0.7)


def _load(model: str) -> dict[str, tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
    out: dict[str, tuple[dict, dict]] = {}
    with np.load(WORK / f"quality-{model}" / "p_values.npz", allow_pickle=False) as npz:
        for key in npz.files:
            attack, side, score = key.split("|")
            out.setdefault(attack, ({}, {}))[side == "positive"][score] = npz[key]
    return out


def _stack(p: dict[str, np.ndarray], members: list[str]) -> np.ndarray:
    return np.stack([p[m] for m in members], axis=1)


def run(model: str) -> None:
    data = _load(model)
    manifest = read_baseline(WORK / f"quality-{model}" / "baseline")[0]
    rule = next(r for r in manifest.flags if r.name == "adversarial")
    names = list(ADVERSARIAL_CANDIDATES)
    tuning = [a for a in TUNING if a in data]
    weights = logistic_weights(np.concatenate([_stack(data[a][0], names) for a in tuning]),
                               np.concatenate([_stack(data[a][1], names) for a in tuning]))
    config = CalibrationConfig()
    screen = rule.screen or config.adversarial_screen
    other = (rule.model_copy(update={"screen": None, "screen_share": None}) if rule.screen else
             rule.model_copy(update={"screen": screen, "screen_share": config.screen_share}))
    variants = {
        "chosen": (rule.members, rule.fusion_op()),
        f"chosen {'without its screen' if rule.screen else 'with the default screen'}": (other.members, other.fusion_op()),
        **{f"chosen OR screen {screen} at share {share}":
           (rule.scores + [screen], Fusion(rule.fusion, rule.weights, share)) for share in SHARES},
        "fisher_default": (list(ADVERSARIAL_SCORES), Fusion("fisher")),
        "fisher_all": (names, Fusion("fisher")),
        "min_all": (names, Fusion("min")),
        "fisher_persistence_squeezing": (["induced_persistence", "feature_squeezing"], Fusion("fisher")),
        "weighted_fisher_lr": (names, Fusion("fisher", weights)),
    }
    attacks = [a for a in data if a not in ("misclassified", "noise")]
    lines = [f"# Fusion ablation: {model}", "",
             "AUROC / TPR at 5 % FPR of the `adversarial` statistic, on the p-values of the last "
             "`bench/quality.py` run (8-bit attacks, successful examples only, clean negatives the model got right). "
             f"Chosen rule: {rule.describe()}; {rule.selection}. `weighted_fisher_lr` weights (fitted on this run's {', '.join(tuning)} rows): "
             + ", ".join(f"{n} {w:.3f}" for n, w in zip(names, weights) if w > 0) + ".", "",
             "Rows " + ", ".join(f"`{a}`" for a in tuning) + " are the tuning attack types (in-sample for `chosen` "
             "and `weighted_fisher_lr`); `best single p-value` (one score's conformal p-value) and `best Fisher of <= 3 "
             "candidates` are chosen on each row itself: oracles for reference, the second an upper bound for any "
             "choice of members.", "",
             "| variant | " + " | ".join(attacks) + " |", "|---|" + "---|" * len(attacks)]
    for variant, (members, fusion) in variants.items():
        cells = []
        for a in attacks:
            neg, pos = fusion.combine(_stack(data[a][0], members)), fusion.combine(_stack(data[a][1], members))
            auroc = roc_auc_score(np.r_[np.zeros(len(neg)), np.ones(len(pos))], np.r_[neg, pos])
            cells.append(f"{auroc:.3f} / {tpr_at_fpr(neg, pos, 0.05):.2f}")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    best, best_fisher = [], []
    fisher = Fusion("fisher")
    for a in attacks:
        neg, pos = data[a]
        y = np.r_[np.zeros(len(neg[names[0]])), np.ones(len(pos[names[0]]))]
        aurocs = {n: roc_auc_score(y, -np.log(np.r_[neg[n], pos[n]])) for n in names}
        top = max(aurocs, key=aurocs.__getitem__)
        best.append(f"{top} {aurocs[top]:.3f}")
        fused = {m: roc_auc_score(y, np.r_[fisher.combine(_stack(neg, list(m))), fisher.combine(_stack(pos, list(m)))])
                 for r in (1, 2, 3) for m in itertools.combinations(names, r)}
        top_set = max(fused, key=fused.__getitem__)
        best_fisher.append(f"{' + '.join(top_set)} {fused[top_set]:.3f}")
    lines.append("| best single p-value (oracle) | " + " | ".join(best) + " |")
    lines.append("| best Fisher of <= 3 candidates (oracle) | " + " | ".join(best_fisher) + " |")
    write_result(f"fusion-ablation-{model}.md", lines)


if __name__ == "__main__":
    for name in sys.argv[1:] or ["digits_cnn", "lenet5"]:
        if (RESULTS.parent.parent / "build" / "bench" / f"quality-{name}" / "p_values.npz").is_file():
            run(name)
        else:
            sys.exit(f"bench/fusion_ablation.py: run bench/quality.py {name} first")
