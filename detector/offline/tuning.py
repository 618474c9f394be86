"""Positives that calibration makes itself, to choose the fused statistic (never to report it).

:func:`tuning_p_values` attacks clean calibration inputs with the attacks named in
:attr:`detector.calibration.CalibrationConfig.tuning_attacks` (by default high-confidence FGSM over the whole
image and over the digit's pixels only; minimum-perturbation DeepFool and the smallest foreground FGSM step that
flips the class can be added), keeps the examples still adversarial after rounding to 8-bit, and
returns their conformal p-values. Evaluations then report the detector on the other attack types (CW kappa=0
and 10, PGD, Square), and mark the tuning attacks' rows in-sample.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import numpy as np

from detector.conformal import ConformalCalibrator
from detector.data import Rows
from detector.model import OnnxClassifier
from detector.scorers.base import Scorer
from detector.stream import reduced_capture, score_in_chunks

__all__ = ["tuning_p_values"]


def tuning_p_values(model_path: str | os.PathLike[str], model: OnnxClassifier, scorers: Sequence[Scorer],
                    calibrators: Mapping[str, ConformalCalibrator], x: "np.ndarray | Rows", y: np.ndarray,
                    attacks: Sequence[str], chunk_size: int | None = None) -> dict[str, dict[str, np.ndarray]]:
    """Per attack, the p-value of every score of its successful examples made from ``x`` (correctly classified).

    Parameters
    ----------
    model_path : path
        The ONNX classifier (attacked through onnx2torch).
    model, scorers, calibrators
        The calibration's classifier, fitted scorers and conformal calibrators.
    x : ndarray or Rows of shape (n_samples, ...), y : ndarray of shape (n_samples,)
        Clean inputs the model classifies correctly, and their labels.
    attacks : sequence of str
        Names from :data:`detector.offline.attacks.ATTACK_DEFAULTS`.
    chunk_size : int, optional
        Inputs attacked and scored at a time, so that memory does not grow with ``x`` (default
        :meth:`OnnxClassifier.batch_size` for four copies of an input: 256 for the digits models and LeNet-5).

    Returns
    -------
    dict of str to (dict of str to ndarray (n_successful,))
        Attacks without a successful example are left out.
    """
    import torch

    from detector.offline.attacks import load_torch_classifier, run_attack

    rows = x if isinstance(x, Rows) else Rows(x)
    size = chunk_size or model.batch_size(copies=4)
    parts: dict[str, list[dict[str, np.ndarray]]] = {name: [] for name in attacks}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small batches: one thread is faster on a shared machine
    try:
        torch_model = load_torch_classifier(model_path)
        for start in range(0, len(rows), size):
            x_part, y_part = rows[start:start + size], y[start:start + size]
            for name in attacks:
                result = run_attack(name, torch_model, x_part, y_part)
                if not result.success.any():
                    continue
                capture = reduced_capture(model, result.x_adv[result.success], scorers)
                scores = score_in_chunks(scorers, capture)
                parts[name].append({k: calibrators[k].p_values(v, capture.predicted) for k, v in scores.items()})
    finally:
        torch.set_num_threads(threads)
    return {name: {k: np.concatenate([p[k] for p in chunks]) for k in chunks[0]}
            for name, chunks in parts.items() if chunks}
