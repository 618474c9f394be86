"""The trust score of Jiang et al. (NeurIPS 2018, "To trust or not to trust a classifier"), as a suspicion score.

A classifier's prediction is trustworthy when the input lies closer, in a hidden layer, to clean inputs of
the predicted class than to those of any other class. The trust score is the ratio of the distance to the
nearest other class to the distance to the predicted class; its logarithm, negated, is the score here.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from detector.capture import Capture
from detector.errors import InvalidInput
from detector.scorers.base import Scorer, ScorerContext
from detector.scorers.peers import KNNScorer, _check_labels, _default_layer, float32_values, layer_features, sq_distances

__all__ = ["TrustScoreScorer"]

#: Floor of squared distances before the logarithm (an input equal to a reference has distance 0).
_FLOOR = 1e-12


class TrustScoreScorer(Scorer):
    """Negative log trust score (Jiang et al. 2018) in one hidden layer, with class-conditional k-NN distances.

    Parameters
    ----------
    k : int, default 1
        d_c(x) is the distance to the k-th nearest clean reference whose true label is c (its farthest when
        the class has fewer than k; a class without references is never the nearest other class). Jiang et
        al. use the nearest (k = 1) point of each class's high-density set.
    layer : str, optional
        Captured tensor to read; default the last captured tensor at fit time (the penultimate layer with the
        default capture). Convolutional tensors are reduced to channel means.
    chunk_size : int, default 1024
        Query rows per matrix product (memory ~ chunk_size x n_reference float64).

    Notes
    -----
    With u = f / ||f|| the normalised features (as :class:`~detector.scorers.peers.KNNScorer`), c-hat the
    predicted class and d_c(u) as above, the trust score is T = min_{c != c-hat} d_c(u) / d_{c-hat}(u) and the
    score is

        s(x) = -log T = (log d^2_{c-hat}(u) - log min_{c != c-hat} d^2_c(u)) / 2,

    squared distances floored at 1e-12. s > 0 when another class's references are nearer than the predicted
    class's: the prediction disagrees with the neighbourhood (a likely error, or an input pushed across the
    boundary). Jiang et al. also drop each class's lowest-density references (their alpha filter); the
    calibration sets here hold a few dozen to a few hundred inputs per class, so every reference is kept.
    The references are stored as float32. Higher = more suspicious.
    """

    kind = "trust_score"
    score_names = ("trust_score",)

    def __init__(self, k: int = 1, layer: str | None = None, chunk_size: int = 1024):
        self.k = k
        self.layer = layer
        self.chunk_size = chunk_size

    def required_tensors(self) -> list[str]:
        layer = getattr(self, "layer_", self.layer)
        return [layer] if layer is not None else []

    def fit(self, capture: Capture, labels: np.ndarray) -> "TrustScoreScorer":
        """Store the normalised clean features and their true ``labels`` (n_samples,) as references. Returns self."""
        labels = _check_labels(capture, labels)
        if not isinstance(self.k, (int, np.integer)) or self.k < 1:
            raise InvalidInput(f"k must be a positive integer, got {self.k!r}")
        if not isinstance(self.chunk_size, (int, np.integer)) or self.chunk_size < 1:
            raise InvalidInput(f"chunk_size must be a positive integer, got {self.chunk_size!r}")
        if len(np.unique(labels)) < 2:
            raise InvalidInput("the trust score needs references of at least two classes")
        self.layer_ = _default_layer(capture, self.layer)
        features = layer_features(capture, self.layer_)
        if not np.isfinite(features).all():
            raise InvalidInput(f"layer {self.layer_!r} has non-finite activations in the reference data")
        self._set_reference(KNNScorer._normalise(features), labels, int(capture.logits.shape[1]))
        return self

    def _set_reference(self, reference: np.ndarray, labels: np.ndarray, n_classes: int) -> None:
        """Store the references (:func:`~detector.scorers.peers.float32_values`), their labels and class count
        (the state), and what scoring derives from them."""
        self.reference_ = float32_values(reference)
        self.labels_ = np.asarray(labels, dtype=np.int64)
        self.n_classes_ = n_classes
        self._reference_sq = (self.reference_ * self.reference_).sum(axis=1)
        counts = np.bincount(self.labels_, minlength=n_classes)
        self._members = [np.flatnonzero(self.labels_ == c) for c in range(n_classes)]
        self._kth = np.minimum(self.k, np.maximum(counts, 1)) - 1

    def class_sq_distances(self, capture: Capture) -> np.ndarray:
        """Squared distance of each input's normalised features to the k-th nearest reference of each class,
        ndarray (n_samples, n_classes) in [1e-12, 4]; 4 for a class without references."""
        self._check_fitted("reference_")
        u = KNNScorer._normalise(layer_features(capture, self.layer_))
        if u.shape[1] != self.reference_.shape[1]:
            raise InvalidInput(f"layer {self.layer_!r} has {u.shape[1]} features, the scorer was fitted on "
                               f"{self.reference_.shape[1]}")
        out = np.full((len(u), self.n_classes_), 4.0)
        for start in range(0, len(u), self.chunk_size):
            q = u[start:start + self.chunk_size]
            sq = sq_distances(q, self.reference_, self._reference_sq)
            for c, members in enumerate(self._members):
                if len(members):
                    out[start:start + len(q), c] = np.partition(sq[:, members], self._kth[c], axis=1)[:, self._kth[c]]
        return np.clip(out, _FLOOR, 4.0)

    def scores(self, capture: Capture) -> dict[str, np.ndarray]:
        """-log trust score, ndarray (n_samples,) (positive: another class is nearer); higher = more suspicious."""
        d = self.class_sq_distances(capture)
        rows = np.arange(len(d))
        predicted = np.asarray(capture.predicted, dtype=np.int64)
        own = d[rows, predicted]
        d[rows, predicted] = np.inf
        return {self.kind: 0.5 * (np.log(own) - np.log(d.min(axis=1)))}

    def get_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        self._check_fitted("reference_")
        return ({"k": int(self.k), "layer": self.layer_, "chunk_size": int(self.chunk_size)},
                {"reference": self.reference_.astype(np.float32), "labels": self.labels_,
                 "n_classes": np.asarray(self.n_classes_, dtype=np.int64)})

    @classmethod
    def from_state(cls, params: dict[str, Any], arrays: dict[str, np.ndarray],
                   context: ScorerContext | None = None) -> "TrustScoreScorer":
        scorer = cls(**params)
        scorer.layer_ = scorer.layer
        scorer._set_reference(arrays["reference"], arrays["labels"], int(arrays["n_classes"]))
        return scorer
