"""Scorers: each turns a :class:`~detector.capture.Capture` into suspicion scores (higher = more suspicious)."""

from detector.scorers.base import Scorer, ScorerContext

__all__ = ["Scorer", "ScorerContext"]
