"""Peers that read the classifier's output: the energy score and feature squeezing."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from scipy.special import logsumexp

from detector.capture import Capture, softmax
from detector.errors import InvalidInput
from detector.scorers.peers import LogitScorer
from detector.squeeze import SQUEEZERS

__all__ = ["EnergyScorer", "FeatureSqueezingScorer"]


class EnergyScorer(LogitScorer):
    """The energy score (Liu et al., NeurIPS 2020): free energy of the logits, as a suspicion score.

    Notes
    -----
    With logits z and temperature T = 1, ``s(x) = E(x) = -log sum_j exp(z_j)`` (in logit units). Clean,
    confidently classified inputs have large logits and low energy. Nothing is learnt. Higher = more
    suspicious.
    """

    kind = "energy"
    score_names = ("energy",)

    def scores(self, capture: Capture) -> dict[str, np.ndarray]:
        """Energy ``-logsumexp(z)`` per input, ndarray (n_samples,); higher = more suspicious."""
        return {self.kind: -logsumexp(self._logits(capture), axis=1)}


class FeatureSqueezingScorer(LogitScorer):
    """Feature squeezing (Xu, Evans & Qi, NDSS 2018): how far squeezing the input moves the prediction.

    Parameters
    ----------
    squeezers : sequence of str, default ("bit_depth_1", "median_2x2")
        Keys of :data:`detector.squeeze.SQUEEZERS`; Xu et al.'s MNIST setting is 1-bit depth and a 2x2
        median filter. The squeezed copies' logits come from the same ONNX Runtime run as the input's
        (:func:`detector.squeeze.run_with_squeezers`; :meth:`squeezer_names` tells the pipeline which).

    Notes
    -----
    With p(x) the softmax of the logits and q_s(x) that of squeezer s's copy,

        s(x) = max_s || p(x) - q_s(x) ||_1,       in [0, 2].

    Xu et al. threshold this at a clean-data false-positive rate, as the conformal p-value does here.
    Nothing is learnt. Higher = more suspicious.
    """

    kind = "feature_squeezing"
    score_names = ("feature_squeezing",)

    def __init__(self, squeezers: Sequence[str] = ("bit_depth_1", "median_2x2")):
        self.squeezers = squeezers

    def squeezer_names(self) -> list[str]:
        """The squeezers whose logits :meth:`scores` reads from ``capture.squeezed_logits``."""
        return list(self.squeezers)

    def fit(self, capture: Capture, labels: np.ndarray) -> "FeatureSqueezingScorer":
        """Check the squeezers and that the capture carries their logits; record the class count. Returns self."""
        unknown = [s for s in self.squeezers if s not in SQUEEZERS]
        if unknown or not self.squeezers:
            raise InvalidInput(f"squeezers must be a non-empty subset of {', '.join(SQUEEZERS)}, got {list(self.squeezers)}")
        super().fit(capture, labels)
        self.scores(capture)  # refuses a capture without the squeezed logits
        return self

    def reduce(self, capture: Capture) -> dict[str, np.ndarray]:
        """The score of every input: a reduced capture drops the squeezed copies' logits (n_classes each)."""
        return {self.kind: self._distances(capture)}

    def scores(self, capture: Capture) -> dict[str, np.ndarray]:
        """Largest L1 distance between the softmax of the input and of a squeezed copy, ndarray (n_samples,) in [0, 2]."""
        self._logits(capture)  # fitted, and logits of the fitted shape
        if self.kind in capture.features:
            return {self.kind: capture.features[self.kind]}
        return {self.kind: self._distances(capture)}

    def _distances(self, capture: Capture) -> np.ndarray:
        missing = [s for s in self.squeezers if s not in capture.squeezed_logits]
        if missing:
            raise InvalidInput(f"the capture has no logits of the squeezed copies {missing}: run the model through "
                               "detector.squeeze.run_with_squeezers")
        p = capture.probabilities
        return np.max([np.abs(p - softmax(capture.squeezed_logits[s])).sum(axis=1) for s in self.squeezers], axis=0)

    def _params(self) -> dict[str, Any]:
        return {"squeezers": list(self.squeezers)}
