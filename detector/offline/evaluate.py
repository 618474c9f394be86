"""Honest evaluation: every scorer, the fused detector and the peers, on the same samples, in one run.

Protocol (DESIGN.md, "Honest evaluation"):

- images reach a service as 8-bit pixels: the clean evaluation inputs are rounded to the pixel grid
  (``pixel_levels``, 255 by default; a no-op for 8-bit data such as MNIST, at most 1/510 for the digits'
  k/16 pixels) and so is every adversarial example (:func:`~detector.offline.attacks.run_attack`);
- negatives are the clean evaluation inputs the model classifies correctly;
- for each attack, positives are the *successful* adversarial examples made from those same inputs, success
  judged after rounding (failed attempts are not counted); the attack's success rates after and before
  rounding are reported beside. ``max_attacked`` attacks only the first correctly classified inputs
  (the slow CW attacks on a large set); the negatives stay all of them;
- ``misclassified``: positives are the clean evaluation inputs the model gets wrong;
- ``noise``: Gaussian noise on the same inputs; every noisy input counts (it is a corruption, not an attack);
- grey images stored as colour (every channel equal) are attacked in grey
  (:func:`~detector.offline.attacks.channels_tied`), so no attack gives itself away by colouring them.

For every (attack, detector) pair: AUROC and the TPR at 1 % and 5 % FPR (the largest TPR on the ROC curve
whose FPR does not exceed the target). Detectors are the raw scores of every scorer (``nonzero_pixels`` and
``offgrid_pixels``, the count of pixels off the 8-bit grid, are the input-statistics sanity rows: an attack
that gives itself away shows there) and ``fused``: the ``adversarial`` flag's statistic on attack rows and the
``likely_misclassified`` statistic on the ``misclassified`` row.

TPR at a target FPR is measured at the evaluation's own clean quantile. What the service does is flag at the
thresholds calibration fixed on its held-out inputs; for every attack the table also gives, at each calibrated
FPR, the share of positives and of clean negatives that the flag's calibrated threshold flags (``served``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from sklearn.metrics import roc_auc_score, roc_curve
from tqdm.auto import tqdm

from detector.data import Dataset
from detector.errors import InvalidInput
from detector.offline.attacks import ATTACKS, channels_tied, offgrid_pixels, round_to_grid, run_attack
from detector.pipeline import Detector

__all__ = ["ATTACK_NAMES", "EvaluationResult", "detector_scores", "evaluate", "results_markdown", "tpr_at_fpr",
           "write_results"]

#: Rows of the table, in order (``misclassified`` is not an attack but the natural errors of the model).
ATTACK_NAMES = (*ATTACKS, "misclassified")
FPR_TARGETS = (0.01, 0.05)


def tpr_at_fpr(negatives: np.ndarray, positives: np.ndarray, fpr: float) -> float:
    """Largest true-positive rate on the ROC curve with false-positive rate <= ``fpr``."""
    y = np.r_[np.zeros(len(negatives)), np.ones(len(positives))]
    f, t, _ = roc_curve(y, np.r_[negatives, positives])
    return float(t[f <= fpr + 1e-12].max())


@dataclass(frozen=True)
class EvaluationResult:
    """The results table (``results.json`` shape) and the scores behind it, for ROC figures."""

    table: dict
    scores: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]
    #: per attack, the conformal p-value of every score: (clean negatives, positives), each {score: (n,)}
    p_values: dict[str, tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]


def detector_scores(detector: Detector, x: np.ndarray, batch_size: int | None = None) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Every raw score, its p-value (``p_value:<score>``) and each flag's fused statistic (``fused_<flag>``), and the
    predicted classes (``batch_size`` inputs at a time, default :attr:`Detector.batch_size`)."""
    parts: list[dict[str, np.ndarray]] = []
    predicted = []
    batch_size = batch_size or detector.batch_size
    for start in range(0, len(x), batch_size):
        capture = detector.classify(x[start : start + batch_size])
        raw = detector.raw_scores(capture)
        p_values = detector.p_values(raw, capture.predicted)
        stats = detector.statistics(p_values)
        parts.append(raw | {"offgrid_pixels": offgrid_pixels(capture.inputs)} | {f"fused_{k}": v for k, v in stats.items()}
                     | {f"p_value:{k}": v for k, v in p_values.items()})
        predicted.append(capture.predicted)
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}, np.concatenate(predicted)


def _row(clean: dict[str, np.ndarray], positive: dict[str, np.ndarray], fused_key: str) -> dict[str, dict[str, float]]:
    out = {}
    names = [k for k in clean if not k.startswith(("fused_", "p_value:"))]
    for name in ["fused", *names]:
        key = fused_key if name == "fused" else name
        neg, pos = clean[key], positive[key]
        if len(pos) == 0:
            out[name] = {"auroc": math.nan, **{f"tpr_at_fpr_{f}": math.nan for f in FPR_TARGETS}}
            continue
        y = np.r_[np.zeros(len(neg)), np.ones(len(pos))]
        out[name] = {"auroc": float(roc_auc_score(y, np.r_[neg, pos])),
                     **{f"tpr_at_fpr_{f}": tpr_at_fpr(neg, pos, f) for f in FPR_TARGETS}}
    return out


def _served(detector: Detector, flag: str, negatives: np.ndarray, positives: np.ndarray) -> dict[str, dict[str, float]]:
    """Per calibrated FPR of ``flag``: the shares of ``positives`` and of clean ``negatives`` whose statistic exceeds
    its calibrated threshold (what the service flags)."""
    rule = next(r for r in detector.manifest.flags if r.name == flag)
    return {str(t.target_fpr): {"positives": float(np.mean(positives > t.value)) if len(positives) else math.nan,
                                "clean": float(np.mean(negatives > t.value))} for t in rule.thresholds}


def evaluate(detector: Detector, torch_model: torch.nn.Module, data: Dataset, attacks: Sequence[str] = ATTACK_NAMES,
             model_name: str = "", progress: bool = True, pixel_levels: int | None = 255,
             max_attacked: int | None = None) -> EvaluationResult:
    """Run the attacks on ``data``'s correctly classified inputs and score everything with ``detector``.

    ``torch_model`` is the same classifier in torch (:func:`~detector.offline.attacks.load_torch_classifier`
    of the ONNX file); ``pixel_levels`` is the pixel grid (None: no rounding); ``max_attacked`` caps the
    number of inputs attacked (default: every correctly classified input).
    """
    unknown = [a for a in attacks if a not in ATTACK_NAMES]
    if unknown:
        raise InvalidInput(f"unknown attack(s) {unknown}; choose from {', '.join(ATTACK_NAMES)} or all")
    x = round_to_grid(data.x, pixel_levels)
    all_scores, predicted = detector_scores(detector, x)
    correct = predicted == data.y
    clean = {k: v[correct] for k, v in all_scores.items()}
    x_ok, y_ok = x[correct][:max_attacked], data.y[correct][:max_attacked]
    table: dict = {"model": model_name, "n_clean": int(correct.sum()), "pixel_levels": pixel_levels,
                   "channels_tied": channels_tied(x_ok), "attacks": {}}
    kept: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    p_values = {}
    for name in tqdm(attacks, desc="evaluate", disable=not progress):
        if name == "misclassified":
            positive = {k: v[~correct] for k, v in all_scores.items()}
            rate, fused_key, n = float(np.mean(~correct)), "fused_likely_misclassified", int((~correct).sum())
            rates = {"success_rate": rate}
        else:
            result = run_attack(name, torch_model, x_ok, y_ok, pixel_levels=pixel_levels)
            chosen = np.ones(len(x_ok), bool) if name == "noise" else result.success
            positive = detector_scores(detector, result.x_adv[chosen])[0] if chosen.any() else {k: v[:0] for k, v in clean.items()}
            fused_key, n = "fused_adversarial", int(chosen.sum())
            summary = result.summary()
            rates = {k: summary[k] for k in ("success_rate", "success_rate_unrounded", "mean_l2", "mean_linf")}
        table["attacks"][name] = {**rates, "n": n, "detectors": _row(clean, positive, fused_key),
                                  "served": _served(detector, fused_key.removeprefix("fused_"), clean[fused_key],
                                                    positive[fused_key])}
        kept[name] = {d: (clean[d if d != "fused" else fused_key], positive[d if d != "fused" else fused_key])
                      for d in table["attacks"][name]["detectors"]}
        p_values[name] = tuple({k.removeprefix("p_value:"): v for k, v in part.items() if k.startswith("p_value:")}
                               for part in (clean, positive))
    return EvaluationResult(table, kept, p_values)


def write_results(result: EvaluationResult, out: Path) -> None:
    """Write ``results.json``, ``results.md`` and one ROC PNG per attack into ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result.table, indent=2, allow_nan=True) + "\n")
    (out / "results.md").write_text(results_markdown(result.table))
    for attack, detectors in result.scores.items():
        fig, ax = plt.subplots(figsize=(5, 5))
        for name, (neg, pos) in detectors.items():
            if len(pos) == 0:
                continue
            f, t, _ = roc_curve(np.r_[np.zeros(len(neg)), np.ones(len(pos))], np.r_[neg, pos])
            ax.plot(f, t, lw=2.2 if name == "fused" else 1.0, label=f"{name} ({result.table['attacks'][attack]['detectors'][name]['auroc']:.3f})")
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set(xlabel="false-positive rate", ylabel="true-positive rate", title=f"{result.table['model']}: {attack}")
        ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        fig.savefig(out / f"roc_{attack}.png", dpi=110)
        plt.close(fig)


def results_markdown(table: dict) -> str:
    """The results table as Markdown: one block per attack, one row per detector."""
    grid = "not rounded" if table["pixel_levels"] is None else f"rounded to k/{table['pixel_levels']}"
    lines = [f"# Evaluation: {table['model']}", "",
             f"Clean inputs classified correctly (negatives): {table['n_clean']}. Positives: successful adversarial "
             "examples made from them (every noisy input for `noise`; the model's errors for `misclassified`). "
             f"Pixels (clean and adversarial) {grid}; success is judged after rounding."
             + (" The inputs are grey images stored as colour: the attacks kept the channels equal."
                if table.get("channels_tied") else ""), ""]
    for attack, row in table["attacks"].items():
        before = f" ({row['success_rate_unrounded']:.3f} before rounding)" if "success_rate_unrounded" in row else ""
        lines += [f"## {attack}: success rate {row['success_rate']:.3f}{before}, n = {row['n']}", "",
                  "| detector | AUROC | TPR @ 1% FPR | TPR @ 5% FPR |", "|---|---|---|---|"]
        for name, m in row["detectors"].items():
            bold = "**" if name == "fused" else ""
            lines.append(f"| {bold}{name}{bold} | {m['auroc']:.3f} | {m['tpr_at_fpr_0.01']:.3f} | {m['tpr_at_fpr_0.05']:.3f} |")
        served = row.get("served", {})
        lines += ["", "Served flag at its calibrated thresholds: " + "; ".join(
            f"target FPR {fpr}: flags {v['positives']:.3f} of the positives, {v['clean']:.3f} of the clean negatives"
            for fpr, v in served.items()) + "."] if served else []
        lines.append("")
    return "\n".join(lines)
