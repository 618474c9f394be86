"""Topological scorers: induced-graph persistence (Gebhart et al.) and Betti-density signatures (Corneanu et al.).

Both compute features of each input's induced graph (:class:`~detector.topology.graph_features.InducedGraphFeatures`)
and score them with a class-conditional Gaussian (:class:`~detector.gaussian.ClassConditionalGaussian`)
conditioned on the class the model *predicted*: an adversarial input is judged against the clean inputs
of the class it claims to be. Features are compressed with log1p before the Gaussian (persistence values
are weights |w h| >= 0 with heavy right tails). Higher score = more suspicious.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from detector.capture import Capture
from detector.errors import InvalidInput
from detector.gaussian import ClassConditionalGaussian
from detector.topology.graph_features import InducedGraphFeatures
from detector.topology.induced_graph import InducedGraph
from detector.scorers.base import Scorer, ScorerContext

__all__ = ["InducedPersistenceScorer", "BettiDensityScorer"]


class _InducedGraphScorer(Scorer):
    """Shared body: one feature block of :class:`InducedGraphFeatures`, scored by a class-conditional Gaussian."""

    block: ClassVar[str]

    def __init__(self, features: InducedGraphFeatures):
        self.features = features

    def required_tensors(self) -> list[str]:
        return list(self.features.graph.required_tensors)

    def kept_tensors(self) -> list[str]:
        """None: the whole tensors of the edge-budget window are reduced to the features (:meth:`reduce`)."""
        return []

    def reduce(self, capture: Capture) -> dict[str, np.ndarray]:
        """This scorer's feature block of every input of ``capture`` (computed once for both topology scorers)."""
        return {self.kind: self.features.transform(capture)[self.block]}

    def _matrix(self, capture: Capture) -> np.ndarray:
        raw = capture.features.get(self.kind)
        if raw is None:
            raw = self.features.transform(capture)[self.block]
        return np.log1p(np.maximum(raw, 0.0))

    def fit(self, capture: Capture, labels: np.ndarray) -> "_InducedGraphScorer":
        """Fit the Gaussian on the clean ``capture``; ``labels`` are used only to check the length.

        The class of each input is the *predicted* one, as at scoring time.
        """
        if len(labels) != len(capture):
            raise InvalidInput(f"{len(capture)} inputs but {len(labels)} labels")
        self.gaussian_ = ClassConditionalGaussian().fit(self._matrix(capture), capture.predicted, capture.logits.shape[1])
        return self

    def scores(self, capture: Capture) -> dict[str, np.ndarray]:
        """Squared Mahalanobis distance of each input's features to its predicted class; higher = more suspicious."""
        self._check_fitted("gaussian_")
        return {self.score_names[0]: self.gaussian_.score(self._matrix(capture), capture.predicted)}

    def get_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        self._check_fitted("gaussian_")
        return self.features.params(), self.gaussian_.get_state("gaussian/")

    @classmethod
    def from_state(cls, params: dict[str, Any], arrays: dict[str, np.ndarray],
                   context: ScorerContext | None = None) -> "_InducedGraphScorer":
        if context is None:
            raise InvalidInput(f"{cls.__name__} needs the classifier (a ScorerContext) to rebuild its induced graph")
        key = ("induced_graph_features", repr(sorted(params.items())))
        if key not in context.shared:
            kwargs = dict(params)
            max_edges = kwargs.pop("max_edges", None)  # absent from baselines written before the edge budget
            graph_key = ("induced_graph", max_edges)
            if graph_key not in context.shared:
                context.shared[graph_key] = InducedGraph.from_classifier(context.model, max_edges=max_edges)
            context.shared[key] = InducedGraphFeatures(context.shared[graph_key], **kwargs)
        scorer = cls(context.shared[key])
        scorer.gaussian_ = ClassConditionalGaussian.from_state(arrays, "gaussian/")
        return scorer


class InducedPersistenceScorer(_InducedGraphScorer):
    """H0 persistence of the induced graph (Gebhart et al. 2019), whole graph and per layer pair.

    Features per input: quantiles of the merge (death) weights, their p-norm, persistent entropy and the
    merged fraction, for the whole graph and for the persistent-subgraph edges of each layer pair.
    ``score`` returns ndarray (n_samples,); higher = more suspicious.
    """

    kind = "induced_persistence"
    score_names = ("induced_persistence",)
    block = "persistence"


class BettiDensityScorer(_InducedGraphScorer):
    """Betti-density signature of the induced graph (after Corneanu et al. 2019).

    Features per input: beta0(rho) / |V| and beta1(rho) / |V| on a log-spaced density grid.
    ``score`` returns ndarray (n_samples,); higher = more suspicious.
    """

    kind = "betti_density"
    score_names = ("betti_density",)
    block = "betti"
