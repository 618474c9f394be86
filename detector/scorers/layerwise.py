"""Layer-wise class-conditional peers: a statistic per hidden layer, a p-value per layer, Fisher fusion.

The design of JTLA / ReBeL (Raghuram et al., ICML 2021, arXiv 2007.15147, code
``jayaram-r/adversarial-detection``), the closest published detector to ours: class-conditional test
statistics at several layers, each turned into a p-value against clean data, combined with Fisher's method,
using clean data only. Two statistics:

- :class:`LayerwiseKNNScorer`: the distance to the k-th nearest clean reference of the predicted class
  (normalised features), per layer;
- :class:`LayerwiseMahalanobisScorer`: the squared Mahalanobis distance to the predicted class's Gaussian
  per layer (Lee et al. 2018's feature ensemble, fused with Fisher instead of their logistic regression
  fitted on attacks).
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, NamedTuple, Sequence

import numpy as np

from detector.capture import Capture
from detector.conformal import ConformalCalibrator, split_held_out
from detector.errors import InvalidInput
from detector.gaussian import ClassConditionalGaussian
from detector.scorers.base import Scorer, ScorerContext
from detector.scorers.peers import KNNScorer, _check_labels, float32_values, layer_features, sq_distances

__all__ = ["LayerwiseKNNScorer", "LayerwiseMahalanobisScorer"]


class _LayerwiseScorer(Scorer):
    """Per-layer class-conditional statistic t_l, conformal p-value p_l per layer, s = -2 sum_l log p_l.

    Parameters
    ----------
    layers : sequence of str, optional
        Captured tensors to read (default: every captured tensor at fit time). Convolutional tensors are
        reduced to channel means (:func:`~detector.scorers.peers.layer_features`).
    seed : int, default 0
        Seed of the split of the fit data into the layer models' references and their p-value calibration.
    min_class_count : int, default 20
        Class-conditional p-values per layer need this many calibration inputs of the predicted class.

    Notes
    -----
    :meth:`fit` splits the clean fit data in half (stratified, seeded): the first half fits each layer's
    model with the true labels; the second half's statistics, for its predicted classes, are the conformal
    references of each layer's p-value p_l(x) (:class:`~detector.conformal.ConformalCalibrator`). The score
    is Fisher's ``s(x) = -2 sum_l log p_l(x)`` over the layers. Higher = more suspicious.
    """

    def __init__(self, layers: Sequence[str] | None = None, seed: int = 0, min_class_count: int = 20):
        self.layers = layers
        self.seed = seed
        self.min_class_count = min_class_count

    def required_tensors(self) -> list[str]:
        return list(getattr(self, "layers_", self.layers) or [])

    @abstractmethod
    def _fit_layer(self, features: np.ndarray, labels: np.ndarray, n_classes: int) -> Any:
        """The layer's clean model, from features (n, d) and true labels (n,)."""

    @abstractmethod
    def _statistic(self, model: Any, features: np.ndarray, classes: np.ndarray) -> np.ndarray:
        """The statistic t_l (n,) of features (n, d) given the predicted classes (n,); higher = more suspicious."""

    @abstractmethod
    def _model_state(self, model: Any, prefix: str) -> dict[str, np.ndarray]:
        """The layer model's arrays under ``prefix``."""

    @abstractmethod
    def _model_from_state(self, arrays: dict[str, np.ndarray], prefix: str) -> Any:
        """Rebuild a layer model from :meth:`_model_state`."""

    def fit(self, capture: Capture, labels: np.ndarray) -> "_LayerwiseScorer":
        """Fit each layer's model and its p-value references on clean ``capture`` with true ``labels``. Returns self."""
        labels = _check_labels(capture, labels)
        self.layers_ = list(self.layers or capture.activations)
        if not self.layers_:
            raise InvalidInput("no hidden layer is captured: capture layers or name them with layers=...")
        n_classes = int(capture.logits.shape[1])
        ref, cal = split_held_out(labels, fraction=0.5, seed=self.seed)
        classes = capture.predicted[cal]
        self.models_, self.calibrators_ = [], []
        for layer in self.layers_:
            features = layer_features(capture, layer)
            model = self._fit_layer(features[ref], labels[ref], n_classes)
            stat = self._statistic(model, features[cal], classes)
            self.models_.append(model)
            self.calibrators_.append(ConformalCalibrator(self.min_class_count).fit(stat, classes, n_classes))
        return self

    def layer_p_values(self, capture: Capture) -> np.ndarray:
        """p-value of every layer's statistic, ndarray (n_samples, n_layers) in (0, 1]; small = suspicious."""
        self._check_fitted("models_")
        classes = capture.predicted
        return np.stack([cal.p_values(self._statistic(model, layer_features(capture, layer), classes), classes)
                         for layer, model, cal in zip(self.layers_, self.models_, self.calibrators_)], axis=1)

    def scores(self, capture: Capture) -> dict[str, np.ndarray]:
        """Fisher's -2 sum_l log p_l over the layers, ndarray (n_samples,) >= 0; higher = more suspicious."""
        return {self.kind: -2.0 * np.log(self.layer_p_values(capture)).sum(axis=1)}

    def _params(self) -> dict[str, Any]:
        return {"layers": self.layers_, "seed": int(self.seed), "min_class_count": int(self.min_class_count)}

    def get_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        self._check_fitted("models_")
        arrays: dict[str, np.ndarray] = {}
        for i, (model, cal) in enumerate(zip(self.models_, self.calibrators_)):
            arrays.update(self._model_state(model, f"layer{i}/model/"))
            arrays.update(cal.get_state(f"layer{i}/conformal/"))
        return self._params(), arrays

    @classmethod
    def from_state(cls, params: dict[str, Any], arrays: dict[str, np.ndarray],
                   context: ScorerContext | None = None) -> "_LayerwiseScorer":
        scorer = cls(**params)
        scorer.layers_ = list(scorer.layers)
        scorer.models_ = [scorer._model_from_state(arrays, f"layer{i}/model/") for i in range(len(scorer.layers_))]
        scorer.calibrators_ = [ConformalCalibrator.from_state(arrays, f"layer{i}/conformal/")
                               for i in range(len(scorer.layers_))]
        return scorer


class _KNNReference(NamedTuple):
    """A layer's normalised clean references, grouped by true label once: for each class, its rows
    (:func:`~detector.scorers.peers.float32_values`) and their squared norms; ``labels`` keeps their order."""

    labels: np.ndarray
    by_class: dict[int, tuple[np.ndarray, np.ndarray]]

    @classmethod
    def of(cls, reference: np.ndarray, labels: np.ndarray) -> "_KNNReference":
        by_class = {}
        for c in np.unique(labels):
            r = float32_values(reference[labels == c])
            by_class[int(c)] = (r, (r * r).sum(axis=1))
        return cls(labels, by_class)

    @property
    def reference(self) -> np.ndarray:
        """The references in their fitted order, ndarray (n_references, n_features) float32 (the state)."""
        out = np.empty((len(self.labels), next(iter(self.by_class.values()))[0].shape[1]), np.float32)
        for c, (r, _) in self.by_class.items():
            out[self.labels == c] = r
        return out


class LayerwiseKNNScorer(_LayerwiseScorer):
    """Layer-wise class-conditional k-NN distance, p-values per layer, Fisher fusion (JTLA-style).

    Parameters
    ----------
    k : int, default 5
        The statistic at layer l is the distance from the normalised features u = f / ||f|| to the k-th
        nearest normalised clean reference whose true label is the predicted class (in [0, 2]); a class
        with fewer than k references uses its farthest. 5: the fit data's reference half holds 13-50
        inputs per class in this project's calibration sets.
    layers, seed, min_class_count
        As in the base class: every captured layer by default.
    chunk_size : int, default 1024
        Query rows per matrix product (memory ~ chunk_size x one class's references, float64).

    Notes
    -----
    Raghuram et al. use the labels of the k nearest neighbours (a multinomial test) where we use the distance
    to the predicted class's neighbours, and fuse with Fisher as they do. Higher = more suspicious.
    """

    kind = "layerwise_knn"
    score_names = ("layerwise_knn",)

    def __init__(self, k: int = 5, layers: Sequence[str] | None = None, seed: int = 0, min_class_count: int = 20,
                 chunk_size: int = 1024):
        super().__init__(layers=layers, seed=seed, min_class_count=min_class_count)
        self.k = k
        self.chunk_size = chunk_size

    def _params(self) -> dict[str, Any]:
        return {**super()._params(), "k": int(self.k), "chunk_size": int(self.chunk_size)}

    def _fit_layer(self, features: np.ndarray, labels: np.ndarray, n_classes: int) -> _KNNReference:
        if not isinstance(self.k, (int, np.integer)) or self.k < 1:
            raise InvalidInput(f"k must be a positive integer, got {self.k!r}")
        return _KNNReference.of(KNNScorer._normalise(features), labels.astype(np.int64))

    def _statistic(self, model: _KNNReference, features: np.ndarray, classes: np.ndarray) -> np.ndarray:
        """Each input against its predicted class's references only, ``chunk_size`` queries at a time, so that
        memory is bounded by chunk_size x (the largest class's references), whatever the number of inputs."""
        u = KNNScorer._normalise(features)
        out = np.full(len(u), 2.0)  # a class without references: the largest distance between unit vectors
        for c in np.unique(classes):
            if int(c) not in model.by_class:
                continue
            ref, ref_sq = model.by_class[int(c)]
            kth = min(self.k, len(ref)) - 1
            rows = np.flatnonzero(classes == c)
            for start in range(0, len(rows), self.chunk_size):
                q = u[rows[start:start + self.chunk_size]]
                sq = sq_distances(q, ref, ref_sq)
                out[rows[start:start + self.chunk_size]] = np.sqrt(np.maximum(np.partition(sq, kth, axis=1)[:, kth], 0.0))
        return out

    def _model_state(self, model: _KNNReference, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}reference": model.reference, f"{prefix}labels": model.labels}

    def _model_from_state(self, arrays: dict[str, np.ndarray], prefix: str) -> _KNNReference:
        return _KNNReference.of(np.asarray(arrays[f"{prefix}reference"], np.float32),
                                np.asarray(arrays[f"{prefix}labels"], np.int64))


class LayerwiseMahalanobisScorer(_LayerwiseScorer):
    """Layer-wise Mahalanobis distance to the predicted class, p-values per layer, Fisher fusion.

    Lee et al. (2018)'s feature ensemble: class means and a tied covariance per layer
    (:class:`~detector.gaussian.ClassConditionalGaussian`, fitted with true labels); their logistic
    regression over layers is fitted on adversarial data, so here each layer's squared distance to the
    predicted class becomes a conformal p-value and the layers are fused with Fisher (clean data only).
    Parameters as in the base class. Higher = more suspicious.
    """

    kind = "layerwise_mahalanobis"
    score_names = ("layerwise_mahalanobis",)

    def _fit_layer(self, features: np.ndarray, labels: np.ndarray, n_classes: int) -> ClassConditionalGaussian:
        return ClassConditionalGaussian().fit(features, labels, n_classes)

    def _statistic(self, model: ClassConditionalGaussian, features: np.ndarray, classes: np.ndarray) -> np.ndarray:
        return model.score(features, classes)

    def _model_state(self, model: ClassConditionalGaussian, prefix: str) -> dict[str, np.ndarray]:
        return model.get_state(prefix)

    def _model_from_state(self, arrays: dict[str, np.ndarray], prefix: str) -> ClassConditionalGaussian:
        return ClassConditionalGaussian.from_state(arrays, prefix)
