"""Positives that calibration makes itself, to choose the fused statistic (never to report it).

:func:`tuning_p_values` attacks clean calibration inputs with the attacks named in
:attr:`detector.calibration.CalibrationConfig.tuning_attacks` (by default two attack families: high-confidence
FGSM over the whole image and over the digit's pixels only, and minimum-perturbation DeepFool and the smallest
foreground FGSM step that flips the class), keeps the examples still adversarial after rounding to 8-bit, and
returns their conformal p-values. Evaluations then report the detector on the other attack types (CW kappa=0
and 10, PGD, Square), and mark the tuning attacks' rows in-sample.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import numpy as np

from detector.conformal import ConformalCalibrator
from detector.model import OnnxClassifier
from detector.scorers.base import Scorer
from detector.squeeze import run_batches_with_squeezers

__all__ = ["tuning_p_values"]


def tuning_p_values(model_path: str | os.PathLike[str], model: OnnxClassifier, scorers: Sequence[Scorer],
                    calibrators: Mapping[str, ConformalCalibrator], x: np.ndarray, y: np.ndarray,
                    attacks: Sequence[str]) -> dict[str, dict[str, np.ndarray]]:
    """Per attack, the p-value of every score of its successful examples made from ``x`` (correctly classified).

    Parameters
    ----------
    model_path : path
        The ONNX classifier (attacked through onnx2torch).
    model, scorers, calibrators
        The calibration's classifier, fitted scorers and conformal calibrators.
    x : ndarray of shape (n_samples, ...), y : ndarray of shape (n_samples,)
        Clean inputs the model classifies correctly, and their labels.
    attacks : sequence of str
        Names from :data:`detector.offline.attacks.ATTACK_DEFAULTS`.

    Returns
    -------
    dict of str to (dict of str to ndarray (n_successful,))
        Attacks without a successful example are left out.
    """
    import torch

    from detector.offline.attacks import load_torch_classifier, run_attack

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small batches: one thread is faster on a shared machine
    try:
        torch_model = load_torch_classifier(model_path)
        results = {name: run_attack(name, torch_model, x, y) for name in attacks}
    finally:
        torch.set_num_threads(threads)
    squeezers = list(dict.fromkeys(n for s in scorers for n in s.squeezer_names()))
    out = {}
    for name, result in results.items():
        if not result.success.any():
            continue
        capture = run_batches_with_squeezers(model, result.x_adv[result.success], squeezers)
        scores = {k: v for s in scorers for k, v in s.scores(capture).items()}
        out[name] = {k: calibrators[k].p_values(v, capture.predicted) for k, v in scores.items()}
    return out
