"""Do the attacks change what the image looks like? Pixel-space nearest neighbours of the successful examples.

A clean-data detector can only flag an input that looks unlike the clean inputs of the class the model gives it.
An attack that moves a digit close to clean digits of another class has, in pixel space, changed the digit.
For each model and attack this writes ``bench/results/label-change.md``:

- the share of the successful 8-bit examples (the same ones as ``bench/quality.py``: same attacks, defaults,
  seeds and inputs) whose nearest training image (Euclidean distance in pixel space, 1-NN over the images the
  model was trained on) has the class the attack reached, and the share whose nearest has the original class;
- the ``adversarial`` statistic's AUROC against the clean correct evaluation inputs on all examples and on each of
  those two groups, with the baseline of the last ``bench/quality.py`` run of the model.

1-NN accuracy on the clean correct inputs is given beside, as the yardstick of how well pixel distance reads a
class on that data.

Run: ``.venv/bin/python bench/label_change.py [MODEL ...]`` (default: digits_cnn lenet5) after
``bench/quality.py MODEL``; about 7 minutes on this machine, most of it LeNet-5's CW.
"""

from __future__ import annotations

import sys

import numpy as np
from sklearn.metrics import roc_auc_score
from sklearn.neighbors import KNeighborsClassifier

from common import write_result  # noqa: E402  (puts ROOT on sys.path)
from quality import DEFAULT_CASES, WORK, cases  # noqa: E402

from detector import load_dataset  # noqa: E402
from detector.data import mnist_split  # noqa: E402
from detector.offline.attacks import load_torch_classifier, round_to_grid, run_attack  # noqa: E402
from detector.offline.evaluate import detector_scores  # noqa: E402
from detector.pipeline import Detector  # noqa: E402

ATTACKS = ("pgd_foreground", "cw_k10", "fgsm_minimal_foreground")
TRAINING = {"digits_cnn": lambda: load_dataset("digits:train"), "lenet5": lambda: mnist_split()["train"]}


def _auroc(clean: np.ndarray, positives: np.ndarray) -> str:
    if len(positives) < 5:
        return "n/a"
    return f"{roc_auc_score(np.r_[np.zeros(len(clean)), np.ones(len(positives))], np.r_[clean, positives]):.3f}"


def run(names: list[str]) -> list[str]:
    import torch

    torch.set_num_threads(1)
    lines = ["| model | attack | n | 1-NN has the reached class | 1-NN has the original class | flag AUROC, all | "
             "reached-class group | original-class group |", "|---|---|---|---|---|---|---|---|"]
    notes = []
    for case in cases(names):
        detector = Detector.load(case.onnx, WORK / f"quality-{case.name}" / "baseline")
        model = load_torch_classifier(case.onnx)
        x = round_to_grid(case.evaluation.x, 255)
        scores, predicted = detector_scores(detector, x)
        correct = predicted == case.evaluation.y
        clean = scores["fused_adversarial"][correct]
        x_ok, y_ok = x[correct][: case.max_attacked], case.evaluation.y[correct][: case.max_attacked]
        training = TRAINING[case.name]()
        knn = KNeighborsClassifier(1).fit(training.x.reshape(len(training.x), -1), training.y)
        notes.append(f"{case.name}: 1-NN accuracy {np.mean(knn.predict(x_ok.reshape(len(x_ok), -1)) == y_ok):.3f} "
                     f"on the {len(x_ok)} clean inputs attacked ({len(training.x)} training images)")
        for attack in ATTACKS:
            result = run_attack(attack, model, x_ok, y_ok, pixel_levels=255)
            x_adv, y_orig = result.x_adv[result.success], y_ok[result.success]
            adv_scores, reached = detector_scores(detector, x_adv)
            nearest = knn.predict(x_adv.reshape(len(x_adv), -1))
            fused = adv_scores["fused_adversarial"]
            to_reached, to_original = nearest == reached, nearest == y_orig
            lines.append(f"| {case.name} | {attack} | {len(x_adv)} | {to_reached.mean():.3f} | {to_original.mean():.3f} | "
                         f"{_auroc(clean, fused)} | {_auroc(clean, fused[to_reached])} (n {to_reached.sum()}) | "
                         f"{_auroc(clean, fused[to_original])} (n {to_original.sum()}) |")
    return ["# Do the attacks change what the image looks like?", "",
            "Successful 8-bit examples of `bench/quality.py`'s attacks; nearest training image by pixel distance. "
            "AUROC of the `adversarial` statistic (the last `bench/quality.py` baseline) against the clean correct "
            "evaluation inputs. Command: `.venv/bin/python bench/label_change.py " + " ".join(names) + "`.", "",
            *lines, "", *[f"- {n}" for n in notes]]


if __name__ == "__main__":
    chosen = sys.argv[1:] or list(DEFAULT_CASES)
    unknown = [n for n in chosen if n not in TRAINING]
    if unknown:
        sys.exit(f"bench/label_change.py: no training images for {unknown}; choose among {', '.join(TRAINING)}")
    write_result("label-change.md", run(chosen))
