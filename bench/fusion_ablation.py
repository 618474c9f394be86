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
  chosen on the row itself: oracles, not detectors; the second bounds what any choice of members could reach);
- ``best rule for the worst margin (oracle)``: one fixed rule for every row, searched over Fisher fusions of up
  to three candidates, each alone or OR a screen (patch PCA, max-softmax or the trust score at a share of
  :data:`ORACLE_SHARES`), for the largest worst margin to the best peer over the rows the fusion was not tuned
  on. It is chosen on those rows themselves, so it bounds from above what calibration could choose in that
  family: a negative worst margin means no rule in it is at least the best peer on every attack;
- the best peer of each row (raw score, ``bench/results/quality-<model>.json``), the bar of issue 17.

A second table gives, for the fused statistic and each peer (raw score), the worst and the mean AUROC over the
attacks the fusion was not tuned on: the bar a detector must clear when the attacker picks the attack. A third
gives what the service flags at the thresholds calibration fixed, per target FPR: the
``adversarial`` flag alone (the quality table's "served" column) and either flag, ``adversarial`` or
``likely_misclassified`` at the same target, which is what a client that routes any flagged input to review sees.
Minimum-perturbation attacks leave the input near the decision boundary, where ``likely_misclassified`` looks.

Run: ``.venv/bin/python bench/fusion_ablation.py [MODEL ...]`` (default: digits_cnn lenet5) after
``bench/quality.py MODEL`` (about a minute per model on this machine, most of it the oracle's ~2,300 rules).
"""

from __future__ import annotations

import itertools
import json
import sys

import numpy as np

from common import RESULTS, ROOT, write_result  # noqa: E402  (puts ROOT on sys.path)
from quality import PEERS  # noqa: E402

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
#: Screens and shares the worst-margin oracle searches beside Fisher groups of up to three candidates.
ORACLE_SCREENS = ("patch_pca", "max_softmax", "trust_score")
ORACLE_SHARES = (0.05, 0.2, 0.5)


def _load(model: str) -> dict[str, tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
    out: dict[str, tuple[dict, dict]] = {}
    with np.load(WORK / f"quality-{model}" / "p_values.npz", allow_pickle=False) as npz:
        for key in npz.files:
            attack, side, score = key.split("|")
            out.setdefault(attack, ({}, {}))[side == "positive"][score] = npz[key]
    return out


def _stack(p: dict[str, np.ndarray], members: list[str]) -> np.ndarray:
    return np.stack([p[m] for m in members], axis=1)


def _auroc(fusion: Fusion, members: list[str], neg: dict[str, np.ndarray], pos: dict[str, np.ndarray]) -> float:
    scores = np.r_[fusion.combine(_stack(neg, members)), fusion.combine(_stack(pos, members))]
    return float(roc_auc_score(np.r_[np.zeros(len(neg[members[0]])), np.ones(len(pos[members[0]]))], scores))


def worst_margin_oracle(data: dict, attacks: list[str], peer: dict[str, float]) -> tuple[str, list[str], Fusion, float]:
    """The fixed rule with the largest worst margin ``min_a (AUROC_a - peer[a])`` over ``attacks``: its description,
    members (screen last), fusion and that margin."""
    rules = [(list(g), Fusion("fisher"), " + ".join(g)) for r in (1, 2, 3)
             for g in itertools.combinations(ADVERSARIAL_CANDIDATES, r)]
    rules += [(g + [s], Fusion("fisher", None, share), f"{label} OR screen {s} at share {share}")
              for g, _, label in list(rules) for s in ORACLE_SCREENS if s not in g for share in ORACLE_SHARES]
    best = max(rules, key=lambda rule: min(_auroc(rule[1], rule[0], *data[a]) - peer[a] for a in attacks))
    members, fusion, label = best
    return label, members, fusion, min(_auroc(fusion, members, *data[a]) - peer[a] for a in attacks)


def served_lines(data: dict, flags: list) -> list[str]:
    """Markdown rows: per row of ``data`` (clean negatives first), the share above each calibrated threshold of the
    ``adversarial`` flag alone and of either flag (``flags``: the manifest's :class:`~detector.manifest.FlagRule`)."""
    rules = {r.name: r for r in flags}
    fprs = [t.target_fpr for t in rules["adversarial"].thresholds]
    lines = ["| inputs | n | " + " | ".join(f"`adversarial` at {f:g} | either flag at {f:g}" for f in fprs) + " |",
             "|---|---|" + "---|---|" * len(fprs)]
    rows = {"clean negatives": data[next(iter(data))][0], **{a: pos for a, (_, pos) in data.items()}}
    for name, p in rows.items():
        above = {}
        for rule in rules.values():
            statistic = rule.fusion_op().combine(_stack(p, rule.members))
            above[rule.name] = {t.target_fpr: statistic > t.value for t in rule.thresholds}
        cells = [f"{np.mean(above['adversarial'][f]):.3f} | "
                 f"{np.mean(above['adversarial'][f] | above['likely_misclassified'][f]):.3f}" for f in fprs]
        lines.append(f"| {name} | {len(next(iter(p.values())))} | " + " | ".join(cells) + " |")
    return lines


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
    attacks = [a for a in data if a not in ("misclassified", "noise")]
    results = json.loads((RESULTS / f"quality-{model}.json").read_text())["attacks"]
    peer = {a: max((results[a]["detectors"][p]["auroc"], p) for p in PEERS if p in results[a]["detectors"])
            for a in attacks}
    untuned = [a for a in attacks if a not in tuning]
    label, oracle_members, oracle_fusion, margin = worst_margin_oracle(data, untuned, {a: v for a, (v, _) in peer.items()})
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
        "best rule for the worst margin (oracle)": (oracle_members, oracle_fusion),
    }
    lines = [f"# Fusion ablation: {model}", "",
             "AUROC / TPR at 5 % FPR of the `adversarial` statistic, on the p-values of the last "
             "`bench/quality.py` run (8-bit attacks, successful examples only, clean negatives the model got right). "
             f"Chosen rule: {rule.describe()}; {rule.selection}. `weighted_fisher_lr` weights (fitted on this run's {', '.join(tuning)} rows): "
             + ", ".join(f"{n} {w:.3f}" for n, w in zip(names, weights) if w > 0) + ".", "",
             "Rows " + ", ".join(f"`{a}`" for a in tuning) + " are the tuning attack types (in-sample for `chosen` "
             "and `weighted_fisher_lr`); `best single p-value` (one score's conformal p-value) and `best Fisher of <= 3 "
             "candidates` are chosen on each row itself: oracles for reference, the second an upper bound for any "
             "choice of members. `best rule for the worst margin (oracle)` is "
             f"fisher over {label}: chosen on the untuned rows themselves for its worst margin to the best peer, "
             f"{margin:+.3f}" + (" (no fixed rule of that family is at least the best peer on every untuned attack)"
                                 if margin < 0 else "") + ".", "",
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
        fused = {m: _auroc(fisher, list(m), neg, pos) for r in (1, 2, 3) for m in itertools.combinations(names, r)}
        top_set = max(fused, key=fused.__getitem__)
        best_fisher.append(f"{' + '.join(top_set)} {fused[top_set]:.3f}")
    lines.append("| best single p-value (oracle) | " + " | ".join(best) + " |")
    lines.append("| best Fisher of <= 3 candidates (oracle) | " + " | ".join(best_fisher) + " |")
    lines.append("| best peer (raw score) | " + " | ".join(f"{peer[a][1]} {peer[a][0]:.3f}" for a in attacks) + " |")
    lines += ["", "## Over every untuned attack at once", "",
              "Worst and mean AUROC over " + ", ".join(f"`{a}`" for a in untuned) + " (raw scores for the peers, "
              "`bench/results/quality-" + model + ".json`).", "", "| detector | worst AUROC (attack) | mean AUROC |",
              "|---|---|---|"]
    for detector in ("fused", *(p for p in PEERS if p in results[untuned[0]]["detectors"])):
        aurocs = {a: results[a]["detectors"][detector]["auroc"] for a in untuned}
        worst = min(aurocs, key=aurocs.__getitem__)
        lines.append(f"| {detector} | {aurocs[worst]:.3f} ({worst}) | {np.mean(list(aurocs.values())):.3f} |")
    lines += ["", "## What the service flags at its calibrated thresholds", "",
              "Share of each row above the thresholds calibration fixed, per target FPR: the `adversarial` flag alone "
              "and either flag (`adversarial` or `likely_misclassified`, each at that target). `misclassified` is "
              "the model's natural errors.", "", *served_lines(data, manifest.flags)]
    write_result(f"fusion-ablation-{model}.md", lines)


if __name__ == "__main__":
    for name in sys.argv[1:] or ["digits_cnn", "lenet5"]:
        if (RESULTS.parent.parent / "build" / "bench" / f"quality-{name}" / "p_values.npz").is_file():
            run(name)
        else:
            sys.exit(f"bench/fusion_ablation.py: run bench/quality.py {name} first")
