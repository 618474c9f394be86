"""Scorer kinds by name, as written in a baseline manifest, and the pipeline stage each one runs in."""

from __future__ import annotations

from detector.introspection import IntrospectionScorer
from detector.scorers.base import Scorer
from detector.scorers.layerwise import LayerwiseKNNScorer, LayerwiseMahalanobisScorer
from detector.scorers.output import EnergyScorer, FeatureSqueezingScorer
from detector.scorers.peers import KNNScorer, MahalanobisScorer, MaxSoftmaxScorer, NonzeroPixelsScorer
from detector.scorers.pixels import PatchPCAScorer
from detector.scorers.topology import BettiDensityScorer, InducedPersistenceScorer
from detector.scorers.trust import TrustScoreScorer

__all__ = ["SCORER_KINDS", "STAGE_OF_KIND"]

SCORER_KINDS: dict[str, type[Scorer]] = {
    cls.kind: cls
    for cls in (InducedPersistenceScorer, BettiDensityScorer, IntrospectionScorer, MaxSoftmaxScorer, MahalanobisScorer,
                KNNScorer, NonzeroPixelsScorer, EnergyScorer, FeatureSqueezingScorer, LayerwiseKNNScorer,
                LayerwiseMahalanobisScorer, TrustScoreScorer, PatchPCAScorer)
}

#: Stage label (``advdetect_stage_duration_seconds{stage}``) of each scorer kind.
STAGE_OF_KIND = {
    "induced_persistence": "topology",
    "betti_density": "topology",
    "introspection": "introspection",
    "max_softmax": "peers",
    "mahalanobis": "peers",
    "knn": "peers",
    "nonzero_pixels": "peers",
    "energy": "peers",
    "feature_squeezing": "peers",
    "layerwise_knn": "peers",
    "layerwise_mahalanobis": "peers",
    "trust_score": "peers",
    "patch_pca": "peers",
}
