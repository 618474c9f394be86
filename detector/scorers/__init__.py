"""Scorers: each turns a :class:`~detector.capture.Capture` into suspicion scores (higher = more suspicious)."""

from detector.scorers.base import Scorer, ScorerContext
from detector.scorers.layerwise import LayerwiseKNNScorer, LayerwiseMahalanobisScorer
from detector.scorers.output import EnergyScorer, FeatureSqueezingScorer
from detector.scorers.peers import KNNScorer, MahalanobisScorer, MaxSoftmaxScorer, NonzeroPixelsScorer
from detector.scorers.pixels import PatchPCAScorer
from detector.scorers.topology import BettiDensityScorer, InducedPersistenceScorer
from detector.scorers.trust import TrustScoreScorer

__all__ = [
    "BettiDensityScorer",
    "EnergyScorer",
    "FeatureSqueezingScorer",
    "InducedPersistenceScorer",
    "KNNScorer",
    "LayerwiseKNNScorer",
    "LayerwiseMahalanobisScorer",
    "MahalanobisScorer",
    "MaxSoftmaxScorer",
    "NonzeroPixelsScorer",
    "PatchPCAScorer",
    "Scorer",
    "ScorerContext",
    "TrustScoreScorer",
]
